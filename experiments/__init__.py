"""Experiments that reproduce the LLaDA paper's claims at a size two CPU cores train in minutes.

Each claim (`python -m experiments.paper_claims CLAIM --out DIR`) prepares its data, trains and
scores through the stack's own commands (`pretrain.train`, `pretrain.evaluate`,
`data_pipeline.prepare`), and writes a markdown table and a PNG; the README quotes them beside
the paper's numbers.
"""

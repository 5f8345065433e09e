"""Benchmarks on a model: task files and their validation, scoring (Algorithm 3 for multiple
choice, the sampler for generation) in lockstep over ranks, and the lm-eval model. Used by the
evaluate and lm_eval_adapter commands."""

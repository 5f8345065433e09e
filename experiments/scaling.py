"""Claim 3, scaling against the autoregressive baseline (paper Figure 3, in spirit): the MDM and
the ARM at several sizes on the demo corpus, the same tokens (so the same training FLOPs) for
both kinds at each size, held-out likelihood against FLOPs.

The corpus (this interpreter's standard library, as the demo) is prepared once with
`data_pipeline.prepare` into training and held-out shards; every model trains on them through
`pretrain.train` (`configs/scaling.yaml`). At the end of training the MDM reports the Algorithm 3
bound (`val/elbo_nll`, stratified masks, nats per token) and the ARM its exact next-token NLL
(`val/loss`), both over the same held-out rows. FLOPs are the stack's model count
(`pretrain.runtime.flops.model_flops_per_token`) times tokens trained, identical for both kinds.
The paper plots downstream accuracy from 1e20 to 1e23 FLOPs; a held-out likelihood is what a
model this small can be judged by.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from data_pipeline.corpus import split_heldout, stdlib_corpus
from data_pipeline.prepare import main as prepare_main
from data_pipeline.tokenizer import train_bpe
from experiments import charts, stack
from parallel.model_config import preset
from pretrain.runtime.flops import model_flops_per_token

CONFIG = Path(__file__).parent / "configs" / "scaling.yaml"
RUN = yaml.safe_load(CONFIG.read_text())
SEQ_LEN, BATCH = RUN["data"]["seq_len"], RUN["train"]["global_batch_size"]
SIZES = {"d32": {"d_model": 32, "mlp_hidden_size": 86}, "d64": {"d_model": 64, "mlp_hidden_size": 172},
         "d128": {"d_model": 128, "mlp_hidden_size": 344}}
KINDS = {"MDM": ["train.objective=mdm"], "ARM": ["train.objective=arm", "model.causal=true"]}
FULL = {"steps": 300, "max_bytes": 3_000_000}
FAST = {"steps": 100, "max_bytes": 2_000_000}
PAPER = ("Figure 3 (1e20 to 1e23 FLOPs, six benchmarks): 'LLaDA exhibits strong scalability, matching the "
         "overall performance of ARMs'; MMLU and GSM8K scale better than the ARM, PIQA's gap narrows with scale")


def prepare_corpus(work: Path, max_bytes: int) -> Path:
    """Tokenizer and train / held-out shards of the demo corpus under `work` (written once)."""
    if (work / "heldout" / "manifest.json").is_file():
        return work
    files = stdlib_corpus(work / "corpus", max_bytes)
    train_files, heldout_files = split_heldout(files, 0.05)
    train_bpe(train_files, 1024, work / "tokenizer.json")
    for part, part_files in (("train", train_files), ("heldout", heldout_files)):
        code = prepare_main(["--input", *map(str, part_files), "--tokenizer", str(work / "tokenizer.json"),
                             "--out", str(work / part), "--tokens-per-shard", str(1 << 18), "--workers", "1"])
        if code:
            raise stack.ExperimentError(f"python -m data_pipeline.prepare for {work / part} exited with {code}")
    return work


def flops(size: str, steps: int) -> float:
    config = dataclasses.replace(preset(RUN["model"]["preset"]), n_layers=RUN["model"]["n_layers"], **SIZES[size])
    return model_flops_per_token(config, SEQ_LEN) * steps * BATCH * SEQ_LEN


def _job(job: dict) -> float:
    work, run_dir, steps = Path(job["work"]), Path(job["run_dir"]), job["steps"]
    stack.train(run_dir, CONFIG, [
        *KINDS[job["kind"]], *(f"model.{k}={v}" for k, v in SIZES[job["size"]].items()),
        f"data.sources=[{{path: {work / 'train'}}}]", f"data.tokenizer={work / 'tokenizer.json'}",
        f"data.validation_path={work / 'heldout'}", f"validation.every={steps}",
        f"validation.elbo_every={steps if job['kind'] == 'MDM' else 0}", f"train.steps={steps}",
        f"schedule.total_steps={steps}", f"train.seed={job['seed']}"])
    last = stack.last_metrics(run_dir)
    return last["val/elbo_nll"] if job["kind"] == "MDM" else last["val/loss"]


def run(out: Path, seeds: list[int], *, fast: bool = False, workers: int = 2) -> dict:
    size_of = FAST if fast else FULL
    work = prepare_corpus(out / "scaling" / ("fast" if fast else "full"), size_of["max_bytes"])
    jobs = [{"work": str(work), "run_dir": str(work / f"{kind.lower()}_{size}_seed{seed}"), "kind": kind,
             "size": size, "seed": seed, "steps": size_of["steps"]}
            for size in SIZES for kind in KINDS for seed in seeds]
    nll = stack.run_parallel(_job, jobs, out=out, workers=workers)
    results = {kind: {size: [v for job, v in zip(jobs, nll) if job["kind"] == kind and job["size"] == size]
                      for size in SIZES} for kind in KINDS}
    rows = [[size, f"{flops(size, size_of['steps']):.3g}", stack.spread(results["MDM"][size], 3),
             stack.spread(results["ARM"][size], 3)] for size in SIZES]
    table = stack.markdown_table(["model (2 layers)", "training FLOPs", "MDM: Algorithm 3 bound (nats/token)",
                                  "ARM: exact NLL (nats/token)"], rows)
    (out / "scaling.md").write_text(
        f"## Scaling against the AR baseline (paper Figure 3)\n\n{size_of['steps']} steps of {BATCH} x {SEQ_LEN} "
        f"tokens of the demo corpus per model; held-out nats per token (lower is better), mean ± sd over seeds "
        f"{seeds}.\n\n{table}\nPaper: {PAPER}.\n")
    charts.curves(out / "scaling.png", "Held-out nats per token against training FLOPs (mean ± sd over seeds)",
                  [charts.Series(f"{kind} ({'Algorithm 3 bound' if kind == 'MDM' else 'exact NLL'})",
                                 {flops(size, size_of["steps"]): stack.mean_sd(results[kind][size]) for size in SIZES})
                   for kind in KINDS], "training FLOPs, log scale", "held-out nats per token", log_x=True)
    return results

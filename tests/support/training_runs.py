"""Real training runs of the tiny model for the resume tests: the command line (one process, or
torchrun with its own rendezvous port), a run that must succeed, and what its metrics.jsonl
says (records, losses since the last resume)."""

import json
import subprocess
import sys
from pathlib import Path

from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny.yaml"
BASE = ["train.micro_batch_size=4", "train.global_batch_size=8", "model.n_layers=2",
        "validation.every=0", "validation.elbo_every=0", "logging.every=1",
        "logging.progress_bar=false", "data.num_workers=1", "data.variable_length_prob=0.05", "checkpoint.every=3",
        "checkpoint.keep_last=0", "sample.gen_length=4", "sample.steps=4", "sample.block_length=4"]


def launch(ranks: int, *module_and_args: str) -> list[str]:
    """`python -m MODULE ARGS`, under torchrun for more than one rank."""
    if ranks == 1:
        return [sys.executable, *module_and_args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *module_and_args]


def command(ranks: int, *args: str) -> list[str]:
    return launch(ranks, "-m", "pretrain.train", "--config", str(TINY), *args)


def train_run(env, ranks: int, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(ranks, *BASE, *args, f"train.out_dir={out}"), capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def prepared_shards(env, out: Path) -> list[str]:
    """Prepare the demo corpus once (a 1-step run in `out`); the overrides that train on its shards."""
    train_run(env, 1, out, "train.steps=1", "data.max_bytes=1500000", "data.heldout_fraction=0.1")
    data = out / "data"
    return ["data.source=shards", f"data.sources=[{{path: {data / 'train'}}}]",
            f"data.tokenizer={data / 'tokenizer.json'}"]


def step_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def losses_after_last_resume(out: Path) -> dict[int, float]:
    records = step_records(out)
    marks = [i for i, r in enumerate(records) if "resumed_from" in r]
    start = marks[-1] + 1 if marks else 0
    return {r["step"]: r["loss"] for r in records[start:] if "loss" in r}

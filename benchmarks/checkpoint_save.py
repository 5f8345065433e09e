"""What the layout-free optimizer state costs per save: seconds and bytes, measured and scaled to 8B.

A resume in another layout needs the optimizer state whole under the released names
(`optimizer.safetensors`, `pretrain.checkpoint.optimizer_state`); DeepSpeed's own shards load
only into the layout that wrote them. This script trains the demo's model (and a wider one) for a
few steps with a checkpoint after every step, once with `checkpoint.layout_free_every=1` and once
with 0, and prints per shape: the save time with and without it (the mean over the saves after
the first), their difference (the state's cost: gathered, then written by rank 0), the seconds
the trainer logs for the gather alone, its bytes, and the bytes of the rest of the checkpoint.
The 8B line scales the bytes exactly (12 bytes per parameter) and the time by the larger shape's
bytes per second of that difference (on a cluster the gather to rank 0 and the file
system decide it; the rate here is one CPU process writing to local disk).

    python benchmarks/checkpoint_save.py [--steps 4] [--ranks 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from parallel.memory_plan import parameter_count
from parallel.model_config import ModelConfig, preset

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # name -> model overrides on the demo's config
    "demo (tiny)": [],
    "d 512, 8 blocks": ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=8",
                        "model.mlp_hidden_size=1536"],
}
COMMON = ["data.max_bytes=1500000", "data.heldout_fraction=0.1", "validation.every=0", "validation.elbo_every=0",
          "logging.every=1", "logging.progress_bar=false", "checkpoint.keep_last=0", "checkpoint.save_at_end=false",
          "train.global_batch_size=8", "data.num_workers=0"]


def model_of(overrides: list[str]) -> ModelConfig:
    fields = dict(item.removeprefix("model.").split("=") for item in overrides)
    return dataclasses.replace(preset("tiny"), **{key: int(value) for key, value in fields.items()})


def run(out: Path, shape: list[str], steps: int, ranks: int, layout_free_every: int) -> list[dict]:
    train = ["-m", "pretrain.train", "--config", str(REPO / "recipes" / "tiny.yaml")]
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    args = [*COMMON, *shape, f"train.micro_batch_size={8 // ranks}", f"train.steps={steps}", "checkpoint.every=1",
            f"checkpoint.layout_free_every={layout_free_every}", f"train.out_dir={out}"]
    proc = subprocess.run([sys.executable, *launcher, *train, *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"training run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "checkpoint/seconds" in r]


def checkpoint_bytes(out: Path) -> tuple[int, int]:
    """(bytes of optimizer.safetensors, bytes of everything else) in the newest checkpoint."""
    newest = sorted((out / "checkpoints").glob("step_*"))[-1]
    files = [f for f in newest.rglob("*") if f.is_file()]
    optimizer = sum(f.stat().st_size for f in files if f.name == "optimizer.safetensors")
    return optimizer, sum(f.stat().st_size for f in files) - optimizer


def mean_after_first(values: list[float]) -> float:
    values = values[1:] or values
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=1)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            with_state = run(Path(tmp) / f"{len(rows)}-on", shape, args.steps, args.ranks, 1)
            without = run(Path(tmp) / f"{len(rows)}-off", shape, args.steps, args.ranks, 0)
            optimizer_bytes, other_bytes = checkpoint_bytes(Path(tmp) / f"{len(rows)}-on")
            rows.append({"shape": name, "params": parameter_count(model_of(shape)),
                         "save_off": mean_after_first([r["checkpoint/seconds"] for r in without]),
                         "save_on": mean_after_first([r["checkpoint/seconds"] for r in with_state]),
                         "gather": mean_after_first([r["checkpoint/layout_free_gather_seconds"] for r in with_state]),
                         "optimizer_bytes": optimizer_bytes, "other_bytes": other_bytes})
    print(f"{args.ranks} rank(s), {args.steps} saves per run, times the mean over saves 2..{args.steps}\n")
    print("| shape | params | save s (without) | save s (with) | difference | gather s | optimizer.safetensors | "
          "rest of the checkpoint |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {r['save_off']:.2f} | {r['save_on']:.2f} | "
              f"{r['save_on'] - r['save_off']:.2f} | {r['gather']:.2f} | {r['optimizer_bytes'] / 2 ** 20:.1f} MiB | "
              f"{r['other_bytes'] / 2 ** 20:.1f} MiB |")
    largest = rows[-1]
    rate = largest["optimizer_bytes"] / max(largest["save_on"] - largest["save_off"], 1e-9)
    params_8b = parameter_count(preset("llada_8b"))
    bytes_8b = 12 * params_8b
    print(f"\nLLaDA 8B ({params_8b / 1e9:.2f}B params): optimizer.safetensors {bytes_8b / 1e9:.1f} GB per "
          f"layout-free save; at this machine's {rate / 2 ** 20:.0f} MiB/s (gather and write) about "
          f"{bytes_8b / rate / 60:.0f} min (write it every N saves with checkpoint.layout_free_every=N)")


if __name__ == "__main__":
    main()

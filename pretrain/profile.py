"""Throughput profile of a run config: `python -m pretrain.profile --config FILE --steps N [overrides]`.

Runs the real training loop (`pretrain.training.loop.run`) for `--warmup` + N steps with validation, periodic
checkpoints, the final save and the closing sample off, records the last `--trace-steps` steps
with torch.profiler (a Chrome trace per rank under `<train.out_dir>/profile/`), and prints one
table from the loop's own `perf/...` record of the N steps: tokens/s per device, model and
executed TFLOP/s per device, MFU (or "unknown" on a device without a known peak:
`--peak-tflops` gives one), peak memory, and the step time split into data wait, forward,
backward, optimizer, communication and the rest. Runs on CPU, and under a launcher (rank 0
prints). It appends to `<train.out_dir>/metrics.jsonl`: point train.out_dir away from a real
run's directory. Exit codes are the train command's (the README's exit-code table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from parallel import engine as ds
from pretrain.runtime.exit_codes import HALTED, command_failures, run_command
from pretrain.runtime.flops import model_flops_per_token
from pretrain.runtime.throughput import PHASES, peak_memory_gib
from pretrain.training.config import RunConfig, load_config
from pretrain.training.entry import TRAINING_FAILURES
from pretrain.training.loop import TrainingHalted, run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. model.n_layers=4")
    parser.add_argument("--steps", type=int, default=10, help="steps measured (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="steps run first and left out (compilation, allocator warm-up)")
    parser.add_argument("--trace-steps", type=int, default=2,
                        help="measured steps recorded by torch.profiler (0: no trace)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="dense bf16 TFLOP/s of one device for MFU (default: by device name)")
    parser.add_argument("--deepspeed-comms", action="store_true",
                        help="also time DeepSpeed's collectives (its comms logger; makes each blocking)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    if args.steps < 1 or args.warmup < 0 or not 0 <= args.trace_steps <= args.steps:
        parser.error("--steps must be >= 1, --warmup >= 0 and --trace-steps in [0, --steps]")
    return args


def profile_overrides(args: argparse.Namespace) -> list[str]:
    """The user's overrides, then what turns a run into a profile."""
    total = args.warmup + args.steps
    out = [*args.overrides, f"train.steps={total}", f"logging.every={total}", "logging.jsonl=true",
           "validation.every=0", "validation.elbo_every=0", "checkpoint.every=0",
           "checkpoint.save_at_end=false", f"profile.warmup_steps={args.warmup}",
           f"profile.trace_steps={args.trace_steps}"]
    if args.peak_tflops:
        out.append(f"profile.peak_tflops={args.peak_tflops}")
    if args.deepspeed_comms:
        out.append("parallel.deepspeed.comms_logger={enabled: true, prof_all: true}")
    return out


def last_perf_record(out_dir: Path) -> dict:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    perf = [r for r in records if "perf/steps" in r]
    if not perf:
        raise RuntimeError(f"{out_dir / 'metrics.jsonl'} holds no perf/ record: the run logged no "
                           f"step after the warm-up")
    return perf[-1]


def table(cfg: RunConfig, record: dict, world_size: int, trace_dir: Path) -> str:
    """The profile as a Markdown table."""
    seq = cfg.data.seq_len
    memory_kind = peak_memory_gib()[1]
    peak = record["perf/peak_tflops"]
    mfu = record.get("perf/mfu")
    mfu_text = (f"{100 * mfu:.1f}% of {peak:g} TFLOP/s" if mfu is not None else
                f"unknown (no peak for {record['perf/device']!r}; pass --peak-tflops)")
    rows = [("device", f"{record['perf/device']} x {world_size}"),
            ("steps measured", f"{record['perf/steps']} (of {cfg.train.steps})"),
            ("tokens/s per device", f"{record['perf/tokens_per_s_per_device']:,.0f}")]
    if "perf/model_tflops_per_device" in record:
        rows += [("model TFLOP/s per device", f"{record['perf/model_tflops_per_device']:.4g} "
                  f"({model_flops_per_token(cfg.model, seq) / 1e9:.4g} GFLOP/token at seq {seq})"),
                 ("executed TFLOP/s per device", f"{record['perf/executed_tflops_per_device']:.4g}"),
                 ("MFU", mfu_text)]
    rows.append(("peak memory", f"{record['perf/peak_memory_gib']:.2f} GiB ({memory_kind})"))
    step_ms = record["perf/ms/step"]
    rows.append(("step", f"{step_ms:.1f} ms"))
    for phase in (*PHASES, "other"):
        key = f"perf/ms/{phase}"
        if key in record:
            rows.append((f"  {phase}", f"{record[key]:.1f} ms ({100 * record[key] / step_ms:.0f}%)"))
    if "perf/ms/deepspeed_collectives" in record:
        rows.append(("  DeepSpeed collectives (inside the phases)",
                     f"{record['perf/ms/deepspeed_collectives']:.1f} ms"))
    rows += [("activation checkpointing", cfg.memory.activation_checkpointing),
             ("fast path", f"attention {cfg.train.attention_backend}, compile_pointwise "
                           f"{cfg.fast.compile_pointwise}, fused_adamw {cfg.fast.fused_adamw}, "
                           f"fuse_projections {cfg.fast.fuse_projections}"),
             ("trace", str(trace_dir) if cfg.profile.trace_steps else "off")]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def profile(args: argparse.Namespace) -> int:
    """Run the profile and print its table (rank 0)."""
    cfg = load_config(args.config, profile_overrides(args))
    run(cfg)
    if ds.rank() == 0:
        out_dir = Path(cfg.train.out_dir)
        print(table(cfg, last_perf_record(out_dir), ds.world_size(), out_dir / "profile"), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failures = command_failures("profile", TRAINING_FAILURES)
    return run_command(lambda: profile(args), {**failures, TrainingHalted: (HALTED, None)})  # it reports itself


if __name__ == "__main__":
    sys.exit(main())

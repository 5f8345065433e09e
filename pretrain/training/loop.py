"""The training loop: `python -m pretrain.train --config FILE [section.field=value ...]`.

One loop, always on a DeepSpeed engine (a single CPU process is a world of one), for the
masked diffusion objective and the autoregressive baseline, at any layout: the rank layout and
memory plan are resolved and printed before anything is allocated (`--dry-run` stops there),
the model and engine are built by `pretrain.training.engine_setup` (megatron-core tensor-parallel
shards, DeepSpeed pipeline stages, `zero.Init` partitions under ZeRO-3). Each optimizer step
runs `gradient accumulation` micro-batches (their loss: the run's objective,
`pretrain.training.objective`); the data order and 1% length cut are keyed on the data-parallel
rank, t and the masks on (seed, step, row of the global batch); the learning rate follows the
configured schedule keyed on tokens seen; held-out loss on a fixed t grid, checkpoints and a
closing sample come from the config, and a finished run draws its curves (`loss.png`).
Supervised fine-tuning (`train.objective: sft`) is the same loop on conversation batches with
Algorithm 2, usually started from imported weights (`train.init_from`), validated by the
Algorithm 3 bound on held-out answers, and sampled through the chat template.

`train` is the loop's table of contents; its steps are the methods of
`pretrain.training.trainer.Trainer`, and the run's resumable state is its `TrainState`."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import torch

from parallel import engine as ds
from pretrain.checkpoint.store import CheckpointError, find_resume, published_steps, read_trainer_state
from pretrain.runtime.exit_codes import UsageError
from pretrain.runtime.guard_rails import HangWatchdog
from pretrain.runtime.preemption import PreemptionFlag
from pretrain.runtime.rank_failures import exit_after_collective_failure, is_collective_failure, tee_to_rank_log
from pretrain.training.config import RunConfig
from pretrain.training.layout import (
    Layout,
    deepspeed_config_text,
    engine_config,
    gpu_budget_bytes,
    launch_report,
    memory_estimates,
    resolve_layout,
)
from pretrain.training.plots import draw_run
from pretrain.training.trainer import Trainer


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\._.*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def dry_run(cfg: RunConfig, world_size: int) -> int:
    layout = resolve_layout(cfg, world_size)
    ds_config = engine_config(cfg, layout)
    estimates = memory_estimates(cfg, layout, bf16=ds.use_bf16(cfg.train.precision))
    print(launch_report(cfg, layout, estimates))
    print("deepspeed config:\n" + deepspeed_config_text(ds_config))
    return 0 if all(e.fits(gpu_budget_bytes(cfg)) for e in estimates) else 1


class TrainingHalted(RuntimeError):
    """The guard rails stopped the run; the message names the last good checkpoint and the fix."""


def check_run_directory(cfg: RunConfig, resume: str | None, overwrite: bool) -> None:
    """The run directory's verdict, computed by every rank alike from the (shared) file system
    before any process group, data or engine: a bad `--resume`, a resume of a checkpoint already
    past `train.steps`, or a fresh start without `--overwrite` over published checkpoints or an
    earlier run's metrics raises `CheckpointError` (exit 2). (The trainer resolves `--resume`
    again after the process group exists, as rank 0 sees it.)"""
    out_dir = Path(cfg.train.out_dir)
    ckpt_root = Path(cfg.checkpoint.dir or out_dir / "checkpoints")
    if resume:
        point = find_resume(ckpt_root, resume)
        if point is not None and not cfg.train.epochs:
            step = read_trainer_state(point)["step"]
            if step > cfg.train.steps:
                raise CheckpointError(f"{point} is already at step {step} > train.steps {cfg.train.steps}; "
                                      f"raise train.steps to continue")
        return
    if overwrite:
        return
    choices = "continue with --resume auto, give another train.out_dir, or pass --overwrite to move the old run aside"
    steps = published_steps(ckpt_root)
    if steps:
        raise CheckpointError(f"{ckpt_root} already holds checkpoints (steps up to {steps[-1]}): {choices}")
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size:
        raise CheckpointError(f"{out_dir} holds an earlier run's {metrics.name} (it published no checkpoint); a "
                              f"fresh run would append to it: {choices}")


def move_aside(cfg: RunConfig) -> list[Path]:
    """`--overwrite`: rename the used run directory (and a separate `checkpoint.dir`) to a sibling
    `<name>.replaced-<UTC timestamp>`; nothing is deleted. Rank 0 only."""
    out_dir = Path(cfg.train.out_dir)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for path in [out_dir] + ([Path(cfg.checkpoint.dir)] if cfg.checkpoint.dir else []):
        if path.exists() and (path == out_dir or published_steps(path)) and any(path.iterdir()):
            target = path.with_name(f"{path.name}.replaced-{stamp}")
            os.replace(path, target)
            moved.append(target)
    return moved


def run(cfg: RunConfig, resume: str | None = None, overwrite: bool = False) -> None:
    quiet_libraries()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = resolve_layout(cfg, world_size)  # before any process group or allocation
    check_run_directory(cfg, resume, overwrite)  # every rank alike, before anything is prepared
    env_rank = int(os.environ.get("RANK", "0"))
    moving = overwrite and not resume
    if moving and env_rank == 0:
        for target in move_aside(cfg):
            print(f"--overwrite: moved the previous run to {target}", flush=True)
    if cfg.logging.per_rank_logs and not (moving and env_rank != 0):
        tee_to_rank_log(cfg.train.out_dir, env_rank)
    ds.init_distributed(cfg.parallel.rendezvous_timeout_s, cfg.parallel.collective_timeout_s)
    rank = torch.distributed.get_rank()
    if moving:
        torch.distributed.barrier()  # rank 0 has moved the old run aside
        if cfg.logging.per_rank_logs and rank != 0:
            tee_to_rank_log(cfg.train.out_dir, env_rank)
    Path(cfg.train.out_dir).mkdir(parents=True, exist_ok=True)
    preemption = PreemptionFlag()
    watchdog = HangWatchdog(cfg.guard.hang_timeout_s, rank).start()
    try:
        train(cfg, layout, rank, preemption, watchdog, resume)
    except Exception as error:
        if is_collective_failure(error):
            exit_after_collective_failure(error, rank, *watchdog.position)
        raise
    finally:
        watchdog.stop()
        preemption.close()


def train(cfg: RunConfig, layout: Layout, rank: int, preemption: PreemptionFlag,
          watchdog: HangWatchdog, resume: str | None) -> None:
    trainer = Trainer(cfg, layout, rank, preemption, watchdog)
    trainer.restore(resume)
    start_step = trainer.state.step
    first_val = trainer.validate() if cfg.validation.every and start_step == 0 else None
    if cfg.validation.elbo_every and start_step == 0:
        trainer.validate_elbo()
    last_val = first_val
    trainer.start_meters()
    for _ in range(start_step, cfg.train.steps):
        outcome = trainer.step()
        trainer.log_step(outcome)
        if outcome.halt:
            trainer.log.print(outcome.halt)
            raise TrainingHalted(outcome.halt)
        if trainer.due(cfg.validation.every):
            last_val = trainer.validate()
        if trainer.due(cfg.validation.elbo_every):
            trainer.validate_elbo()
        if outcome.preempted or trainer.checkpoint_due():
            trainer.checkpoint(preempted=outcome.preempted)
        if outcome.preempted:
            trainer.log.print(f"preempted ({preemption.signal_name or 'signal on another rank'}): saved step "
                              f"{trainer.state.step}; continue with --resume auto")
            break
    trainer.perf.close()
    steps_run = trainer.state.step - start_step
    trainer.log.print(f"ran {steps_run} steps ({start_step + 1}..{start_step + steps_run})")
    if trainer.state.saved_step == cfg.train.steps:
        trainer.closing_sample()
    if first_val and last_val:
        trainer.log.print(f"held-out loss {first_val['val/loss']:.4f} -> {last_val['val/loss']:.4f}")
    if rank == 0 and cfg.logging.jsonl and trainer.state.step == cfg.train.steps:
        trainer.log.print(curves_line(trainer.out_dir))
    trainer.close()


def curves_line(out_dir: Path) -> str:
    """Draws the finished run's curves (`pretrain.training.plots`) and says where; a run too short
    to have a curve (no step logged with its token count) says so instead of failing."""
    try:
        return f"curves: {draw_run(out_dir)}"
    except UsageError as why:
        return f"no curves drawn: {why}"



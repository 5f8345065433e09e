"""Checkpoints that are complete or absent, and resuming from them.

DeepSpeed writes its sharded model and optimizer states under a temporary tag; every rank
adds its own RNG state (`rank_XXXXX.json`); rank 0 adds `trainer_state.json` (step, tokens,
guard-rail state, layout), the whole weights as `model.safetensors` (what sampling, export and a
weights-only restart read), the optimizer state whole under the released names as
`optimizer.safetensors` (`pretrain.checkpoint.optimizer_state`; on the saves that write it),
the run's data position as `data_state.json` (every source's lanes, whatever the layout), the
resolved config and the tokenizer, then, once every rank has written, renames the directory to
`step_XXXXXXXX` and replaces the `latest` file, both atomic on one file system. A crash at any
point leaves the previous complete checkpoint as the newest `step_*` directory. Retention keeps
the newest `keep_last` and every `keep_every`-th step.

Resuming in the same layout (tensor-, pipeline- and data-parallel sizes, ZeRO stage, fused
projections) restores the engine through DeepSpeed's own files (a pipeline's per-layer files
included); in another layout the weights, `optimizer.safetensors` and the data position are
loaded into the new one (`pretrain.training.trainer`). A pipeline's `model.safetensors` holds the
whole model too: each stage's tensors are gathered on rank 0 under the released names. A new run
can start from the weights of a checkpoint or of an imported release (`train.init_from`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from parallel.engine import full_state_dict, rank
from pretrain.checkpoint.atomic import atomic_write

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
DATA_STATE = "data_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or of another model; the message names the path
    and the fix."""


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def publish(root: Path, tmp: Path, step: int) -> Path:
    """Rank 0: make the finished temporary directory the checkpoint of `step` and point
    `latest` at it (a re-save of the same step replaces the old one only once complete)."""
    final = root / tag_of(step)
    replaced = root / f".old-{tag_of(step)}"
    if final.exists():
        os.replace(final, replaced)
    os.replace(tmp, final)
    atomic_write(root / LATEST, tag_of(step))
    shutil.rmtree(replaced, ignore_errors=True)
    return final


def published_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def prune(root: Path, keep_last: int, keep_every: int, written: int | None = None) -> list[int]:
    """Delete published checkpoints other than the newest `keep_last` not newer than `written`
    (the step just saved, which always survives) and every `keep_every`-th step (keep_last 0: keep
    all); steps newer than `written` belong to an abandoned continuation (a resume of an older
    step) and are kept, never deleted here. Returns the deleted steps."""
    steps = published_steps(root)
    if keep_last <= 0:
        return []
    older = [s for s in steps if written is None or s <= written]
    keep = set(older[-keep_last:]) | {s for s in steps if keep_every and s % keep_every == 0}
    keep |= {s for s in steps if written is not None and s >= written}
    deleted = [s for s in steps if s not in keep]
    for s in deleted:
        shutil.rmtree(root / tag_of(s), ignore_errors=True)
    return deleted


def save_checkpoint(engine, root: str | Path, step: int, *, trainer_state: dict, data_state: dict | None,
                    config: dict, tokenizer_path: str | Path, optimizer_state=None, keep_last: int = 0,
                    keep_every: int = 0) -> Path:
    """Save every rank's shards and state and rank 0's extras for `step`; returns the published path.
    On rank 0: `data_state`, the run's merged data position, and `optimizer_state`, the optimizer
    state gathered whole (`optimizer_state.GatheredOptimizerState`; None: not this save)."""
    root = Path(root)
    this_rank = rank()
    tmp_tag = f".tmp-{tag_of(step)}"
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    atomic_write(root / tmp_tag / f"rank_{this_rank:05d}.json", json.dumps({"rng": rng_state()}))
    # a pipeline (parallel.pipeline) gathers its stages itself; other modules hold every layer
    whole_state_dict = getattr(engine.module, "whole_state_dict", None)
    weights = whole_state_dict() if whole_state_dict else full_state_dict(engine.module)
    _barrier()  # every rank's files are in place before rank 0 publishes
    if this_rank == 0:
        tmp = root / tmp_tag
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        if optimizer_state is not None:
            optimizer_state.save(tmp)
        atomic_write(tmp / DATA_STATE, json.dumps(data_state))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        atomic_write(tmp / TRAINER_STATE, json.dumps({"step": step, **trainer_state}))
        publish(root, tmp, step)
        prune(root, keep_last, keep_every, written=step)
    _barrier()
    return root / tag_of(step)


def find_resume(root: Path, resume: str) -> Path | None:
    """`--resume auto`: the newest complete checkpoint under `root`, or None for a fresh start;
    otherwise the checkpoint directory named (it must be complete) or, for a checkpoints root,
    its newest complete step."""
    if resume == "auto":
        steps = published_steps(root)
        return root / tag_of(steps[-1]) if steps else None
    path = Path(resume)
    if (path / TRAINER_STATE).is_file():
        return path
    steps = published_steps(path)
    if steps:  # a checkpoints root: its newest complete step
        return path / tag_of(steps[-1])
    what = "does not exist" if not path.exists() else "is not a complete checkpoint or a checkpoints root"
    raise CheckpointError(f"--resume {resume}: {path} {what}; give 'auto', a step_XXXXXXXX directory "
                          f"(with {TRAINER_STATE}) or a checkpoints directory (its newest step)")


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def read_rank_state(path: Path, rank: int) -> dict:
    return json.loads((path / f"rank_{rank:05d}.json").read_text())


def read_data_state(path: Path) -> dict:
    """The run's data position saved with a checkpoint (layout-free)."""
    file = path / DATA_STATE
    if not file.is_file():
        raise CheckpointError(f"{path} has no {DATA_STATE} (the data position, written by checkpoints of this "
                              f"version); start a new run from its weights with train.init_from={path}")
    return json.loads(file.read_text())


def load_full_state(engine, path: Path) -> None:
    """Restore model and optimizer shards (same layout only) through DeepSpeed."""
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"{path}: DeepSpeed found no checkpoint to load")

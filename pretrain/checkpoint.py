"""Checkpoints that are complete or absent.

DeepSpeed writes its sharded model and optimizer states under a temporary tag; every rank
adds its own state (`rank_XXXXX.json`: the data stream's position); rank 0 adds the whole
weights as `model.safetensors` (what sampling and export read), the resolved config and the
tokenizer, then, once every rank has written, renames the directory to `step_XXXXXXXX` and replaces the
`latest` file, both atomic on one file system. A crash at any point leaves `latest` naming
the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from parallel.engine import full_state_dict

LATEST = "latest"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine, root: str | Path, step: int, *, client_state: dict, rank_state: dict,
                    config: dict, tokenizer_path: str | Path) -> Path:
    """Save every rank's shards and state and rank 0's extras for `step`; returns the published path."""
    root = Path(root)
    distributed = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    tmp_tag = f".tmp-{tag_of(step)}"
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    _write_atomic(root / tmp_tag / f"rank_{rank:05d}.json", json.dumps(rank_state))
    weights = full_state_dict(engine.module)
    if distributed:
        torch.distributed.barrier()  # every rank's files are in place before rank 0 publishes
    final = root / tag_of(step)
    if rank == 0:
        tmp = root / tmp_tag
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        replaced = root / f".old-{tag_of(step)}"
        if final.exists():  # the same step saved again: keep the old one until the new is in place
            os.replace(final, replaced)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, tag_of(step))
        shutil.rmtree(replaced, ignore_errors=True)
    if distributed:
        torch.distributed.barrier()
    return final

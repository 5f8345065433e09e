"""Whole weights under the released names: where they are, and loading them into any layout.

A training checkpoint's `model.safetensors` + `config.yaml`, an imported release (the same two
files) and a released-format directory (`config.json` + safetensors shards) hold the same tensor
names, so sampling, export, `train.init_from` and a resume in another layout all read them
through `weights_source` / `load_weights`: every rank reads each tensor whole and keeps its own
tensor-parallel slice (a ZeRO-3 parameter is gathered, written and re-partitioned).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from parallel.engine import import_deepspeed
from parallel.fused_projections import local_from_released
from parallel.model_config import ModelConfig
from pretrain.checkpoint.hf_format import FormatError, expected_tensors, model_config_from_released, require_tensors
from pretrain.checkpoint.safetensors_stream import TensorEntry, read_directory, read_header, read_tensor
from pretrain.checkpoint.store import published_steps, tag_of


def weights_checkpoint(path: str | os.PathLike) -> Path:
    """A directory holding whole weights and their model config: a published step, an imported
    release (`pretrain.import_hf`), or a checkpoints root (its newest step)."""
    path = Path(path)
    if (path / "model.safetensors").is_file() and (path / "config.yaml").is_file():
        return path
    steps = published_steps(path)
    if steps:
        return path / tag_of(steps[-1])
    raise FileNotFoundError(f"{path}: not a checkpoint (no model.safetensors and config.yaml) and no "
                            f"step_XXXXXXXX directory under it")


def weights_source(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, TensorEntry], Path, str]:
    """(model config, tensor entries, tokenizer path, description) of a released-format
    directory (it has config.json) or a training checkpoint (`weights_checkpoint`)."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        config = json.loads((directory / "config.json").read_text())
        model = model_config_from_released(config, str(directory / "config.json"))
        return model, read_directory(directory), directory / "tokenizer.json", f"released format {directory}"
    checkpoint = weights_checkpoint(directory)
    return (read_model_config(checkpoint), read_header(checkpoint / "model.safetensors"),
            checkpoint / "tokenizer.json", f"checkpoint {checkpoint}")


@contextlib.contextmanager
def new_directory(out: Path):
    """A temporary sibling of `out` to fill, renamed to `out` when the block completes and removed
    if it fails, so `out` is complete or absent; `out` must not exist yet (or be empty)."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: exists and is not empty; remove it or choose another")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_model_config(path: Path) -> ModelConfig:
    """The model section of a checkpoint's config.yaml."""
    section = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model") or {}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise FormatError(f"{path / 'config.yaml'}: unknown model field(s) {', '.join(unknown)}")
    return ModelConfig(**section)


def load_weights_only(module: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint's `model.safetensors` (whole weights) into a model of any layout."""
    load_weights(module, read_header(path / "model.safetensors"), str(path / "model.safetensors"))


def load_weights(module: torch.nn.Module, entries: dict[str, TensorEntry], where: str) -> None:
    """Whole tensors (`pretrain.checkpoint.safetensors_stream` entries) into a model of any layout, before
    `deepspeed.initialize` (the optimizer's master copies are made from the module then): every
    rank reads each tensor and keeps its tensor-parallel slice (a fused projection stacks its
    pieces' slices); a ZeRO-3 parameter is gathered, written and re-partitioned. Names and
    shapes are checked against the model first, and every mismatch is listed."""
    deepspeed = import_deepspeed()
    require_tensors(entries, expected_tensors(module.config), f"{where} does not fit the model being built")
    for p in module.whole_model_parameters():
        # every rank reads the same tensors; the partitions are refreshed from the group's first
        with deepspeed.zero.GatheredParameters([p.param], modifier_rank=0):
            value = local_from_released(p, lambda released: read_tensor(entries[released]))
            with torch.no_grad():
                p.param.copy_(value.to(p.param.dtype))

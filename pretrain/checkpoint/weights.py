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
from pretrain.checkpoint.safetensors_stream import (
    SafetensorsError,
    TensorEntry,
    read_directory,
    read_header,
    read_tensor,
)
from pretrain.checkpoint.store import CheckpointError, published_steps, tag_of

# The directories each reader accepts, named in its error messages.
CHECKPOINT_FORMS = "a step_XXXXXXXX checkpoint or a checkpoints directory (its newest step)"
WEIGHTS_FORMS = ("a step_XXXXXXXX checkpoint, a checkpoints directory (its newest step) or a released-format "
                 "directory (config.json + *.safetensors)")
# What reading weights raises for a bad path or files that are not a model (a command exits 2).
WEIGHTS_ERRORS = (CheckpointError, FormatError, SafetensorsError, FileNotFoundError)


def weights_checkpoint(path: str | os.PathLike) -> Path:
    """A directory holding whole weights and their model config: a published step, an imported
    release (`pretrain.import_hf`), or a checkpoints root (its newest step)."""
    path = Path(path)
    checkpoint = _checkpoint_in(path)
    if checkpoint is None:
        raise CheckpointError(_holds_no_weights(path, CHECKPOINT_FORMS))
    return checkpoint


def weights_source(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, TensorEntry], Path, str]:
    """(model config, tensor entries, tokenizer path, description) of a released-format
    directory (it has config.json) or a training checkpoint (`weights_checkpoint`)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise FormatError(f"{config_path}: not valid JSON ({error}); expected the released "
                              f"config.json of a LLaDA model") from None
        model = model_config_from_released(config, str(config_path))
        return model, read_directory(directory), directory / "tokenizer.json", f"released format {directory}"
    checkpoint = _checkpoint_in(directory)
    if checkpoint is None:
        raise CheckpointError(_holds_no_weights(directory, WEIGHTS_FORMS))
    return (read_model_config(checkpoint), read_header(checkpoint / "model.safetensors"),
            checkpoint / "tokenizer.json", f"checkpoint {checkpoint}")


def _checkpoint_in(path: Path) -> Path | None:
    """`path` itself when it holds model.safetensors and config.yaml, else the newest
    step_XXXXXXXX directory under it, else None."""
    if (path / "model.safetensors").is_file() and (path / "config.yaml").is_file():
        return path
    steps = published_steps(path)
    return path / tag_of(steps[-1]) if steps else None


def _holds_no_weights(path: Path, forms: str) -> str:
    """Why `path` is not a directory of weights, and the forms that are."""
    if not path.exists():
        what = "does not exist"
    elif not path.is_dir():
        what = "is not a directory"
    else:
        what = "holds no weights (neither model.safetensors + config.yaml nor a step_XXXXXXXX directory)"
    return f"{path} {what}; give {forms}"


@contextlib.contextmanager
def new_directory(out: Path):
    """A temporary sibling of `out` to fill, renamed to `out` when the block completes and removed
    if it fails, so `out` is complete or absent; `out` must not exist yet (or be empty)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not empty" if out.is_dir() else "is a file"
        raise FileExistsError(f"--out {out}: exists and {what}; give a path that does not exist yet (or an "
                              f"empty directory), or remove it")
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

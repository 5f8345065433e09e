"""What a resume carries over, decided before the engine is built, and what the run says about it.

A checkpoint resumes whole in the layout that wrote it (tensor-, pipeline- and data-parallel
sizes, ZeRO stage, fused projections): DeepSpeed reloads its own files. In another layout the
whole weights are loaded before the engine exists, the layout-free optimizer state
(`pretrain.checkpoint.optimizer_state`) after, and the data position (`data_state.json`, one
lane per row of the global batch) continues on the new ranks. A checkpoint without the
layout-free optimizer state is refused in another layout unless the run asks to restart the
optimizer (`checkpoint.resume_without_optimizer`): nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pretrain.checkpoint.optimizer_state import OPTIMIZER_FILE
from pretrain.checkpoint.store import CheckpointError, read_trainer_state
from pretrain.training.config import RunConfig


@dataclass
class ResumePlan:
    trainer_state: dict              # the checkpoint's trainer_state.json
    same_layout: bool                # DeepSpeed restores its own files
    optimizer: bool                  # another layout: the layout-free optimizer state is loaded
    notes: list[str] = field(default_factory=list)  # printed and logged: overrides, layout change


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'section.field: old -> new' for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += config_changes(old, new, f"{prefix}{key}.")
        elif old != new and not (isinstance(old, (list, tuple)) and list(old) == list(new or [])):
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return out


def describe_layout(layout: dict) -> str:
    """'TP 2 x DP 2 x PP 2, ZeRO-1, fused projections' for a layout key with its ZeRO stage."""
    text = f"TP {layout['tensor_parallel']} x DP {layout['data_parallel']}"
    if layout.get("pipeline_parallel", 1) > 1:
        text += f" x PP {layout['pipeline_parallel']}"
    text += f", ZeRO-{layout['zero_stage']}"
    return text + (", fused projections" if layout.get("fused_projections") else "")


def resume_plan(checkpoint: Path, cfg: RunConfig, layout_key: dict) -> ResumePlan:
    """How this run (`layout_key`: `Layout.checkpoint_key`) continues `checkpoint`; raises
    `CheckpointError` with the reason and what works instead when it cannot continue exactly."""
    saved = read_trainer_state(checkpoint)
    saved_config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    notes = [f"resume override {change}" for change in config_changes(saved_config, cfg.to_dict())]
    old = {**saved["layout"], "zero_stage": saved_config["parallel"]["zero_stage"]}
    new = {**layout_key, "zero_stage": cfg.parallel.zero_stage}
    if old == new:
        return ResumePlan(saved, same_layout=True, optimizer=False, notes=notes)
    change = f"layout changed from {describe_layout(old)} to {describe_layout(new)}"
    if (checkpoint / OPTIMIZER_FILE).is_file():
        return ResumePlan(saved, same_layout=False, optimizer=True, notes=notes + [change])
    if not cfg.checkpoint.resume_without_optimizer:
        raise CheckpointError(
            f"{checkpoint}: {change}, but the checkpoint holds no layout-free optimizer state ({OPTIMIZER_FILE}; "
            f"checkpoint.layout_free_every skipped this save); resume it in {describe_layout(old)}, resume a "
            f"checkpoint that has the file, or pass checkpoint.resume_without_optimizer=true to restart the "
            f"optimizer from the weights")
    return ResumePlan(saved, same_layout=False, optimizer=False, notes=notes + [
        f"{change}: the checkpoint holds no layout-free optimizer state: loaded the weights, step and data "
        f"position; the optimizer restarts (checkpoint.resume_without_optimizer)"])

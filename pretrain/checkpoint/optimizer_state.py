"""The optimizer's state under the released tensor names: what lets a run change its layout.

DeepSpeed's own checkpoint files hold the optimizer state as each rank's flat partition of
each tensor-parallel shard (`zero_pp_rank_<dp>_mp_rank_<tp>_optim_states.pt`), so they load
only into the layout that wrote them. `optimizer.safetensors` holds the same state whole: for
every released tensor (`model.transformer.blocks.3.q_proj.weight`, ...) its fp32 master weight
and both AdamW moments, as `fp32/<name>`, `exp_avg/<name>` and `exp_avg_sq/<name>`, and the
step count in the file's metadata. ZeRO partitions are gathered, tensor-parallel shards
concatenated and fused q/k/v and gate/up split exactly as the whole weights are
(`parallel.fused_projections`), so any layout (tensor-, pipeline- and data-parallel sizes, ZeRO
stage, fused projections) reads it back, each rank taking its own slice.

The route through DeepSpeed, by engine:
- ZeRO-3 (`parallel.zero_stage: 3`): `deepspeed.utils.safe_get_full_fp32_param` /
  `safe_get_full_optimizer_state` all-gather a parameter's fp32 partitions over the
  data-parallel group; the `safe_set_full_*` pair writes this rank's partition back;
- ZeRO-1/2 (the pipeline engine's ZeRO-1 too): the same functions, through the engine's fp32
  fragment of each parameter (`_hp_mapping`);
- ZeRO-0 (fp32 only: bf16 with fp32 gradient accumulation needs ZeRO): the torch optimizer
  holds each parameter itself; its `state` is read and written directly.
DeepSpeed creates Adam's moments lazily, at the first step: on load they are created first
(zeros, then overwritten), as a torch `load_state_dict` would, and the fp32 fragments linked.

DeepSpeed's universal checkpoints (`ds_to_universal`) are not used: they name tensors as the
engine's module names them (a pipeline's `layers.N.*`, a fused `qkv_proj`), and slice tensor-
parallel shards by one concatenation dimension, which fused projections' rank-major layout
does not follow.

Cost: 12 bytes per parameter on disk (three fp32 tensors; 96 GB at 8B), gathered on global
rank 0's host memory before it is written (as the whole weights are); `checkpoint.layout_free_every`
writes it every N-th save only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from parallel.engine import full_state_dict
from parallel.fused_projections import ModelParameter, local_from_released
from pretrain.checkpoint.hf_format import expected_tensors
from pretrain.checkpoint.safetensors_stream import read_header, read_metadata, read_tensor
from pretrain.checkpoint.store import CheckpointError

OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = "llada-optimizer-state/1"
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # the master weight and AdamW's two moments


@dataclass
class GatheredOptimizerState:
    """The optimizer state whole on global rank 0, ready to be written into a checkpoint."""
    tensors: dict[str, torch.Tensor]  # `{key}/{released name}` -> whole fp32 tensor
    step: int                         # AdamW's step count (skipped steps not counted)

    def save(self, directory: Path) -> Path:
        """Write `optimizer.safetensors` into a checkpoint directory being filled."""
        path = directory / OPTIMIZER_FILE
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path),
                  metadata={"format": FORMAT, "optimizer": "AdamW", "step": str(self.step)})
        return path


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrapper (ZeRO wraps one; ZeRO-0 in fp32 is one)."""
    optimizer = engine.optimizer
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer


def _through_deepspeed(param: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed keeps this parameter's fp32 state apart from it (ZeRO-1/2/3)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _local_value(engine, param: torch.nn.Parameter, key: str) -> torch.Tensor:
    """`key` of this parameter, whole over ZeRO partitions, in its tensor-parallel shape (fp32 CPU).
    A collective over the data-parallel group under ZeRO."""
    if _through_deepspeed(param):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        value = safe_get_full_fp32_param(param) if key == "fp32" else safe_get_full_optimizer_state(param, key)
        shape = param.ds_shape if hasattr(param, "ds_id") else param.shape
        return value.reshape(shape).float().cpu()
    if key == "fp32":
        return param.detach().float().cpu()
    return _torch_optimizer(engine).state[param][key].float().cpu()


def optimizer_step_count(engine) -> int:
    """The number of steps AdamW has taken (its `step`, the same for every parameter), 0 before the first."""
    steps = {int(state["step"]) for state in _torch_optimizer(engine).state.values() if "step" in state}
    if len(steps) > 1:
        raise CheckpointError(f"the optimizer's parameters have taken different numbers of steps {sorted(steps)}")
    return steps.pop() if steps else 0


def gather_optimizer_state(engine) -> GatheredOptimizerState | None:
    """Every key of `STATE_KEYS` of every released tensor, whole, and the step count, on global
    rank 0 (None elsewhere). A collective: every rank calls it."""
    module = engine.module
    if not any("exp_avg" in state for state in _torch_optimizer(engine).state.values()):
        _create_adam_state(engine, 0)  # an optimizer that has not stepped yet: its moments are zero
    _link_fragments(engine)
    whole = getattr(module, "whole_state_dict", None)  # a pipeline gathers its stages itself
    out: dict[str, torch.Tensor] | None = None
    for key in STATE_KEYS:
        def value_of(p: ModelParameter, key: str = key) -> torch.Tensor:
            return _local_value(engine, p.param, key)
        tensors = whole(value_of) if whole else full_state_dict(module, value_of)
        if tensors is not None:
            out = out or {}
            out.update({f"{key}/{name}": tensor for name, tensor in tensors.items()})
    return GatheredOptimizerState(out, optimizer_step_count(engine)) if out is not None else None


def _create_adam_state(engine, step: int) -> None:
    """AdamW's per-tensor state as its first step would create it (moments zero, step `step`), so
    the values can be written into it (`_link_fragments` then points DeepSpeed's fragments at it)."""
    optimizer = _torch_optimizer(engine)
    # ZeRO-3 steps one flat fp32 partition per sub-group, swapping it into the param group at its turn
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    tensors = flat if flat is not None else [p for group in optimizer.param_groups for p in group["params"]]
    on_device = any(group.get("fused") or group.get("capturable") for group in optimizer.param_groups)
    for p in tensors:
        state = optimizer.state[p]
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")
        for key in STATE_KEYS[1:]:
            state.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))


def _link_fragments(engine) -> None:
    """Point each parameter's fp32 fragment (ZeRO-1/2) at the optimizer's current
    state. DeepSpeed links them once, at its first step, before AdamW has created its moments (the
    fragments then miss them), and never again: relink, which is idempotent."""
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def load_optimizer_state(engine, checkpoint: Path) -> int:
    """Write a checkpoint's layout-free optimizer state into this rank's engine (any layout), after
    `deepspeed.initialize` and after the whole weights were loaded into the module; returns the
    step count. Every name and shape is checked against the model first."""
    path = checkpoint / OPTIMIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} has no {OPTIMIZER_FILE} (the layout-free optimizer state)")
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    entries = read_header(path)
    module = engine.module
    params = list(module.whole_model_parameters())
    _check_names(entries, module, path)
    step = int(metadata["step"])
    _create_adam_state(engine, step)
    _link_fragments(engine)
    optimizer = _torch_optimizer(engine)
    for p in params:
        for key in STATE_KEYS:
            value = local_from_released(p, _reader(entries, key))
            _set_local_value(optimizer, p.param, key, value)
    return step


def _reader(entries: dict, key: str) -> Callable[[str], torch.Tensor]:
    return lambda released: read_tensor(entries[f"{key}/{released}"])


def _set_local_value(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, key: str,
                     value: torch.Tensor) -> None:
    if _through_deepspeed(param):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        value = value.to(torch.float32)
        if key == "fp32":
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    with torch.no_grad():
        target = param if key == "fp32" else optimizer.state[param][key]
        target.copy_(value.to(target.dtype).view_as(target))


def _check_names(entries: dict, module, path: Path) -> None:
    """Every `{key}/{released}` the model needs is present with its whole shape, or one error listing
    what is missing or wrongly shaped."""
    expected = expected_tensors(module.config)
    problems = []
    for key in STATE_KEYS:
        for name, shape in expected.items():
            entry = entries.get(f"{key}/{name}")
            if entry is None:
                problems.append(f"{key}/{name} missing")
            elif tuple(entry.shape) != tuple(shape):
                problems.append(f"{key}/{name} is {list(entry.shape)}, expected {list(shape)}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{path} does not fit the model being built: {shown}")


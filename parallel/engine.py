"""The DeepSpeed engine: process environment, engine config and initialisation in one place.

Every run, a single CPU process included, trains through `deepspeed.initialize`, so there is
one training loop. This module makes a plain `python -m ...` process a valid world of one
(DeepSpeed otherwise tries MPI discovery), selects the CPU accelerator when there is no GPU,
skips the JIT build of DeepSpeed's shared-memory op on CPU, and turns the run's choices into
a DeepSpeed config: ZeRO stage, bf16 with fp32 gradient accumulation, a deliberate
communication dtype, clipping and accumulation.
"""

from __future__ import annotations

import os
import socket

import torch

from parallel.topology import coordinates


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_process_env() -> None:
    """Fill in a world of one where no launcher set the ranks, and pick DeepSpeed's accelerator.

    Must run before `import deepspeed`.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def import_deepspeed():
    prepare_process_env()
    import deepspeed

    if not torch.cuda.is_available():
        # The CPU shared-memory all-reduce op JIT-compiles for ~40 s on first use; gloo serves.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def init_distributed() -> None:
    """Join the process group; on GPU, first bind this process to its node-local device."""
    deepspeed = import_deepspeed()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def use_bf16(precision: str) -> bool:
    """'auto' is bf16 on GPU and fp32 on CPU."""
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def deepspeed_config(*, micro_batch_size: int, grad_accum_steps: int, zero_stage: int,
                     bf16: bool, communication_dtype: str, grad_clip: float) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "communication_data_type": communication_dtype,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
        # bf16 gradient accumulation diverges; accumulate (and reduce) in fp32.
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """Wrap model and optimizer in a DeepSpeed engine; returns the engine."""
    deepspeed = import_deepspeed()
    init_distributed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    return engine


def data_parallel_rank_and_size(tp_size: int = 1, pp_size: int = 1) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas."""
    if not torch.distributed.is_initialized():
        return 0, 1
    c = coordinates(torch.distributed.get_rank(), torch.distributed.get_world_size(), tp_size, pp_size)
    return c.dp_rank, c.dp_size


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Every parameter whole, on rank 0 (None elsewhere); a collective under ZeRO-3."""
    deepspeed = import_deepspeed()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if rank != 0:
            return None
        return {name: t.detach().clone() for name, t in module.state_dict().items()}

"""The DeepSpeed engine: process environment, rendezvous and initialisation in one place.

Every run, a single CPU process included, trains through `deepspeed.initialize`, so there is
one training loop. This module makes a plain `python -m ...` process a valid world of one
(DeepSpeed otherwise tries MPI discovery), selects the CPU accelerator when there is no GPU,
skips the JIT build of DeepSpeed's shared-memory op on CPU, and turns the run's choices into
the engine, in `zero.Init` when ZeRO-3 builds the model already partitioned. The engine's
config comes from `parallel.engine_config`.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from typing import Callable, NoReturn

import torch

from parallel.fused_projections import ModelParameter, whole_released_tensors
from parallel.rendezvous import check_master_reachable


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


def init_distributed(rendezvous_timeout_s: float = 300.0, collective_timeout_s: float = 1800.0) -> None:
    """Join the process group; on GPU, first bind this process to its node-local device.

    Before joining, a rank that is not rank 0 checks that MASTER_ADDR:MASTER_PORT answers, so a
    wrong address fails in seconds with a message instead of hanging in the rendezvous.
    `collective_timeout_s` is the process group's timeout: a collective that waits longer for a
    peer (one that died or hung) raises on gloo; NCCL's watchdog aborts the process.
    """
    deepspeed = import_deepspeed()
    if not torch.distributed.is_initialized():
        check_master_reachable(rendezvous_timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank_device())
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=timedelta(seconds=collective_timeout_s))


def rank() -> int:
    """This process's global rank (0 in a process that joined no process group)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    """The number of ranks in the process group (1 in a process that joined none)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank_device() -> torch.device:
    """This rank's device: its node-local GPU (LOCAL_RANK; `init_distributed` binds the process to
    it), else the CPU. NCCL reduces tensors on it only."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_reduce(values: list[float], op=torch.distributed.ReduceOp.SUM) -> list[float]:
    """The values reduced over every rank (as they are in a world of one), in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=rank_device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=op)
    return t.tolist()


def exit_together(code: int = 0) -> NoReturn:
    """End a launched process once every rank is done: a barrier, the process group destroyed,
    output flushed, then `os._exit`. A normal interpreter exit after a DeepSpeed engine on gloo
    now and then aborts in C++ teardown ("terminate called without an active exception", exit
    -6) after all the work was done; skipping that teardown keeps a finished run's exit code 0."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def use_bf16(precision: str) -> bool:
    """'auto' is bf16 on GPU and fp32 on CPU."""
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, config: dict, mpu=None):
    """Wrap model and optimizer in a DeepSpeed engine; returns the engine. Without an optimizer
    the engine serves inference (under ZeRO-3 it still gathers each layer's parameters).

    mpu: the model-parallel adapter (`parallel.tensor_parallel.MegatronMpu`) whenever TP > 1;
    without it DeepSpeed treats tensor-parallel peers as data-parallel replicas.
    """
    deepspeed = import_deepspeed()
    init_distributed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           mpu=mpu, dist_init_required=False)
    return engine


def model_construction(config: dict, mpu=None, enabled: bool = True):
    """The context a model is built in: `deepspeed.zero.Init` under ZeRO-3 (each parameter is
    partitioned over the data-parallel group as soon as its layer exists), else a no-op.

    zero.Init partitions over the *world* unless given the data-parallel group: its `mpu`
    argument does not set it. Over the world, tensor-parallel peers would overwrite each other's
    shards with rank 0's (a silently wrong model).
    """
    deepspeed = import_deepspeed()
    stage3 = config["zero_optimization"]["stage"] == 3
    group = mpu.get_data_parallel_group() if mpu is not None else None
    return deepspeed.zero.Init(config_dict_or_path=config, mpu=mpu, data_parallel_group=group,
                               enabled=enabled and stage3)


def full_state_dict(module: torch.nn.Module,
                    value_of: Callable[[ModelParameter], torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
    """Every parameter whole under its released name (ZeRO partitions gathered, tensor-parallel
    shards concatenated, fused projections split), on rank 0's CPU, one parameter at a time;
    None on other ranks. A collective: every rank calls it.

    value_of: a tensor of each parameter's tensor-parallel shape, whole over ZeRO partitions, to
    save instead of its weights (an optimizer state; computed by every rank, as it may be a
    collective over the data-parallel group).
    """
    deepspeed = import_deepspeed()
    first = rank() == 0
    out = {}
    for p in module.whole_model_parameters():
        with deepspeed.zero.GatheredParameters([p.param], modifier_rank=None, enabled=value_of is None):
            value = value_of(p) if value_of is not None else None
            for released, tensor in whole_released_tensors(p, value):
                if first:
                    out[released] = tensor.cpu().clone()
    return out if first else None

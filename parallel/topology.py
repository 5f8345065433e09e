"""Where a global rank sits in the (tensor, data, pipeline) grid.

megatron-core and DeepSpeed's PipeModelDataParallelTopology order ranks tensor-parallel
fastest, then data-parallel, then pipeline: rank = tp + TP * (dp + DP * pp). The data
pipeline is keyed on the data-parallel coordinate, so the tensor- and pipeline-parallel ranks
of one replica read identical batches and replicas read different ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Coordinates:
    tp_rank: int
    dp_rank: int
    pp_rank: int
    dp_size: int


def coordinates(rank: int, world_size: int, tp_size: int = 1, pp_size: int = 1) -> Coordinates:
    if tp_size < 1 or pp_size < 1 or world_size % (tp_size * pp_size):
        raise ValueError(f"world size {world_size} is not divisible by tensor-parallel size "
                         f"{tp_size} x pipeline-parallel size {pp_size}; launch a multiple of "
                         f"{tp_size * pp_size} ranks or change the parallel sizes")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    dp_size = world_size // (tp_size * pp_size)
    return Coordinates(tp_rank=rank % tp_size, dp_rank=(rank // tp_size) % dp_size,
                       pp_rank=rank // (tp_size * dp_size), dp_size=dp_size)

"""Where a global rank sits in the (tensor, data, pipeline) grid, and which blocks a stage holds.

megatron-core and DeepSpeed's PipeModelDataParallelTopology order ranks tensor-parallel
fastest, then data-parallel, then pipeline: rank = tp + TP * (dp + DP * pp). The data
pipeline is keyed on the data-parallel coordinate, so the tensor- and pipeline-parallel ranks
of one replica read identical batches and replicas read different ones.

A pipeline of P stages holds the token embedding on its first stage, the final norm, head and
loss on its last, and the transformer blocks balanced over all P: when P does not divide the
block count, the first stages hold one block more (the split DeepSpeed's `type:` partitioning
gives, checked when the pipeline is built).
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


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp_size: int, dp_size: int) -> int:
    """The global rank at these coordinates (the inverse of `coordinates`)."""
    return tp_rank + tp_size * (dp_rank + dp_size * pp_rank)


def stage_blocks(n_layers: int, pp_size: int) -> list[range]:
    """The block indices of each pipeline stage, blocks balanced, the first stages taking one
    more when pp_size does not divide n_layers."""
    if pp_size < 1 or n_layers < pp_size:
        raise ValueError(f"{n_layers} blocks cannot fill {pp_size} pipeline stages: every stage "
                         f"needs at least one block")
    out, start = [], 0
    for stage in range(pp_size):
        size = n_layers // pp_size + (stage < n_layers % pp_size)
        out.append(range(start, start + size))
        start += size
    return out


def describe_stages(n_layers: int, pp_size: int) -> str:
    """'stage 0: embedding + blocks 0-2 | stage 1: blocks 3-4 + final norm, head, loss'."""
    parts = []
    for stage, blocks in enumerate(stage_blocks(n_layers, pp_size)):
        text = f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}"
        if stage == 0:
            text = "embedding + " + text
        if stage == pp_size - 1:
            text += " + final norm, head, loss"
        parts.append(f"stage {stage}: {text}")
    return " | ".join(parts)

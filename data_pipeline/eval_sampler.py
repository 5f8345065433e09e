"""The distributed evaluation sampler: every example scored exactly once, every rank in lockstep.

Under ZeRO-3 (and TP/PP) every forward is a collective, so a rank that runs out of examples
first hangs the job. Each data-parallel rank therefore gets the same number of items,
ceil(n / dp_size): rank r takes examples r, r + dp_size, r + 2 dp_size, ..., and a short rank's
last item is a dummy (index None) whose forward runs like any other and whose result is
dropped. `gather_in_order` then hands every rank all results in the original example order.

Pass the data-parallel rank and size (not the global ones): the tensor/pipeline ranks of one
replica must score the same items. With NCCL, `all_gather_object` needs the current CUDA device
set (`torch.cuda.set_device`) before the call.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import torch.distributed as dist

Example = TypeVar("Example")


def shard_indices(num_examples: int, dp_rank: int, dp_size: int) -> list[int | None]:
    """This rank's example indices, ceil(num_examples / dp_size) of them; None marks a dummy (only at the end)."""
    if num_examples < 0 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need num_examples >= 0 and 0 <= dp_rank < dp_size, got "
                         f"num_examples={num_examples}, dp_rank={dp_rank}, dp_size={dp_size}")
    per_rank = -(-num_examples // dp_size)
    strided = (dp_rank + step * dp_size for step in range(per_rank))
    return [index if index < num_examples else None for index in strided]


def shard_examples(examples: Sequence[Example], dp_rank: int, dp_size: int) -> list[tuple[int | None, Example]]:
    """(index, example) pairs for this rank; a dummy carries examples[0] as its stand-in input and index None."""
    return [(index, examples[0 if index is None else index])
            for index in shard_indices(len(examples), dp_rank, dp_size)]


def gather_in_order(local_results: Sequence[Any], local_indices: Sequence[int | None], group=None) -> list[Any]:
    """All ranks' results in example order, on every rank; dummies' results are dropped.

    Without an initialised process group this is a world of one. Raises if an index is
    missing or scored twice.
    """
    if len(local_results) != len(local_indices):
        raise ValueError(f"{len(local_results)} results for {len(local_indices)} indices")
    scored = [(index, result) for index, result in zip(local_indices, local_results) if index is not None]
    by_index: dict[int, Any] = {}
    for share in _all_gather(scored, group):
        for index, result in share:
            if index in by_index:
                raise ValueError(f"example {index} was scored by more than one rank")
            by_index[index] = result
    missing = sorted(set(range(max(by_index, default=-1) + 1)) - by_index.keys())
    if missing:
        raise ValueError(f"examples {missing[:10]} were scored by no rank")
    return [by_index[index] for index in range(len(by_index))]


def _all_gather(obj: Any, group) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    shares: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(shares, obj, group=group)
    return shares

"""QKV and gate/up fusion, with the released tensor names kept everywhere outside the block.

A block projects one normalised input three times (q, k, v) and another twice (the SwiGLU gate
`ff_proj` and `up_proj`). With `fuse_projections` it holds one weight for each group instead,
`qkv_proj.weight` = [q; k; v] and `gate_up_proj.weight` = [gate; up], and runs one matmul per
group: fewer and larger kernels, each input read once, the same FLOPs.

Checkpoints, export, import and the Hugging Face format only ever see the released names. A
fused layer knows its pieces (its `released_pieces`: piece name and rows on this rank; kept on
the module, which survives what re-creates parameters, such as `to_empty` after a meta-device
build). The whole-weights paths walk a model's parameters as `ModelParameter`s (whole-model
name, parameter, the owning layer's pieces) and go through `whole_released_tensors` (saving)
and `local_from_released` (loading), which split and join along the pieces. A fused run's
checkpoint is therefore an unfused run's, and either loads the other's weights.

Under tensor parallelism a fused weight is column-parallel like its pieces, and each rank must
hold its own slice of every piece, [q_r; k_r; v_r]. Its whole (master) weight is therefore laid
out rank by rank, [q_0; k_0; v_0; q_1; k_1; v_1; ...], which megatron cuts into contiguous
per-rank slices; a plain [q; k; v] cut in two would give one rank all of q and the other k
and v. Pieces are drawn whole, in the unfused model's order, so a fused model starts from the
unfused model's weights at every tensor-parallel size.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch
from torch import nn

from parallel.layers import InitFn

# fused layer -> its released pieces, in the order they are stacked and drawn
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("ff_proj", "up_proj")}
PIECES_ATTRIBUTE = "released_pieces"


def rank_major(pieces: list[torch.Tensor], tp_size: int) -> torch.Tensor:
    """Whole pieces stacked rank by rank: every rank's slice of each piece, rank 0's first."""
    return torch.cat([piece.chunk(tp_size)[rank] for rank in range(tp_size) for piece in pieces])


def fused_column(layers, in_features: int, fused_name: str, rows: list[int],
                 inits: list[InitFn] | None) -> nn.Module:
    """One column-parallel layer standing for the pieces of `fused_name` (whole output rows
    `rows`, drawn by `inits` in order; None: weights to be loaded)."""
    tp = layers.tp_size
    if any(r % tp for r in rows):
        raise ValueError(f"{fused_name}: piece rows {rows} are not divisible by tensor-parallel size {tp}")

    def draw(shape: tuple[int, int]) -> torch.Tensor:
        return rank_major([init((r, in_features)) for init, r in zip(inits, rows)], tp)

    layer = layers.column(in_features, sum(rows), draw if inits is not None else None)
    setattr(layer, PIECES_ATTRIBUTE, tuple((name, r // tp) for name, r in zip(FUSED[fused_name], rows)))
    return layer


@dataclasses.dataclass(frozen=True)
class ModelParameter:
    """A parameter under its whole-model name (`model.transformer.blocks.3.qkv_proj.weight`),
    with the pieces its layer stands for: (piece layer name, rows on this rank), or None."""
    name: str
    param: nn.Parameter
    pieces: tuple[tuple[str, int], ...] | None = None

    def released(self) -> list[tuple[str, int | None]]:
        """(released name, rows on this rank) of each tensor this parameter stands for (rows
        None: the whole parameter)."""
        if self.pieces is None:
            return [(self.name, None)]
        block, _, suffix = self.name.rsplit(".", 2)
        return [(f"{block}.{piece}.{suffix}", rows) for piece, rows in self.pieces]

    def split(self, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(released name, this rank's rows) of `value`, a tensor of the parameter's local shape."""
        if self.pieces is None:
            return [(self.name, value)]
        released = self.released()
        parts = value.split([rows for _, rows in released])
        return [(name, part) for (name, _), part in zip(released, parts)]

    @property
    def tensor_parallel_dim(self) -> int | None:
        """The dimension tensor parallelism splits (megatron's attributes), or None."""
        return self.param.partition_dim if getattr(self.param, "tensor_model_parallel", False) else None


def model_parameters(module: nn.Module, prefix: str = "") -> Iterator[ModelParameter]:
    """Every parameter under `module`, named as in the whole model (`prefix`: the whole-model
    name of `module` itself), in `named_parameters` order."""
    for module_name, layer in module.named_modules(prefix=prefix):
        for name, param in layer.named_parameters(prefix=module_name, recurse=False):
            yield ModelParameter(name, param, getattr(layer, PIECES_ATTRIBUTE, None))


def released_shapes(p: ModelParameter, tp_size: int) -> list[tuple[str, list[int]]]:
    """(released name, whole shape) of each tensor `p` stands for."""
    dim = p.tensor_parallel_dim
    out = []
    for released, part in p.split(p.param.detach()):
        shape = list(part.shape)
        if dim is not None:
            shape[dim] *= tp_size
        out.append((released, shape))
    return out


def whole_released_tensors(p: ModelParameter,
                           value: torch.Tensor | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(released name, whole tensor) of each tensor `p` stands for: its pieces, each with the
    tensor-parallel shards concatenated (a collective over the TP group). The parameter must be
    whole on this rank (gathered under ZeRO-3). value: a tensor of the parameter's shape to
    split instead of its weights (its gradient)."""
    dim = p.tensor_parallel_dim
    for released, part in p.split(p.param.detach() if value is None else value):
        if dim is not None:
            from parallel.tensor_parallel import concatenate_shards
            part = concatenate_shards(part, dim)
        yield released, part


def local_from_released(p: ModelParameter, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """This rank's value of `p` from whole released tensors (`read(released name)`): each
    piece's tensor-parallel slice, stacked as a fused layer holds them."""
    dim = p.tensor_parallel_dim
    parts = []
    for released, _ in p.released():
        whole = read(released)
        if dim is not None:
            from parallel.tensor_parallel import shard_of
            whole = shard_of(whole, dim)
        parts.append(whole)
    return parts[0] if len(parts) == 1 else torch.cat(parts)

"""The pointwise pieces of a block (RMSNorm, the RoPE rotation, SwiGLU), eager or compiled.

Between its matmuls a block runs chains of small elementwise kernels: RMSNorm's cast, square,
mean, rsqrt and two multiplies; RoPE's cast, split, negate, concatenate, two multiplies and an
add; SwiGLU's SiLU and product. Each reads and writes the whole activation, so on a GPU they cost
memory bandwidth out of proportion to their FLOPs. `torch.compile` fuses each chain into one
kernel. The functions here are the one definition of that math: the model calls them through a
`PointwiseOps`, eager by default (`EAGER`) or compiled (`pointwise_ops("compiled")`).

Compiled with `dynamic=True`: the paper's 1% rule cuts micro-batches to random lengths, and a
shape-specialised graph would recompile for every new length (torch specialises sizes 0 and 1
even then, so a length-1 batch compiles once more). On CPU the compiled path needs a C++
compiler (inductor generates C++); on GPU it generates Triton kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back to the input dtype, then multiply by the weight."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX half-split rotation in fp32 (dimension i with i + head_dim/2), cast back to x's dtype."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return (x32 * cos + rotated_half * sin).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclasses.dataclass(frozen=True)
class PointwiseOps:
    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


EAGER = PointwiseOps("eager", rms_norm, rotary, swiglu)
POINTWISE = ("eager", "compiled")


@functools.cache
def _compiled() -> PointwiseOps:
    # One compiled wrapper per process, shared by every block: dynamo caches graphs per function.
    return PointwiseOps("compiled", *(torch.compile(fn, dynamic=True) for fn in (rms_norm, rotary, swiglu)))


def pointwise_ops(name: str) -> PointwiseOps:
    """'eager' or 'compiled'."""
    if name == "eager":
        return EAGER
    if name == "compiled":
        return _compiled()
    raise ValueError(f"pointwise implementation {name!r} is not one of {', '.join(POINTWISE)}")

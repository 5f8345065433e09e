"""The layer factory: the one place that decides which linear and embedding classes a model uses.

The model module asks for "a projection whose output is split across tensor-parallel ranks"
(`column`), "one whose input is split" (`row`), the token embedding and the LM head; it never
names a class itself. At tensor-parallel size 1 these are plain `nn.Linear` / `nn.Embedding`,
so the model runs in a single process with no process group (the demo, the sampler, most
tests); `parallel.tensor_parallel.TensorParallelLayers` has the same methods on megatron-core's
layers. Every method takes an `init` that draws the whole weight, so all layouts start from the
same weights.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from parallel.cross_entropy import ChunkedLossHead

InitFn = Callable[[tuple[int, int]], torch.Tensor]  # shape -> the whole weight, drawn in fp32


class TruncatedNormalInit:
    """The released `mitchell` draw: truncated normal, std 1/sqrt(fan_in) / sqrt(depth_scale),
    cut at +-cutoff std, from one seeded generator shared by the whole model (so the order of
    construction fixes every weight)."""

    def __init__(self, generator: torch.Generator, cutoff_factor: float):
        self.generator = generator
        self.cutoff_factor = cutoff_factor

    def __call__(self, fan_in: int, depth_scale: float = 1.0) -> InitFn:
        std = 1.0 / math.sqrt(fan_in) / math.sqrt(depth_scale)
        cut = self.cutoff_factor * std

        def draw(shape: tuple[int, int]) -> torch.Tensor:
            full = torch.empty(shape, dtype=torch.float32, device=self.generator.device)
            nn.init.trunc_normal_(full, mean=0.0, std=std, a=-cut, b=cut, generator=self.generator)
            return full
        return draw


def _fill(weight: torch.Tensor, init: InitFn | None) -> None:
    if init is not None:
        with torch.no_grad():
            weight.copy_(init(tuple(weight.shape)))


# Weights are drawn inside each layer's own __init__: under deepspeed.zero.Init a layer's
# parameters are partitioned as soon as its __init__ returns.

class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, init: InitFn | None):
        super().__init__(in_features, out_features, bias=False)
        _fill(self.weight, init)


class Embedding(nn.Embedding):
    def __init__(self, vocab_size: int, d_model: int, init: InitFn | None):
        super().__init__(vocab_size, d_model)
        _fill(self.weight, init)


class DenseHead(ChunkedLossHead, Linear):
    """The unsharded LM head: logits, or per-token cross-entropy computed in chunks."""

    def __init__(self, d_model: int, vocab_size: int, init: InitFn | None, chunk_tokens: int):
        super().__init__(d_model, vocab_size, init)
        self.chunk_tokens = chunk_tokens

    @staticmethod
    def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, reduction="none")


class DenseLayers:
    """Plain, unsharded layers: tensor-parallel size 1."""

    tp_size = 1

    def column(self, in_features: int, out_features: int, init: InitFn | None = None) -> nn.Module:
        return Linear(in_features, out_features, init)

    row = column

    def embedding(self, vocab_size: int, d_model: int, init: InitFn | None = None) -> nn.Module:
        return Embedding(vocab_size, d_model, init)

    def head(self, d_model: int, vocab_size: int, init: InitFn | None = None,
             chunk_tokens: int = 0) -> nn.Module:
        return DenseHead(d_model, vocab_size, init, chunk_tokens)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

"""The layer factory: the one place that decides which linear and embedding classes a model uses.

The model module asks for "a projection whose output is split across tensor-parallel ranks"
(`column`), "one whose input is split" (`row`), the token embedding and the LM head; it never
names a class itself. At tensor-parallel size 1 these are plain `nn.Linear` / `nn.Embedding`,
so the model runs in a single process with no process group (the demo, the sampler, most
tests). A tensor-parallel factory built on megatron-core's layers plugs in here with the same
methods and the same parameter names.
"""

from __future__ import annotations

import torch
from torch import nn


class DenseLayers:
    """Plain, unsharded layers: tensor-parallel size 1."""

    tp_size = 1

    def column(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def embedding(self, vocab_size: int, d_model: int) -> nn.Module:
        return nn.Embedding(vocab_size, d_model)

    def head(self, d_model: int, vocab_size: int) -> nn.Module:
        return nn.Linear(d_model, vocab_size, bias=False)

    def head_weight_of(self, embedding: nn.Module) -> torch.Tensor:
        """The weight a tied head multiplies by (the embedding's own)."""
        return embedding.weight

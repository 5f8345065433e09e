"""Tensor parallelism: megatron-core's layers behind the layer factory, their groups, and `mpu`.

At tensor-parallel size > 1 the model's projections come from megatron-core:
column-parallel q/k/v/gate/up (`gather_output=False`), row-parallel attention and MLP outputs
(`input_is_parallel=True`), a vocabulary-parallel embedding and a vocabulary-parallel head whose
cross-entropy never gathers the logits. Only the parts of megatron-core that run on CPU and GPU
alike are used (DESIGN.md section 3): CPU-side weight allocation, no gradient-accumulation
fusion, no sequence parallelism, no RNG tracker.

Every weight is initialised by drawing the *full* tensor from the model's seeded generator
(megatron's CPU "master weight") and keeping this rank's slice, so a TP=2 model starts from
exactly the weights of the TP=1 model with the same seed.

DeepSpeed must be told which ranks hold the same data (`mpu`); without it every rank counts as
data-parallel and the optimizer silently averages different shards of one weight.
`MegatronMpu` is that adapter.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from parallel.cross_entropy import ChunkedLossHead
from parallel.layers import InitFn


def _megatron():
    """megatron-core, imported on first use: it takes seconds and only TP > 1 needs it."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig
    return parallel_state, tensor_parallel, ModelParallelConfig


def initialize_groups(tensor_parallel: int, pipeline_parallel: int = 1) -> None:
    """Build megatron's TP/DP/PP groups over the initialised world (once per process)."""
    parallel_state, _, _ = _megatron()
    if parallel_state.model_parallel_is_initialized():
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size())
        if have != (tensor_parallel, pipeline_parallel):
            raise RuntimeError(f"megatron groups already built for (TP, PP) = {have}, "
                               f"asked for {(tensor_parallel, pipeline_parallel)}")
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        create_gloo_process_groups=False)


class MegatronMpu:
    """The `mpu` object DeepSpeed queries for model- and data-parallel groups.

    DeepSpeed calls `get_model_parallel_*` (megatron-core 0.16 has no `get_model_parallel_rank`:
    it is derived from the model-parallel group) and `get_data_parallel_*`.
    """

    def __init__(self):
        self.ps, _, _ = _megatron()

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(self.ps.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return torch.distributed.get_rank(self.ps.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.get_pipeline_model_parallel_rank()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()


def master_init(init: InitFn | None) -> Callable[[torch.Tensor], None]:
    """megatron's `init_method`: it fills the whole (master) weight, then megatron keeps this
    rank's slice, inside the layer's __init__ (before deepspeed.zero.Init partitions it).
    No `init`: the weights are left to be loaded."""
    def fill(master: torch.Tensor) -> None:
        if init is not None:
            with torch.no_grad():
                master.copy_(init(tuple(master.shape)))
    return fill


def concatenate_shards(shard: torch.Tensor, partition_dim: int) -> torch.Tensor:
    """The whole weight from every TP rank's shard (a collective over the TP group)."""
    parallel_state, _, _ = _megatron()
    group = parallel_state.get_tensor_model_parallel_group()
    pieces = [torch.empty_like(shard) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(pieces, shard.contiguous(), group=group)
    return torch.cat(pieces, dim=partition_dim)


def shard_of(whole: torch.Tensor, partition_dim: int) -> torch.Tensor:
    """This rank's slice of a whole weight (the inverse of `concatenate_shards`)."""
    parallel_state, _, _ = _megatron()
    size = parallel_state.get_tensor_model_parallel_world_size()
    return whole.chunk(size, dim=partition_dim)[parallel_state.get_tensor_model_parallel_rank()]


class _GatherVocabShards(torch.autograd.Function):
    """All-gather the last dimension across the TP group; the gradient keeps this rank's slice."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        parallel_state, _, _ = _megatron()
        ctx.rank, ctx.width = parallel_state.get_tensor_model_parallel_rank(), local.shape[-1]
        return concatenate_shards(local, local.dim() - 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[..., ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width].contiguous()


def _layer_classes():
    """megatron's layers with the released parameter names: no `_extra_state` key in the state
    dict (loading still accepts one), and linears that return their output alone."""
    _, tp, _ = _megatron()

    class ColumnParallelLinear(tp.ColumnParallelLinear):
        get_extra_state = nn.Module.get_extra_state

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    class RowParallelLinear(tp.RowParallelLinear):
        get_extra_state = nn.Module.get_extra_state

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    class VocabParallelHead(ChunkedLossHead, ColumnParallelLinear):
        """The LM head: vocabulary-sharded logits, or per-token cross-entropy computed in
        chunks by megatron's vocab-parallel cross-entropy (no rank ever holds all logits)."""

        def __init__(self, *args, chunk_tokens: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.chunk_tokens = chunk_tokens

        @staticmethod
        def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return tp.vocab_parallel_cross_entropy(logits.float(), targets)

    return ColumnParallelLinear, RowParallelLinear, tp.VocabParallelEmbedding, VocabParallelHead


class TensorParallelLayers:
    """The layer factory at tensor-parallel size > 1 (same methods as `DenseLayers`)."""

    def __init__(self, tensor_parallel: int):
        parallel_state, tp, ModelParallelConfig = _megatron()
        if parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel:
            raise RuntimeError(f"megatron's TP group has size "
                               f"{parallel_state.get_tensor_model_parallel_world_size()}, model "
                               f"asks for {tensor_parallel}; call initialize_groups first")
        self.tp_size = tensor_parallel
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=tensor_parallel, use_cpu_initialization=True,
            perform_initialization=True, params_dtype=torch.float32,
            gradient_accumulation_fusion=False, sequence_parallel=False)
        self._column, self._row, self._embedding, self._head = _layer_classes()

    def column(self, in_features: int, out_features: int, init: InitFn | None = None) -> nn.Module:
        return self._column(in_features, out_features, config=self.config,
                            init_method=master_init(init), bias=False, gather_output=False,
                            skip_bias_add=True)

    def row(self, in_features: int, out_features: int, init: InitFn | None = None) -> nn.Module:
        return self._row(in_features, out_features, config=self.config,
                         init_method=master_init(init), bias=False, input_is_parallel=True,
                         skip_bias_add=True)

    def embedding(self, vocab_size: int, d_model: int, init: InitFn | None = None) -> nn.Module:
        return self._embedding(vocab_size, d_model, init_method=master_init(init), config=self.config)

    def head(self, d_model: int, vocab_size: int, init: InitFn | None = None,
             chunk_tokens: int = 0) -> nn.Module:
        return self._head(d_model, vocab_size, config=self.config, init_method=master_init(init),
                          bias=False, gather_output=False, skip_bias_add=True,
                          chunk_tokens=chunk_tokens)

    def gather_vocab(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Whole-vocabulary logits from this rank's shard (for sampling and evaluation)."""
        return _GatherVocabShards.apply(local_logits)

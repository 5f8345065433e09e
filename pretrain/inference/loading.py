"""A model to sample from and score with, loaded from a training checkpoint or a released LLaDA
directory, in one process or sharded over ranks.

Both sources hold the same tensor names (the released ones), so both load into the training
model: a `step_XXXXXXXX` checkpoint (or a checkpoints directory: its newest step) through its
`config.yaml`, a released-format directory (GSAI-ML/LLaDA-8B-Base or -Instruct as downloaded,
or this stack's export) through its `config.json`; the tokenizer is the `tokenizer.json`
beside the weights. In one process the model is built on the meta device and filled tensor by
tensor (no throw-away initialisation, no second copy). Under a launcher (WORLD_SIZE > 1) or
with tensor parallelism it is built as the trainer builds it (`parallel.build`: megatron-core
shards, ZeRO-3 partitions under `zero.Init`) and wrapped in a DeepSpeed engine without an
optimizer, its config from `parallel.engine_config` (one example per forward); every
forward is then a collective, which the sampler's `agree` and the evaluation sampler's padding
keep in lockstep.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from data_pipeline.tokenizer import TokenizerInfo, check_fits_model, load_tokenizer
from parallel import engine as ds
from parallel.build import build_rank_model
from parallel.engine_config import ParallelConfig, deepspeed_config
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from parallel.topology import coordinates
from pretrain.checkpoint.weights import load_weights, weights_source

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The seed of the weights a sharded build draws before `load_weights` overwrites every one (the
# trainer's default seed, so the global RNG is seeded as it was when inference built through the
# trainer's config).
_BUILD_SEED = 1234


@dataclass
class InferenceModel:
    """Callable as `model(ids, attention_mask=None) -> logits` (in the model's dtype); knows its tokenizer and
    this rank's data-parallel coordinates: examples are split over the data-parallel ranks and
    gathered over `dp_group` (tensor-parallel peers hold the same examples; None: the world)."""
    module: torch.nn.Module
    config: ModelConfig
    tokenizer: TokenizerInfo
    device: torch.device
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: object = None

    @property
    def distributed(self) -> bool:
        return ds.world_size() > 1

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **cache) -> torch.Tensor:
        """cache: the KV-cache arguments of `LLaDAModel.forward` (fast decoding), passed through."""
        return self.module(ids.to(self.device), attention_mask=attention_mask, **cache)


def load_model(directory: str | os.PathLike, *, dtype: str = "auto", tensor_parallel: int = 1,
               zero_stage: int = 3, attention_backend: str = "auto",
               fuse_projections: bool = False) -> InferenceModel:
    """The model in `directory`, in this process or sharded over the launched ranks.

    dtype: "auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32". tensor_parallel / zero_stage
    apply under a launcher (WORLD_SIZE > 1) or when tensor_parallel > 1; zero_stage is 3 (weights
    partitioned over data-parallel ranks) or 0 (ZeRO-1/2 partition optimizer state only).
    fuse_projections: one q/k/v and one gate/up matmul per block (`parallel.fused_projections`:
    the same outputs to float rounding, fewer kernels per forward)."""
    if zero_stage not in (0, 3):
        raise ValueError(f"zero_stage {zero_stage}: inference uses 3 (weights partitioned) or 0; "
                         f"stages 1 and 2 partition optimizer state, which inference has none of")
    model_config, entries, tokenizer_path, where = weights_source(directory)
    tokenizer = load_tokenizer(tokenizer_path)
    check_fits_model(tokenizer, model_config.vocab_size)
    precision = "bf16" if dtype == "auto" and torch.cuda.is_available() else ("fp32" if dtype == "auto" else dtype)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and tensor_parallel == 1:
        device = ds.rank_device()
        with torch.device("meta"):
            module = LLaDAModel(model_config, init_seed=None, attention_backend=attention_backend,
                                fuse_projections=fuse_projections)
        module = module.to_empty(device=device).to(DTYPES[precision])
        load_weights(module, entries, where)
        return InferenceModel(module.eval(), model_config, tokenizer, device)
    return _load_sharded(model_config, entries, where, tokenizer, precision, tensor_parallel,
                         zero_stage, attention_backend, fuse_projections, world)


def _load_sharded(model_config, entries, where, tokenizer, precision, tensor_parallel, zero_stage,
                  attention_backend, fuse_projections, world) -> InferenceModel:
    parallel = ParallelConfig(tensor_parallel=tensor_parallel, zero_stage=zero_stage)
    ds.init_distributed(parallel.rendezvous_timeout_s)
    grid = coordinates(ds.rank(), world, tensor_parallel)
    # One example per forward on each data-parallel rank; with no optimizer the gradient keys
    # (accumulation, clipping at the run config's default 1.0) are never used.
    ds_config = deepspeed_config(parallel, micro_batch_size=1, grad_accum_steps=1,
                                 bf16=ds.use_bf16(precision), grad_clip=1.0)
    module, mpu = build_rank_model(model_config, parallel, ds_config=ds_config, seed=_BUILD_SEED,
                                   attention_backend=attention_backend,
                                   fuse_projections=fuse_projections)
    load_weights(module, entries, where)
    engine = ds.initialize(module, None, ds_config, mpu=mpu)
    return InferenceModel(engine.module.eval(), model_config, tokenizer, ds.rank_device(),
                          dp_rank=grid.dp_rank, dp_size=grid.dp_size,
                          dp_group=mpu.get_data_parallel_group() if mpu is not None else None)

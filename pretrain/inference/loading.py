"""A model to sample from and score with, loaded from a training checkpoint or a released LLaDA
directory, in one process or sharded over ranks.

Both sources hold the same tensor names (the released ones), so both load into the training
model: a `step_XXXXXXXX` checkpoint (or a checkpoints directory: its newest step) through its
`config.yaml`, a released-layout directory (GSAI-ML/LLaDA-8B-Base or -Instruct as downloaded,
or this stack's export) through its `config.json`; the tokenizer is the `tokenizer.json`
beside the weights. In one process the model is built on the meta device and filled tensor by
tensor (no throw-away initialisation, no second copy). Under a launcher (WORLD_SIZE > 1) or
with tensor parallelism it is built like the trainer builds it (megatron-core shards, ZeRO-3
partitions under `zero.Init`) and wrapped in a DeepSpeed engine without an optimizer; every
forward is then a collective, which the sampler's `agree` and the evaluation sampler's padding
keep in lockstep.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from data_pipeline.tokenizer import TokenizerInfo, check_fits_model, load_tokenizer
from parallel import engine as ds
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from parallel.topology import coordinates
from pretrain.checkpoint.weights import load_weights, weights_source

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class InferenceModel:
    """Callable as `model(ids, attention_mask=None) -> fp32 logits`; knows its tokenizer and
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
        return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **cache) -> torch.Tensor:
        """cache: the KV-cache arguments of `LLaDAModel.forward` (fast decoding), passed through."""
        return self.module(ids.to(self.device), attention_mask=attention_mask, **cache)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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
        device = _device()
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
    from pretrain.training.config import RunConfig
    from pretrain.training.engine_setup import build_model
    from pretrain.training.layout import engine_config, resolve_layout

    cfg = RunConfig()
    cfg.model = model_config
    cfg.parallel.tensor_parallel = tensor_parallel
    cfg.parallel.zero_stage = zero_stage
    cfg.train.precision = precision
    cfg.train.attention_backend = attention_backend
    cfg.fast.fuse_projections = fuse_projections
    cfg.train.micro_batch_size = 1
    cfg.train.global_batch_size = world // tensor_parallel
    ds.init_distributed(cfg.parallel.rendezvous_timeout_s)
    ds_config = engine_config(cfg, resolve_layout(cfg, world))
    module, mpu = build_model(cfg, ds_config)
    load_weights(module, entries, where)
    engine = ds.initialize(module, None, ds_config, mpu=mpu)
    grid = coordinates(torch.distributed.get_rank(), world, tensor_parallel)
    return InferenceModel(engine.module.eval(), model_config, tokenizer, _device(),
                          dp_rank=grid.dp_rank, dp_size=grid.dp_size,
                          dp_group=mpu.get_data_parallel_group() if mpu is not None else None)

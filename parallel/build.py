"""This rank's model, built from the model config and the parallel settings.

Training (`pretrain.training.engine_setup`) and sharded inference (`pretrain.inference.loading`)
build the same thing: the dense model at tensor-parallel size 1, megatron-core's shard of it
when `tensor_parallel` > 1, this rank's DeepSpeed pipeline stage when `pipeline_parallel` > 1,
and under ZeRO-3 with `zero_init` the model built already partitioned (`deepspeed.zero.Init`).
The builder takes the config sections and switches it needs, not a run config: `parallel`
knows nothing of `pretrain`, so a pipeline's loss comes from the caller (`loss_from_ce`).
"""

from __future__ import annotations

import torch

from parallel import engine as ds
from parallel.engine_config import ParallelConfig
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from parallel.tensor_parallel import MegatronMpu, TensorParallelLayers, initialize_groups


def build_rank_model(model_config: ModelConfig, parallel: ParallelConfig, *, ds_config: dict,
                     seed: int, attention_backend: str = "auto", activation_checkpointing: str = "none",
                     loss_chunk_tokens: int = 0, pointwise: str = "eager", fuse_projections: bool = False,
                     loss_from_ce=None) -> tuple[torch.nn.Module, object]:
    """The model for this rank (a TP shard when tensor_parallel > 1, built partitioned under
    ZeRO-3; this rank's pipeline stage when pipeline_parallel > 1) and the `mpu` adapter
    DeepSpeed needs for TP (None at TP 1 and for a pipeline).

    ds_config: the engine's config (`parallel.engine_config.deepspeed_config`), which `zero.Init`
    reads. seed: the weights' generator (`LLaDAModel`'s `init_seed`). The switches are
    `LLaDAModel`'s, with its defaults. loss_from_ce: a pipeline's loss from the per-token
    cross-entropy and the labels (`parallel.pipeline.LossFromCE`); required when
    pipeline_parallel > 1, unused otherwise.
    """
    layers, mpu = None, None
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    # Weights come from the model's own seeded generator; seeding the global RNG as well keeps
    # anything a library draws at construction (megatron-core's CPU initialisation) identical
    # on every rank and run.
    torch.manual_seed(seed)
    if tp > 1:
        initialize_groups(tp, pp)
        layers, mpu = TensorParallelLayers(tp), MegatronMpu()
    if pp > 1:  # this rank's stage; DeepSpeed takes its groups from the pipeline's topology
        if loss_from_ce is None:
            raise ValueError("pipeline_parallel > 1: the last stage computes the loss; give "
                             "build_rank_model a loss_from_ce")
        # Imported here: importing parallel.pipeline imports DeepSpeed (seconds) and prepares the
        # process environment for it, which only a pipeline run needs.
        from parallel.pipeline import LLaDAPipeline
        return LLaDAPipeline(model_config, layers, pipeline_parallel=pp, loss_from_ce=loss_from_ce,
                             attention_backend=attention_backend, init_seed=seed,
                             activation_checkpointing=activation_checkpointing,
                             loss_chunk_tokens=loss_chunk_tokens, pointwise=pointwise,
                             fuse_projections=fuse_projections), None
    with ds.model_construction(ds_config, mpu, enabled=parallel.zero_init):
        model = LLaDAModel(model_config, layers, attention_backend=attention_backend, init_seed=seed,
                           activation_checkpointing=activation_checkpointing,
                           loss_chunk_tokens=loss_chunk_tokens, pointwise=pointwise,
                           fuse_projections=fuse_projections)
    return model, mpu

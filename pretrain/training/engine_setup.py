"""A run's model, optimizer and DeepSpeed engine, built from its config.

The training loop, the profiler and the tests build them the same way: this rank's model from
`parallel.build` (megatron-core shards when `parallel.tensor_parallel` > 1, DeepSpeed pipeline
stages when `parallel.pipeline_parallel` > 1, `zero.Init` partitions under ZeRO-3; inference
builds it there too) with the run's switches and the training step's pipeline loss, weights
drawn from the model's own seeded generator or loaded whole before the engine exists.
"""

from __future__ import annotations

from pathlib import Path

import torch

from parallel import engine as ds
from parallel.build import build_rank_model
from parallel.model import no_weight_decay
from pretrain.checkpoint.weights import load_weights_only, read_model_config
from pretrain.training.config import ConfigError, RunConfig
from pretrain.training.step_loss import pipeline_loss


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW over two groups: weight decay on the matrices, none on the norm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.schedule.peak_lr, betas=cfg.optim.betas,
                             eps=cfg.optim.eps, fused=cfg.fast.fused_adamw)


# Fields a run may change from the weights it starts from: context length and init settings.
_INIT_FROM_MAY_CHANGE = ("max_sequence_length", "init_fn", "init_cutoff_factor")


def init_from_weights(cfg: RunConfig) -> Path:
    """`train.init_from`, checked to hold this run's model (context length and init may differ)."""
    source = Path(cfg.train.init_from)
    differences = read_model_config(source).differences(cfg.model, ignore=_INIT_FROM_MAY_CHANGE)
    if differences:
        raise ConfigError(f"train.init_from: {source} holds another model (its config.yaml vs this "
                          f"run):\n  model." + "\n  model.".join(differences))
    return source


def build_model(cfg: RunConfig, ds_config: dict) -> tuple[torch.nn.Module, object]:
    """This run's model for this rank and the `mpu` adapter (`parallel.build.build_rank_model`),
    from the run's model, parallel, memory and fast-path sections; a pipeline stage's loss is the
    training step's (`pipeline_loss`)."""
    return build_rank_model(cfg.model, cfg.parallel, ds_config=ds_config, seed=cfg.train.seed,
                            attention_backend=cfg.train.attention_backend,
                            activation_checkpointing=cfg.memory.activation_checkpointing,
                            loss_chunk_tokens=cfg.memory.loss_chunk_tokens,
                            pointwise="compiled" if cfg.fast.compile_pointwise else "eager",
                            fuse_projections=cfg.fast.fuse_projections, loss_from_ce=pipeline_loss)


def build_engine(cfg: RunConfig, ds_config: dict, weights: Path | None = None):
    """This rank's model (TP shard, ZeRO-3 partitions) in a DeepSpeed engine with its optimizer.

    `weights` (a checkpoint's whole weights) are loaded before the engine exists: DeepSpeed's
    optimizer copies the module's weights into its own (fp32, partitioned) master copies at
    initialisation, and a later write to the module would be overwritten by the first step."""
    model, mpu = build_model(cfg, ds_config)
    if weights is not None:
        load_weights_only(model, weights)
    return ds.initialize(model, build_optimizer(model, cfg), ds_config, mpu=mpu)

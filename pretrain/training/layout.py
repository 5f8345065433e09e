"""The run's rank layout and memory plan, resolved from the config before anything is allocated.

A launch first turns (config, world size) into a layout: tensor-, pipeline- and data-parallel
sizes, micro and global batch, gradient accumulation. A world that TP x PP does not divide, or a
global batch that micro x DP does not divide, stops here with the fix. The same layout gives the
DeepSpeed config and the per-device memory estimate that every launch prints and `--dry-run` prints
alone; with pipeline stages it also prints which blocks each stage holds and each stage's
estimate (the plan shown is the most loaded stage's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from parallel.engine import use_bf16
from parallel.engine_config import deepspeed_config
from parallel.memory_plan import GiB, MemoryEstimate, estimate_stages
from parallel.topology import describe_stages
from pretrain.training.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Layout:
    world_size: int
    tensor_parallel: int
    data_parallel: int
    micro_batch_size: int
    global_batch_size: int
    grad_accum: int
    pipeline_parallel: int = 1
    fused_projections: bool = False  # how the optimizer state holds q/k/v and gate/up

    def describe(self) -> str:
        pp = f" x PP {self.pipeline_parallel}" if self.pipeline_parallel > 1 else ""
        return (f"world {self.world_size} = TP {self.tensor_parallel} x DP {self.data_parallel}{pp} | "
                f"global batch {self.global_batch_size} = micro {self.micro_batch_size} x DP "
                f"{self.data_parallel} x accumulation {self.grad_accum}")

    def checkpoint_key(self) -> dict[str, int]:
        """What a checkpoint records of the layout: resuming restores the full state only into
        the same one. The pipeline size appears only above 1 and fused projections only when
        on, as in checkpoints written before either existed."""
        key = {"tensor_parallel": self.tensor_parallel, "data_parallel": self.data_parallel}
        if self.pipeline_parallel > 1:
            key["pipeline_parallel"] = self.pipeline_parallel
        if self.fused_projections:
            key["fused_projections"] = True
        return key


def resolve_layout(cfg: RunConfig, world_size: int) -> Layout:
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    if world_size < 1 or world_size % (tp * pp):
        fields, sizes = ("parallel.tensor_parallel", f"TP {tp}") if pp == 1 else (
            "parallel.tensor_parallel / parallel.pipeline_parallel", f"TP {tp} x PP {pp}")
        raise ConfigError(f"{fields}: world size {world_size} is not divisible by {sizes}; launch "
                          f"a multiple of {tp * pp} ranks (e.g. --num_gpus) or change "
                          f"{'TP' if pp == 1 else 'TP or PP'}")
    dp = world_size // (tp * pp)
    micro, global_batch = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if global_batch % (micro * dp):
        raise ConfigError(f"train.global_batch_size: {global_batch} is not a multiple of "
                          f"train.micro_batch_size {micro} x data-parallel size {dp} = {micro * dp}; "
                          f"change the global batch, the micro batch or the number of ranks")
    return Layout(world_size=world_size, tensor_parallel=tp, data_parallel=dp,
                  micro_batch_size=micro, global_batch_size=global_batch,
                  grad_accum=global_batch // (micro * dp), pipeline_parallel=pp,
                  fused_projections=cfg.fast.fuse_projections)


def engine_config(cfg: RunConfig, layout: Layout) -> dict:
    return deepspeed_config(cfg.parallel, micro_batch_size=layout.micro_batch_size,
                            grad_accum_steps=layout.grad_accum,
                            bf16=use_bf16(cfg.train.precision), grad_clip=cfg.optim.grad_clip)


def memory_estimates(cfg: RunConfig, layout: Layout, *, bf16: bool) -> list[MemoryEstimate]:
    """One rank's memory plan per pipeline stage (one entry without pipeline parallelism)."""
    p = cfg.parallel
    return estimate_stages(
        cfg.model, tensor_parallel=layout.tensor_parallel, data_parallel=layout.data_parallel,
        zero_stage=p.zero_stage, micro_batch_size=layout.micro_batch_size,
        seq_len=cfg.data.seq_len, bf16=bf16,
        activation_checkpointing=cfg.memory.activation_checkpointing,
        loss_chunk_tokens=cfg.memory.loss_chunk_tokens, prefetch_bucket_size=p.prefetch_bucket_size,
        reduce_bucket_size=p.reduce_bucket_size, hpz_partition_size=p.hpz_partition_size,
        pipeline_parallel=layout.pipeline_parallel, grad_accum=layout.grad_accum)


def gpu_budget_bytes(cfg: RunConfig) -> int:
    """The device memory the plan must fit (`memory.gpu_memory_gib`)."""
    return int(cfg.memory.gpu_memory_gib * GiB)


def launch_report(cfg: RunConfig, layout: Layout, estimates: list[MemoryEstimate]) -> str:
    """What every launch prints: the layout and the memory plan (the most loaded pipeline
    stage's, with every stage's total) against the device budget `memory.gpu_memory_gib`, which
    is the GPU the plan is for even when this run is on CPU (the report then says so)."""
    worst = max(range(len(estimates)), key=lambda stage: estimates[stage].total)
    stages = []
    if layout.pipeline_parallel > 1:
        totals = " | ".join(f"stage {stage}: {e.total / GiB:.2f}" for stage, e in enumerate(estimates))
        stages = [f"pipeline: {describe_stages(cfg.model.n_layers, layout.pipeline_parallel)}",
                  f"memory per stage in GiB (1F1B: stage s keeps min({layout.pipeline_parallel} - s, "
                  f"{layout.grad_accum}) micro-batches in flight): {totals}"]
    return "\n".join([
        f"layout: {layout.describe()}",
        *stages,
        f"memory plan per device{f' (stage {worst}, the most loaded)' if stages else ''} (activation "
        f"checkpointing {cfg.memory.activation_checkpointing}, "
        f"loss chunk {cfg.memory.loss_chunk_tokens or 'whole micro-batch'}, "
        f"seq {cfg.data.seq_len}):",
        estimates[worst].table(gpu_budget_bytes(cfg)),
        *([] if torch.cuda.is_available() else
          [f"(no GPU here: the plan is checked against memory.gpu_memory_gib = {cfg.memory.gpu_memory_gib} GiB, "
           f"the GPU it is for; set it to your device's memory)"]),
    ])


def deepspeed_config_text(ds_config: dict) -> str:
    return json.dumps(ds_config, indent=2, sort_keys=True)

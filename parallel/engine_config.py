"""The DeepSpeed engine config, generated from the run's parallel settings (one source of truth).

`ParallelConfig` is the `parallel` section of the run config; `deepspeed_config` turns it and
the batch layout into the dict handed to `deepspeed.initialize` and `deepspeed.zero.Init`:
ZeRO stage and its overlap/bucket/prefetch settings, hpZ, bf16 with fp32 gradient accumulation
and a deliberate communication dtype, clipping, and for pipeline parallelism the PipelineEngine
section (`PIPELINE_SECTION`). Keys DeepSpeed has that the project does not model pass through
`parallel.deepspeed` and are merged last.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

# The PipelineEngine's activations cross stage boundaries whole: its default partitioning of
# them over the tensor-parallel group caches the first micro-batch's shapes, which a micro-batch
# shortened by the 1% rule breaks (see parallel.pipeline).
PIPELINE_SECTION = {"pipe_partitioned": False, "grad_partitioned": False}


@dataclass
class ParallelConfig:
    """How the model and its training state are split over ranks (DeepSpeed + megatron-core)."""
    tensor_parallel: int = 1
    # Pipeline stages (DeepSpeed's PipelineEngine, ZeRO stage 0 or 1): the blocks are balanced
    # over them, the embedding on the first, the head and loss on the last.
    pipeline_parallel: int = 1
    zero_stage: int = 3
    # ZeRO-3: build the model already partitioned (deepspeed.zero.Init): no rank holds it whole.
    zero_init: bool = True
    # dtype of the gradient reduce-scatter / all-reduce: fp32 is exact, bf16 halves the traffic.
    communication_dtype: str = "fp32"
    overlap_comm: bool = True
    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    # hpZ (ZeRO++): a second copy of the bf16 weights partitioned within groups of this many
    # ranks (e.g. the GPUs of a node), so forward/backward all-gathers stay inside the group.
    hpz_partition_size: int = 1
    # Seconds a rank keeps trying to reach MASTER_ADDR:MASTER_PORT before it gives up.
    rendezvous_timeout_s: float = 300.0
    # The process group's timeout: a collective waiting this long for a peer (dead or hung) fails
    # and the rank exits with code 6. Longer than any barrier a rank legitimately waits at
    # (rank 0 preparing data, saving a checkpoint); torch's default for gloo.
    collective_timeout_s: float = 1800.0
    # Extra DeepSpeed config keys merged over the generated ones (nested mappings merge).
    deepspeed: dict = field(default_factory=dict)

    def problems(self) -> list[str]:
        """One 'parallel.<field>: ...' line per invalid value or combination of this section's
        values (the model's split over tensor_parallel is checked with the run's config)."""
        out = []
        if self.zero_stage not in (0, 1, 2, 3):
            out.append(f"parallel.zero_stage: {self.zero_stage} is not 0, 1, 2 or 3")
        if self.communication_dtype not in ("fp32", "bf16"):
            out.append(f"parallel.communication_dtype: {self.communication_dtype!r} is not fp32 or bf16")
        for name in ("reduce_bucket_size", "prefetch_bucket_size", "max_live_parameters",
                     "hpz_partition_size", "collective_timeout_s"):
            if getattr(self, name) <= 0:
                out.append(f"parallel.{name}: must be positive, got {getattr(self, name)}")
        if self.param_persistence_threshold < 0 or self.rendezvous_timeout_s <= 0:
            out.append("parallel.param_persistence_threshold must be >= 0 and "
                       "parallel.rendezvous_timeout_s > 0")
        pp = self.pipeline_parallel
        if pp < 1:
            out.append(f"parallel.pipeline_parallel: must be >= 1, got {pp}")
        elif pp > 1 and self.zero_stage > 1:
            out.append(f"parallel.zero_stage: {self.zero_stage} with parallel.pipeline_parallel {pp}; "
                       f"DeepSpeed's PipelineEngine accepts ZeRO stage 0 or 1 only: set "
                       f"parallel.zero_stage: 1 (the optimizer states stay partitioned over the "
                       f"data-parallel ranks)")
        if self.tensor_parallel < 1:
            out.append(f"parallel.tensor_parallel: must be >= 1, got {self.tensor_parallel}")
        return out


def merged(base: dict, extra: dict) -> dict:
    """`base` with `extra` merged in: nested mappings merge key by key, other values replace."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(parallel: ParallelConfig, *, micro_batch_size: int, grad_accum_steps: int,
                     bf16: bool, grad_clip: float) -> dict:
    # the PipelineEngine schedules its own gradient reductions (DeepSpeed turns overlap off)
    overlap = parallel.overlap_comm and parallel.pipeline_parallel == 1
    zero = {"stage": parallel.zero_stage, "overlap_comm": overlap,
            "contiguous_gradients": True, "reduce_scatter": True,
            "reduce_bucket_size": parallel.reduce_bucket_size}
    if parallel.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = parallel.reduce_bucket_size
    if parallel.zero_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": parallel.prefetch_bucket_size,
            "stage3_param_persistence_threshold": parallel.param_persistence_threshold,
            "stage3_max_live_parameters": parallel.max_live_parameters,
            "stage3_max_reuse_distance": parallel.max_live_parameters,
            # Checkpoints keep the sharded fp32 state; export gathers weights itself.
            "stage3_gather_16bit_weights_on_model_save": False,
            "zero_hpz_partition_size": parallel.hpz_partition_size,
        })
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "communication_data_type": parallel.communication_dtype,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if parallel.pipeline_parallel > 1:
        cfg["pipeline"] = dict(PIPELINE_SECTION)
    if bf16:
        cfg["bf16"] = {"enabled": True}
        # bf16 gradient accumulation diverges; accumulate (and reduce) in fp32.
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return merged(cfg, parallel.deepspeed)

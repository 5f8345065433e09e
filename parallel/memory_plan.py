"""Per-GPU memory estimate for a training layout, printed at launch and by `--dry-run`.

The 8B recipe must fit 80 GB GPUs, and whether it does is decided by the layout: the ZeRO stage
and data-parallel degree (model states), activation checkpointing (activations) and the loss
chunk (the vocab-wide fp32 tensors of the LM head). A wrong choice otherwise shows up as an
out-of-memory error minutes into a multi-node launch; this module shows, before anything is
allocated, where one rank's memory goes and whether it fits.

Tensors are counted from the model as `parallel/model.py` computes it. The terms are summed as
if all were live at once (a slight overestimate: the head's working set and a block's recompute
never coexist). Not counted: the CUDA context, allocator fragmentation, communication buffers
other than ZeRO-3's, and kernel workspaces, so leave a few GiB of headroom.

With pipeline stages each stage is estimated apart (its blocks, the embedding on the first, the
final norm and head on the last, and the micro-batches DeepSpeed's 1F1B schedule keeps in
flight there), and the plan is the most loaded stage's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from parallel.model_config import ModelConfig
from parallel.topology import stage_blocks

GiB = 1 << 30
# Activation checkpointing modes (parallel.model implements them): keep everything, keep matmul
# and attention outputs, keep only each block's input.
CHECKPOINTING = ("none", "selective", "full")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds, by component (the rules are in `estimate_memory`)."""

    params: int
    gradients: int
    optimizer: int
    gathered_params: int
    activations: int
    head: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def fits(self, gpu_bytes: int) -> bool:
        return self.total <= gpu_bytes

    def table(self, gpu_bytes: int | None = None) -> str:
        """One row per component and the total, in GiB; with gpu_bytes, a last 'fits' line."""
        rows = [(f.name, getattr(self, f.name)) for f in fields(self)] + [("total", self.total)]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'component':<{width}}  {'GiB':>8}"]
        lines += [f"{name:<{width}}  {value / GiB:8.2f}" for name, value in rows]
        if gpu_bytes is not None:
            margin = (gpu_bytes - self.total) / GiB
            verdict = (f"yes (headroom {margin:.1f} GiB)" if self.fits(gpu_bytes)
                       else f"NO (short by {-margin:.1f} GiB)")
            lines.append(f"fits {gpu_bytes / GiB:.1f} GiB: {verdict}")
        return "\n".join(lines)


def _block_parameter_count(model: ModelConfig) -> int:
    d, f = model.d_model, model.mlp_hidden_size
    kv = model.n_kv_heads * model.head_dim
    # q_proj and attn_out d*d, k_proj and v_proj d*kv, three SwiGLU matrices, two norms.
    return 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d


def stage_parameter_count(model: ModelConfig, n_blocks: int, first: bool, last: bool) -> int:
    """Parameters of a pipeline stage with `n_blocks` blocks: the embedding on the first, the
    final norm and (untied) head on the last."""
    v, d = model.vocab_size, model.d_model
    head = 0 if model.weight_tying else v * d
    return n_blocks * _block_parameter_count(model) + (v * d if first else 0) + ((head + d) if last else 0)


def parameter_count(model: ModelConfig) -> int:
    """Exact parameter count of `LLaDAModel(model)` (no biases; the head only when untied)."""
    return stage_parameter_count(model, model.n_layers, first=True, last=True)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _norm_saved(d: int, b: int) -> int:
    """RMSNorm's saved bytes per token: fp32 input copy and rsqrt, the normalised cast (for the
    weight multiply) and its output (the next matmul's input)."""
    return 4 * d + 4 + 2 * b * d


def _saved_per_token(model: ModelConfig, tp: int, b: int) -> tuple[int, int]:
    """Bytes one block saves for backward per token: (all of it, what selective keeps).

    Follows `LLaDABlock.forward` with no sequence parallelism: width-d_model tensors are whole on
    every TP rank; q/k/v, the attention output and the ffn-wide tensors are split by TP.
    b is the activation dtype's size.
    """
    d = model.d_model
    q = d // tp
    kv = model.n_kv_heads * model.head_dim // tp
    f = _ceil_div(model.mlp_hidden_size, tp)
    lse = 4 * (model.n_heads // tp)  # attention's fp32 log-sum-exp, one per head
    # RoPE multiplies by constant cos/sin tables, so it saves nothing of its own.
    everything = (2 * _norm_saved(d, b)
                  + b * (q + 2 * kv)  # q, k after RoPE and v, kept by attention
                  + b * q + lse       # attention output = attn_out input
                  + 4 * b * f)        # ff_proj out (SiLU input), SiLU out, up_proj out, product
    # Selective: matmul and attention outputs (q, k, v, attention, attn_out, ff_proj, up_proj,
    # ff_out) plus the block input that the recompute of the rest starts from.
    selective = b * (d + q + 2 * kv + q + d + 2 * f + d) + lse
    return everything, selective


def _check(name: str, value: object, ok: bool, need: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {need}, got {value!r}")


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def estimate_memory(model: ModelConfig, **layout) -> MemoryEstimate:
    """Peak bytes on one rank: the most loaded pipeline stage's `estimate_stages` (the only
    one without pipeline parallelism)."""
    return max(estimate_stages(model, **layout), key=lambda e: e.total)


def estimate_stages(model: ModelConfig, *, tensor_parallel: int, data_parallel: int,
                    zero_stage: int, micro_batch_size: int, seq_len: int, bf16: bool,
                    activation_checkpointing: str, loss_chunk_tokens: int,
                    prefetch_bucket_size: int, reduce_bucket_size: int,
                    hpz_partition_size: int = 1, pipeline_parallel: int = 1,
                    grad_accum: int = 1) -> list[MemoryEstimate]:
    """Peak bytes on one rank of each pipeline stage of a tp x dp x pp layout.

    Model states per parameter of the rank's TP share (norm weights, replicated in fact, are
    counted as split: 0.003% of the 8B model): bf16 keeps 2 B params, 4 B gradients (fp32
    accumulation) and 12 B optimizer (fp32 master, AdamW m and v); fp32 keeps 4, 4 and 8. ZeRO
    splits them over data_parallel: stage >= 1 the optimizer, >= 2 the gradients, 3 the params.

    ZeRO-3 also gathers parameters: the largest module (embedding/head or a block's largest
    linear) plus the prefetch bucket, in the parameter dtype, a 4 B reduce bucket, and with
    hpZ a secondary parameter copy split over hpz_partition_size ranks.

    Activations, for T = micro_batch_size x seq_len tokens: "none" keeps every block's saved
    tensors; "full" keeps each block's input plus one block's saved tensors while it is
    recomputed; "selective" keeps matmul and attention outputs per block plus that working set.
    The final norm's saved tensors are added in every mode.

    The head term is one loss chunk's logits (model dtype), their fp32 copy, the saved softmax
    and the gradient, all vocab_size / tensor_parallel wide; loss_chunk_tokens 0 means one
    chunk of the whole micro-batch. Bucket sizes are in elements, as in the DeepSpeed config.

    Pipeline stage s of P holds its own parameters (`stage_parameter_count`) and, under the
    1F1B schedule, the saved tensors of min(P - s, grad_accum) micro-batches (the first stage
    the most); the recompute working set, the final norm and the head count once, on the stages
    that run them.
    """
    problems = model.problems()
    if problems:
        raise ValueError("; ".join(problems))
    for name, value, minimum in (
            ("tensor_parallel", tensor_parallel, 1), ("data_parallel", data_parallel, 1),
            ("micro_batch_size", micro_batch_size, 1), ("seq_len", seq_len, 1),
            ("loss_chunk_tokens", loss_chunk_tokens, 0),
            ("prefetch_bucket_size", prefetch_bucket_size, 0),
            ("reduce_bucket_size", reduce_bucket_size, 0),
            ("hpz_partition_size", hpz_partition_size, 1)):
        _check(name, value, _is_int(value, minimum), f"must be an int >= {minimum}")
    _check("tensor_parallel", tensor_parallel,
           model.n_heads % tensor_parallel == 0 and model.n_kv_heads % tensor_parallel == 0,
           f"must divide model.n_heads {model.n_heads} and model.n_kv_heads {model.n_kv_heads}")
    _check("zero_stage", zero_stage, zero_stage in (0, 1, 2, 3), "must be 0, 1, 2 or 3")
    _check("activation_checkpointing", activation_checkpointing,
           activation_checkpointing in CHECKPOINTING, f"must be one of {', '.join(CHECKPOINTING)}")
    for name, value in (("pipeline_parallel", pipeline_parallel), ("grad_accum", grad_accum)):
        _check(name, value, _is_int(value, 1), "must be an int >= 1")
    plan = stage_blocks(model.n_layers, pipeline_parallel)
    return [_estimate_stage(model, len(blocks), first=stage == 0, last=stage == len(plan) - 1,
                            in_flight=min(len(plan) - stage, grad_accum), tp=tensor_parallel,
                            dp=data_parallel, zero_stage=zero_stage,
                            tokens=micro_batch_size * seq_len, bf16=bf16,
                            activation_checkpointing=activation_checkpointing,
                            loss_chunk_tokens=loss_chunk_tokens,
                            prefetch_bucket_size=prefetch_bucket_size,
                            reduce_bucket_size=reduce_bucket_size,
                            hpz_partition_size=hpz_partition_size)
            for stage, blocks in enumerate(plan)]


def _estimate_stage(model: ModelConfig, n_blocks: int, *, first: bool, last: bool, in_flight: int,
                    tp: int, dp: int, zero_stage: int, tokens: int, bf16: bool,
                    activation_checkpointing: str, loss_chunk_tokens: int,
                    prefetch_bucket_size: int, reduce_bucket_size: int,
                    hpz_partition_size: int) -> MemoryEstimate:
    b = 2 if bf16 else 4
    n = _ceil_div(stage_parameter_count(model, n_blocks, first, last), tp)
    params, gradients, optimizer = n * b, n * 4, n * (12 if bf16 else 8)
    if zero_stage >= 1:
        optimizer = _ceil_div(optimizer, dp)
    if zero_stage >= 2:
        gradients = _ceil_div(gradients, dp)
    gathered = 0
    if zero_stage == 3:
        params = _ceil_div(params, dp)
        d = model.d_model
        largest = max(model.vocab_size * d if first or last else 0, d * d, d * model.mlp_hidden_size)
        # Buckets never hold more than this rank's share of the model.
        gathered = (b * (_ceil_div(largest, tp) + min(prefetch_bucket_size, n))
                    + 4 * min(reduce_bucket_size, n))
        if hpz_partition_size > 1:
            gathered += b * _ceil_div(n, hpz_partition_size)

    everything, selective = _saved_per_token(model, tp, b)
    kept = {"none": everything, "selective": selective, "full": b * model.d_model}
    recompute = 0 if activation_checkpointing == "none" else everything
    final_norm = _norm_saved(model.d_model, b) if last else 0
    activations = tokens * (in_flight * n_blocks * kept[activation_checkpointing] + recompute + final_norm)

    # Computing the head only at masked positions does not bound the peak (at t near 1 every
    # token is masked), so the bound is one loss chunk, or the whole micro-batch unchunked.
    chunk = loss_chunk_tokens if 0 < loss_chunk_tokens < tokens else tokens
    head = chunk * _ceil_div(model.vocab_size, tp) * (b + 4 + 4 + 4) if last else 0

    return MemoryEstimate(params=params, gradients=gradients, optimizer=optimizer,
                          gathered_params=gathered, activations=activations, head=head)

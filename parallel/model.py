"""The LLaDA transformer: one model module for the MDM and its autoregressive baseline.

A Llama-3-style stack with bidirectional attention, RMSNorm computed in fp32 and cast back
before the weight multiplies, SwiGLU, NeoX half-split RoPE in fp32, an untied LM head, no
biases and no timestep input. Pretraining and SFT use no attention mask; an optional one exists
for batched inference over left-padded prompts (padding keys are hidden and each row's RoPE
positions start at its first real token, as in the exported Hugging Face code). Parameters
carry the released checkpoints' names (`model.transformer.blocks.{i}.q_proj.weight`, ...), so
checkpoints, export and import never rename; the one exception, the fast path's fused
projections, is mapped back to those names by `parallel.fused_projections`. Layers come from a
factory (`parallel.layers`), so the same module runs dense in one process or tensor-parallel;
the module itself makes no parallelism decisions. Given targets it returns per-token
cross-entropy through the head (chunked, vocabulary-parallel under TP) instead of logits, and it
applies the configured activation checkpointing. For fast decoding it also runs with a KV cache (`past_key_values`,
a `parallel.attention.KVCache`): a whole forward fills it, and a forward over a window of the
sequence (`cache_position`) recomputes only the window against it. `logits_positions` applies
the final norm and the head at selected positions only (a sampler needs the current block's).
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from parallel.attention import KVCache, attention
from parallel.cross_entropy import chunked_token_cross_entropy
from parallel.fused_ops import EAGER, PointwiseOps, pointwise_ops
from parallel.fused_projections import ModelParameter, fused_column, model_parameters
from parallel.layers import DenseLayers, TruncatedNormalInit
from parallel.memory_plan import CHECKPOINTING
from parallel.model_config import ModelConfig


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back to the input dtype, then multiply by the weight."""

    pointwise: PointwiseOps = EAGER  # set by `use_pointwise`

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding:
    """NeoX-style rotary embedding: dimension i rotates with dimension i + head_dim/2, in fp32."""

    pointwise: PointwiseOps = EAGER  # set by `use_pointwise`

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [...] -> fp32 angles [..., head_dim] (dims i and i + head_dim/2 share one)."""
        inv_freq = 1.0 / (self.theta ** (torch.arange(
            0, self.head_dim, 2, device=positions.device, dtype=torch.float32) / self.head_dim))
        freqs = positions.float()[..., None] * inv_freq
        return torch.cat((freqs, freqs), dim=-1)

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0..seq_len-1, cached: cos, sin of shape [1, s, 1, head_dim]."""
        key = (seq_len, str(device))
        if key not in self._cache:
            angles = self._angles(torch.arange(seq_len, device=device))[None, :, None, :]
            self._cache[key] = (angles.cos(), angles.sin())
        return self._cache[key]

    def apply(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: [b, s, h, head_dim]; positions: None (0..s-1) or per-row [b, s]. Returns x
        rotated, in x's dtype."""
        if positions is None:
            cos, sin = self.cos_sin(x.shape[1], x.device)
        else:
            angles = self._angles(positions)[:, :, None, :]
            cos, sin = angles.cos(), angles.sin()
        return self.pointwise.rotary(x, cos, sin)


class LLaDABlock(nn.Module):
    """Pre-norm attention and SwiGLU MLP with residuals; names as in the released blocks, or
    with `fuse_projections` one `qkv_proj` and one `gate_up_proj` in place of q/k/v and
    gate/up (`parallel.fused_projections` maps them back to the released names)."""

    pointwise: PointwiseOps = EAGER  # set by `use_pointwise`

    def __init__(self, config: ModelConfig, layers: DenseLayers, rope: RotaryEmbedding,
                 attention_backend: str, layer: int, init: TruncatedNormalInit | None,
                 fuse_projections: bool = False):
        super().__init__()
        self.config = config
        self.rope = rope
        self.attention_backend = attention_backend
        tp = layers.tp_size
        self.local_heads = config.n_heads // tp
        self.local_kv_heads = config.n_kv_heads // tp
        d, ffn, kv_dim = config.d_model, config.mlp_hidden_size, config.n_kv_heads * config.head_dim

        def draw(fan_in: int, depth_scaled: bool = False):
            # mitchell: output projections further / sqrt(2 (layer + 1))
            return init(fan_in, 2 * (layer + 1) if depth_scaled else 1.0) if init else None

        def fused_layer(name: str, rows: list[int]) -> nn.Module:
            return fused_column(layers, d, name, rows, [draw(d) for _ in rows] if init else None)

        self.fused = fuse_projections
        self.qkv_split = [d // tp, kv_dim // tp, kv_dim // tp]
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        if fuse_projections:
            self.qkv_proj = fused_layer("qkv_proj", [d, kv_dim, kv_dim])
        else:
            self.q_proj = layers.column(d, d, draw(d))
            self.k_proj = layers.column(d, kv_dim, draw(d))
            self.v_proj = layers.column(d, kv_dim, draw(d))
        self.attn_out = layers.row(d, d, draw(d, depth_scaled=True))
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        if fuse_projections:
            self.gate_up_proj = fused_layer("gate_up_proj", [ffn, ffn])
        else:
            self.ff_proj = layers.column(d, ffn, draw(d))  # gate (SiLU)
            self.up_proj = layers.column(d, ffn, draw(d))
        self.ff_out = layers.row(ffn, d, draw(ffn, depth_scaled=True))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, kv=None) -> torch.Tensor:
        """key_mask: None or bool [b, keys], True at real keys; positions: None (0..s-1) or the
        RoPE positions of x's rows [b or 1, s]; kv: None, or (keys, values) -> the (keys,
        values) to attend to (a KV cache's `fill` or `window` for this layer)."""
        b, s, _ = x.shape
        hd = self.config.head_dim
        h = self.attn_norm(x)
        if self.fused:
            q, k, v = self.qkv_proj(h).split(self.qkv_split, dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = self.rope.apply(q.view(b, s, self.local_heads, hd), positions)
        k = self.rope.apply(k.view(b, s, self.local_kv_heads, hd), positions)
        v = v.view(b, s, self.local_kv_heads, hd)
        if kv is not None:
            k, v = kv(k, v)
        a = attention(q, k, v, causal=self.config.causal, backend=self.attention_backend,
                      key_mask=key_mask)
        x = x + self.attn_out(a.reshape(b, s, self.local_heads * hd))
        h = self.ff_norm(x)
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1) if self.fused else (self.ff_proj(h), self.up_proj(h))
        return x + self.ff_out(self.pointwise.swiglu(gate, up))


def weight_init(config: ModelConfig, init_seed: int | None) -> TruncatedNormalInit | None:
    """The draw every weight comes from, in construction order (None: weights to be loaded)."""
    if init_seed is None:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return TruncatedNormalInit(torch.Generator(device=device).manual_seed(init_seed),
                               config.init_cutoff_factor)


# The pieces in construction order (embedding, blocks, final norm, head): the whole model below
# and the pipeline stages of `parallel.pipeline` build them through these functions, so both
# draw the same weights.

def token_embedding(config: ModelConfig, layers: DenseLayers, init: TruncatedNormalInit | None) -> nn.Module:
    return layers.embedding(config.vocab_size, config.d_model, init(config.d_model) if init else None)


def final_norm(config: ModelConfig) -> RMSNorm:
    return RMSNorm(config.d_model, config.rms_norm_eps)


def lm_head(config: ModelConfig, layers: DenseLayers, init: TruncatedNormalInit | None,
            loss_chunk_tokens: int) -> nn.Module:
    d = config.d_model
    return layers.head(d, config.vocab_size, init(d) if init else None, chunk_tokens=loss_chunk_tokens)


class _Transformer(nn.Module):
    def __init__(self, config: ModelConfig, layers: DenseLayers, attention_backend: str,
                 init: TruncatedNormalInit | None, loss_chunk_tokens: int, fuse_projections: bool):
        super().__init__()
        rope = RotaryEmbedding(config.head_dim, config.rope_theta)
        wte = token_embedding(config, layers, init)
        blocks = nn.ModuleList(LLaDABlock(config, layers, rope, attention_backend, i, init, fuse_projections)
                               for i in range(config.n_layers))
        self.transformer = nn.ModuleDict(dict(wte=wte, blocks=blocks, ln_f=final_norm(config)))
        if not config.weight_tying:
            self.transformer["ff_out"] = lm_head(config, layers, init, loss_chunk_tokens)


def _save_matmuls_and_attention(ctx, op, *args, **kwargs):
    """Selective checkpointing: keep what is expensive to recompute, recompute the rest.

    Not usable under ZeRO-3: its parameter gathering runs tensor operations inside the block
    that a selective recomputation cannot replay (the config refuses the combination)."""
    if op in _EXPENSIVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_EXPENSIVE_OPS = {
    # Tensor-parallel all-reduces run in place on a matmul output: recomputing them would
    # reduce the saved (already reduced) output a second time.
    torch.ops.c10d.allreduce_.default,
    torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def use_pointwise(module: nn.Module, ops: PointwiseOps) -> None:
    """Run the norms, RoPE and SwiGLU of every block and norm under `module` with `ops`."""
    for m in module.modules():
        if isinstance(m, (RMSNorm, LLaDABlock)):
            m.pointwise = ops
        if isinstance(m, LLaDABlock):
            m.rope.pointwise = ops


def run_block(block: nn.Module, x: torch.Tensor, key_mask: torch.Tensor | None,
              positions: torch.Tensor | None, activation_checkpointing: str) -> torch.Tensor:
    """One block's forward under the configured activation checkpointing (none when no
    gradient is recorded)."""
    if activation_checkpointing == "none" or not torch.is_grad_enabled():
        return block(x, key_mask, positions)
    if activation_checkpointing == "full":
        return checkpoint(block, x, key_mask, positions, use_reentrant=False)
    return checkpoint(block, x, key_mask, positions, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts,
                                                   _save_matmuls_and_attention))


class LLaDAModel(nn.Module):
    """Token ids [b, s] -> logits [b, s, vocab] in the model's dtype (a bf16 model's are bf16, as
    the official model's: the sampler's confidences follow them), or fp32 per-token cross-entropy [b, s] when
    `targets` are given (through the chunked, possibly vocabulary-parallel head).
    `attention_mask` (None or [b, s], 1 at real tokens) is for batched inference over padded
    rows: each row's real tokens then compute what they compute alone.

    KV cache (inference, bidirectional models, any tensor-parallel size): with `past_key_values`
    an empty `KVCache`, a forward over the whole sequence also fills it with every layer's keys
    and values (after RoPE). With a filled one, `input_ids` [b, w] are the positions
    `cache_position` (consecutive, e.g. arange(start, start + w)) of that sequence: only they
    are recomputed, at their absolute RoPE positions, attending to every position (cached keys
    and values elsewhere, their own fresh ones, which replace the cached ones); the logits are
    the window's [b, w, vocab], and `attention_mask` is still the whole sequence's [b, s].

    logits_positions (inference, with or without a cache): None, a slice or a 1-D LongTensor of
    indices along input_ids' sequence dimension (the window's, with a cache window); the final
    norm and the head (vocabulary shards gathered under TP) run only there, so the logits are
    [b, len(positions), vocab] and equal the whole logits at those positions.

    init_seed: weights drawn from a generator with this seed (the same weights at every
    tensor-parallel size); None leaves them to be loaded. After a forward with targets,
    `max_logit` holds the largest logit scored (this rank's vocabulary shard under TP).
    activation_checkpointing: "none", "full" (keep only each block's input) or "selective" (keep
    matmul and attention outputs, recompute norms, RoPE and activations). loss_chunk_tokens:
    positions per head chunk (0: all at once). pointwise: "eager" or "compiled"
    (`parallel.fused_ops`: RMSNorm, RoPE and SwiGLU each fused by torch.compile with dynamic
    shapes). fuse_projections: one q/k/v and one gate/up matmul per block
    (`parallel.fused_projections`; the same weights and the released names in every
    whole-weights path).
    """

    def __init__(self, config: ModelConfig, layers: DenseLayers | None = None,
                 attention_backend: str = "auto", init_seed: int | None = 0,
                 activation_checkpointing: str = "none", loss_chunk_tokens: int = 0,
                 pointwise: str = "eager", fuse_projections: bool = False):
        super().__init__()
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        if activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"activation_checkpointing: {activation_checkpointing!r} is not one "
                             f"of {', '.join(CHECKPOINTING)}")
        self.config = config
        self.layers = layers or DenseLayers()
        self.activation_checkpointing = activation_checkpointing
        self.model = _Transformer(config, self.layers, attention_backend,
                                  weight_init(config, init_seed), loss_chunk_tokens, fuse_projections)
        use_pointwise(self, pointwise_ops(pointwise))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    def whole_model_parameters(self) -> Iterator[ModelParameter]:
        """Every parameter under its whole-model name, here the module's own (a pipeline stage
        set, `parallel.pipeline.LLaDAPipeline`, maps its names to these), with the released
        tensors a fused layer stands for (`parallel.fused_projections`)."""
        return model_parameters(self)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                past_key_values: KVCache | None = None,
                cache_position: torch.Tensor | None = None,
                logits_positions: slice | torch.Tensor | None = None) -> torch.Tensor:
        t = self.model.transformer
        if targets is not None and logits_positions is not None:
            raise ValueError("logits_positions selects logits: with targets the loss covers every "
                             "position (weight positions through loss_mask)")
        if past_key_values is None:
            if cache_position is not None:
                raise ValueError("cache_position places a window in a KV cache: pass past_key_values too")
            key_mask, positions = _padding(attention_mask, input_ids.shape, input_ids.device)
            x = t.wte(input_ids)
            for block in t.blocks:
                x = run_block(block, x, key_mask, positions, self.activation_checkpointing)
        else:
            if targets is not None:
                raise ValueError("a KV cache is for inference: pass targets or past_key_values, not both")
            x = self._cached_blocks(input_ids, attention_mask, past_key_values, cache_position)
        x = t.ln_f(at_positions(x, logits_positions))
        if self.config.weight_tying:
            logits_fn = functools.partial(F.linear, weight=t.wte.weight)
            if targets is None:
                return logits_fn(x)
            ce, self.max_logit = chunked_token_cross_entropy(
                x, targets, loss_mask, logits_fn=logits_fn, chunk_tokens=0,
                ce_fn=lambda logits, y: F.cross_entropy(logits.float(), y, reduction="none"))
            return ce
        if targets is None:
            return self.layers.gather_vocab(t.ff_out(x))
        ce = t.ff_out(x, targets=targets, loss_mask=loss_mask)
        self.max_logit = t.ff_out.max_logit
        return ce

    def _cached_blocks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       cache: KVCache, cache_position: torch.Tensor | None) -> torch.Tensor:
        """The blocks' output for input_ids, filling the cache (whole sequence) or reading it
        (a window at cache_position)."""
        if self.config.causal:
            raise ValueError("the KV cache serves bidirectional denoising; the autoregressive "
                             "baseline (model.causal) has none")
        b, w = input_ids.shape
        start = _window_start(cache, cache_position, input_ids)
        length = w if start is None else cache.length
        key_mask, positions = _padding(attention_mask, (b, length), input_ids.device)
        if start is not None:
            positions = (torch.arange(start, start + w, device=input_ids.device)[None] if positions is None
                         else positions[:, start:start + w])
        x = self.model.transformer.wte(input_ids)
        for layer, block in enumerate(self.model.transformer.blocks):
            kv = (functools.partial(cache.fill, layer) if start is None
                  else functools.partial(cache.window, layer, start))
            x = block(x, key_mask, positions, kv=kv)
        return x


def _window_start(cache: KVCache, cache_position: torch.Tensor | None, input_ids: torch.Tensor) -> int | None:
    """None for a whole forward that fills an empty cache; else the first position of the window
    input_ids occupies in the cached sequence (checked: consecutive, inside it, same batch)."""
    b, w = input_ids.shape
    if len(cache) == 0:
        if cache_position is not None and not torch.equal(
                cache_position.cpu(), torch.arange(w)):
            raise ValueError("an empty KV cache is filled by a forward over the whole sequence: "
                             "pass cache_position=None (or arange(seq)) with it")
        return None
    if cache_position is None:
        raise ValueError("past_key_values is already filled: pass cache_position (the window's "
                         "positions) to recompute a window against it, or a new KVCache to refill it")
    start = int(cache_position[0]) if cache_position.numel() else -1
    if (cache_position.dim() != 1 or start < 0 or start + w > cache.length
            or not torch.equal(cache_position.cpu(), torch.arange(start, start + w))):
        raise ValueError(f"cache_position must be the {w} consecutive positions of input_ids inside the "
                         f"cached sequence of {cache.length}, e.g. arange(start, start + {w})")
    if cache.keys[0].shape[0] != b:
        raise ValueError(f"the KV cache holds {cache.keys[0].shape[0]} rows, input_ids {b}: "
                         f"a cache serves the batch that filled it")
    return start


def at_positions(x: torch.Tensor, logits_positions: slice | torch.Tensor | None) -> torch.Tensor:
    """x [b, s, ...] at logits_positions along the sequence: None (all of it), a slice or a 1-D
    LongTensor of indices."""
    if logits_positions is None:
        return x
    if isinstance(logits_positions, slice):
        return x[:, logits_positions]
    if (not isinstance(logits_positions, torch.Tensor) or logits_positions.dim() != 1
            or logits_positions.dtype != torch.long):
        got = (f"a {logits_positions.dim()}-D {logits_positions.dtype} tensor"
               if isinstance(logits_positions, torch.Tensor) else type(logits_positions).__name__)
        raise ValueError(f"logits_positions must be None, a slice or a 1-D LongTensor of sequence "
                         f"indices, got {got}")
    return x[:, logits_positions.to(x.device)]


def _padding(attention_mask: torch.Tensor | None, shape: tuple[int, int], device: torch.device):
    """attention_mask [b, s] (1 at real tokens) of a sequence of `shape` -> (key_mask, RoPE
    positions), both [b, s]; (None, None) when there is no padding, which leaves the unmasked
    computation untouched."""
    if attention_mask is None:
        return None, None
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask must be [batch, seq] = {list(shape)} with 1 "
                         f"at real tokens, got shape {list(attention_mask.shape)}")
    real = attention_mask.to(device).bool()
    empty = (~real.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask row(s) {empty} have no real token")
    if real.all():
        return None, None
    return real, (real.long().cumsum(-1) - 1).clamp(min=0)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights (the only 1-D parameters: the model has no biases) take no weight decay.

    A parameter built under deepspeed.zero.Init holds an empty partition: its real shape is
    `ds_shape`, not `shape`.
    """
    shape = getattr(param, "ds_shape", param.shape)
    return len(shape) < 2 or name.endswith("norm.weight") or ".ln_f." in name

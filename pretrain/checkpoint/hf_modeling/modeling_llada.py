"""The LLaDA masked diffusion transformer as a Hugging Face model, for `trust_remote_code` loading.

Copied beside every exported checkpoint, so it imports only `torch`, `transformers` and the
standard library, and nothing of the training stack. It computes what the training model
(`parallel/model.py`) computes, with the same parameter names: a Llama-style stack with
bidirectional attention, RMSNorm in fp32 cast back before the weight, SwiGLU, NeoX half-split
RoPE in fp32, grouped-query attention and no biases. On top it takes an `attention_mask` for
left-padded batched inference (padding keys are hidden and each row's RoPE positions start at
its first real token) and supports transformers' gradient checkpointing. It returns logits
only: the masked diffusion loss and sampling live in the training stack. Works, without
warnings, with transformers 4.46 up to (not including) 6.

The output is `LLaDAOutput`: `logits`, `cache` (the KV cache below, or None) and
`hidden_states`. Its cache field is named `cache` on every transformers version: transformers
5.24 renamed the cache field of its own output classes from `past_key_values` to `cache` and
warns when one is built or read under the old name. `out.past_key_values`, the name of the
forward argument, reads the same field as `out.cache`, without a warning, on every version.

Logits at selected positions: `logits_positions` (a 1-D LongTensor of indices, or a `slice`,
along the input's sequence dimension) applies the final norm and the head only there, so
`model(ids, logits_positions=p).logits` equals `model(ids).logits[:, p]`, [b, len(p), vocab],
without the head's cost elsewhere (a sampler reveals tokens of the current block only). With
a cache window the indices count from the window's first position, as the window's logits do.

KV cache for fast decoding (Fast-dLLM's block-wise approximate cache). Attention is
bidirectional, so a cache does not grow token by token as for an autoregressive model: it
holds every layer's keys and values (after RoPE) of the whole sequence, and a later call
recomputes a window of positions against it.

    out = model(ids, attention_mask=mask, use_cache=True)     # whole sequence [b, s]
    cache = out.past_key_values                                # an LLaDAKVCache
    out = model(ids[:, start:end], attention_mask=mask,        # mask: still the whole [b, s]
                past_key_values=cache, cache_position=torch.arange(start, end))
    out.logits                                                 # [b, end - start, vocab]
    out = model(ids[:, start:], attention_mask=mask, past_key_values=cache,
                cache_position=torch.arange(start, s), logits_positions=slice(0, end - start))
    out.logits                                                 # the same, from a longer window

The window's positions keep their absolute RoPE positions and attend to every position: to
the cached keys and values outside the window and to their own fresh ones, which replace the
cached ones. Positions outside the window are not recomputed, so their entries are stale once
the tokens they attended to change: that is the approximation; refresh with a new cache
(`use_cache=True`, or `past_key_values=LLaDAKVCache()`) and a whole forward. The cache is not
transformers' `Cache` class and does not serve `generate()`: sample with the masked diffusion
sampler (the training stack's `pretrain.diffusion.sampling`, or Fast-dLLM-style loops).
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_llada import LLaDAConfig

# Architecture fields of the released config and the values this code implements.
_SUPPORTED = {
    "alibi": (False,),
    "rope": (True,),
    "block_type": ("llama",),
    "activation_type": ("silu", "swiglu"),
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,),
    "bias_for_layer_norm": (False, None),
    "include_bias": (False,),
    "include_qkv_bias": (False,),
    "scale_logits": (False,),
    "attention_layer_norm": (False,),
    "input_emb_norm": (False,),
    "multi_query_attention": (False, None),
    "block_group_size": (1,),
}


class LLaDAKVCache:
    """Each layer's keys and values of the whole sequence, after RoPE: [b, s, kv_heads, head_dim].

    Filled by a forward over the whole sequence (`fill`, layer by layer); a forward over a window
    writes the window's fresh entries into it and attends to the whole (`window`). Inference
    only (in-place writes)."""

    def __init__(self):
        self.keys = []
        self.values = []

    def __len__(self):
        return len(self.keys)

    @property
    def length(self):
        return self.keys[0].shape[1] if self.keys else 0

    def fill(self, layer, k, v):
        if layer != len(self.keys):
            raise RuntimeError(f"LLaDAKVCache.fill: layer {layer} arrived after {len(self.keys)} filled "
                               f"layers; a cache is filled by one whole forward, in layer order")
        self.keys.append(k)
        self.values.append(v)
        return k, v

    def window(self, layer, start, k, v):
        keys, values = self.keys[layer], self.values[layer]
        keys[:, start:start + k.shape[1]] = k
        values[:, start:start + v.shape[1]] = v
        return keys, values


@dataclass
class LLaDAOutput(ModelOutput):
    """logits [b, s or len(logits_positions), vocab] in the model's dtype; the KV cache (an LLaDAKVCache) when
    one was passed or asked for; the embeddings and every block's output when asked for."""

    logits: torch.Tensor | None = None
    cache: LLaDAKVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def past_key_values(self) -> LLaDAKVCache | None:
        """The cache, under the forward argument's name (see the module docstring)."""
        return self.cache


def _check_supported(config: LLaDAConfig) -> None:
    for field, supported in _SUPPORTED.items():
        value = getattr(config, field)
        if value not in supported:
            raise ValueError(f"LLaDAConfig.{field}={value!r} is not implemented by this modeling "
                             f"code; supported: {' or '.join(repr(s) for s in supported)}")
    n_kv_heads = _n_kv_heads(config)
    if config.d_model % config.n_heads or config.n_heads % n_kv_heads:
        raise ValueError(f"n_heads {config.n_heads} must divide d_model {config.d_model}, and "
                         f"n_kv_heads {n_kv_heads} must divide n_heads")


def _n_kv_heads(config: LLaDAConfig) -> int:
    return config.n_heads if config.n_kv_heads is None else config.n_kv_heads


class LLaDARMSNorm(nn.Module):
    """Normalise in fp32, cast back to the input dtype, then multiply by the weight."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """positions: [b or 1, s] -> fp32 cos, sin of shape [b or 1, s, 1, head_dim] (NeoX layout:
    dimension i and i + head_dim/2 share an angle)."""
    inv_freq = 1.0 / (theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]
    return angles.cos(), angles.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, s, heads, head_dim], rotated in fp32 and returned in x's dtype."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-second, first), dim=-1) * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """Pre-norm bidirectional attention and SwiGLU MLP, each with a residual."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, ffn = config.d_model, config.mlp_hidden_size or config.mlp_ratio * config.d_model
        self.n_heads, self.n_kv_heads = config.n_heads, _n_kv_heads(config)
        self.head_dim = d // config.n_heads
        kv_dim = self.n_kv_heads * self.head_dim
        self.attn_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_dim, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, ffn, bias=False)  # the SiLU gate
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.ff_out = nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin, key_mask, kv=None):
        """key_mask: None (every key is real) or bool [b, 1, 1, keys], True at real keys; kv: None
        or (keys, values) -> the keys and values to attend to (a cache's fill or window)."""
        b, s, _ = x.shape
        h = self.attn_norm(x)
        q = _apply_rope(self.q_proj(h).view(b, s, self.n_heads, self.head_dim), cos, sin)
        k = _apply_rope(self.k_proj(h).view(b, s, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(h).view(b, s, self.n_kv_heads, self.head_dim)
        if kv is not None:
            k, v = kv(k, v)
        # KV head j serves query heads j*g .. j*g+g-1 (repeat_interleave semantics).
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask,
            is_causal=False, enable_gqa=self.n_kv_heads != self.n_heads)
        x = x + self.attn_out(a.transpose(1, 2).reshape(b, s, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    """Embeddings, blocks and final norm (plus the untied head, which the released checkpoints
    keep under `transformer.ff_out`): input embeddings -> final hidden states."""

    gradient_checkpointing = False  # set by transformers' gradient_checkpointing_enable

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        rows, d = config.embedding_size or config.vocab_size, config.d_model
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(rows, d),
            blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            ln_f=LLaDARMSNorm(d, config.rms_norm_eps),
        ))
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(d, rows, bias=False)

    def forward(self, x, attention_mask, output_hidden_states, cache=None, start=None,
                logits_positions=None):
        """x: [b, w, d] embeddings -> (ln_f output at logits_positions of x, all when None; the
        embeddings and every block's output when output_hidden_states, else None). Without a
        cache x is the whole sequence (w = s); with an empty cache too, and the cache is filled;
        with a filled one x is the window at positions start .. start + w of the cached
        sequence of s."""
        b, w, _ = x.shape
        s = cache.length if start is not None else w
        key_mask, positions = None, torch.arange(s, device=x.device)[None]
        if attention_mask is not None:
            if attention_mask.shape != (b, s):
                raise ValueError(f"attention_mask must be 2-D [batch, seq] = [{b}, {s}] with 1 at "
                                 f"real tokens, got shape {tuple(attention_mask.shape)}")
            real = attention_mask.to(x.device).bool()
            empty = (~real.any(-1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"attention_mask row(s) {empty} have no real token")
            if not real.all():
                key_mask = real[:, None, None, :]
                positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        if start is not None:
            positions = positions[:, start:start + w]
        cos, sin = _rope_cos_sin(positions, self.config.d_model // self.config.n_heads,
                                 self.config.rope_theta)
        hidden = (x,) if output_hidden_states else None
        for layer, block in enumerate(self.transformer.blocks):
            if cache is not None:
                kv = (functools.partial(cache.fill, layer) if start is None
                      else functools.partial(cache.window, layer, start))
                x = block(x, cos, sin, key_mask, kv=kv)
            elif self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(block.__call__, x, cos, sin, key_mask)
            else:
                x = block(x, cos, sin, key_mask)
            if output_hidden_states:
                hidden += (x,)
        return self.transformer.ln_f(_at_positions(x, logits_positions)), hidden


class LLaDAModelLM(PreTrainedModel):
    """Token ids (or embeddings) -> logits over the vocabulary (in the model's dtype), bidirectionally: the
    masked diffusion denoiser. Optionally with the window KV cache described in the module
    docstring; no loss (the masked diffusion loss belongs to the training stack)."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig):
        _check_supported(config)
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module):
        # Through `nn.init` so that transformers 5 can skip weights already loaded.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        elif isinstance(module, LLaDARMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer["wte"] = value

    def get_output_embeddings(self):
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None,
                output_hidden_states=None, return_dict=None, use_cache=None,
                past_key_values=None, labels=None, logits_positions=None, **kwargs):
        """input_ids [b, s] (or inputs_embeds [b, s, d]); attention_mask [b, s], 1 at real
        tokens and 0 at (left) padding. Returns an LLaDAOutput with logits [b, s, rows] in the model's dtype
        (at logits_positions only, when given: module docstring) and, when asked,
        hidden_states: the embeddings and each block's output (before the final norm). KV
        cache (module docstring): `use_cache=True` or an empty `past_key_values` (an
        LLaDAKVCache) fills one over the whole sequence and returns it as `cache`
        (`past_key_values`); a filled one with `cache_position` (the window's consecutive
        positions) computes that window of the sequence against it."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache_position = kwargs.pop("cache_position", None)
        if past_key_values is None and use_cache:
            past_key_values = LLaDAKVCache()
        width = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        start = _window_start(past_key_values, cache_position, width)
        if labels is not None:
            raise ValueError("labels are not supported: the masked diffusion loss (CE over "
                             "masked tokens / p_mask) is computed by the training stack from "
                             "these logits, not here")
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if unsupported:
            raise ValueError(f"LLaDAModelLM.forward does not support: {', '.join(unsupported)}")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict

        t = self.model.transformer
        x = t.wte(input_ids) if inputs_embeds is None else inputs_embeds
        x, hidden = self.model(x, attention_mask, output_hidden_states, past_key_values, start,
                               logits_positions)
        logits = F.linear(x, t.wte.weight) if self.config.weight_tying else t.ff_out(x)
        output = LLaDAOutput(logits=logits, cache=past_key_values, hidden_states=hidden)
        return output if return_dict else output.to_tuple()


def _at_positions(x, logits_positions):
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


def _window_start(cache, cache_position, width):
    """None for a forward over the whole sequence (no cache, or an empty one to fill); else the
    first position of the window in the cached sequence (checked: consecutive and inside it)."""
    if cache is None:
        if cache_position is not None:
            raise ValueError("cache_position places a window in a KV cache: pass past_key_values too")
        return None
    if not all(hasattr(cache, name) for name in ("fill", "window", "length")):
        raise ValueError(f"past_key_values must be an LLaDAKVCache (LLaDA's bidirectional window "
                         f"cache, see the module docstring), got {type(cache).__name__}")
    if len(cache) == 0:
        if cache_position is not None and not torch.equal(cache_position.cpu(), torch.arange(width)):
            raise ValueError("an empty KV cache is filled by a forward over the whole sequence: pass "
                             "cache_position=None (or arange(seq)) with it")
        return None
    if cache_position is None:
        raise ValueError("past_key_values is already filled: pass cache_position (the window's "
                         "positions) to recompute a window against it, or a new LLaDAKVCache to refill it")
    start = int(cache_position[0]) if cache_position.numel() else -1
    if (cache_position.dim() != 1 or start < 0 or start + width > cache.length
            or not torch.equal(cache_position.cpu(), torch.arange(start, start + width))):
        raise ValueError(f"cache_position must be the {width} consecutive positions of the input inside "
                         f"the cached sequence of {cache.length}, e.g. arange(start, start + {width})")
    return start

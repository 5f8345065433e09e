"""The LLaDA transformer: one model module for the MDM and its autoregressive baseline.

A Llama-3-style stack with bidirectional attention and no attention mask, RMSNorm computed
in fp32 and cast back before the weight multiplies, SwiGLU, NeoX half-split RoPE in fp32, an
untied LM head, no biases and no timestep input. Parameters carry the released checkpoints'
names (`model.transformer.blocks.{i}.q_proj.weight`, ...), so checkpoints, export and import
never rename. Layers come from a factory (`parallel.layers`), so the same module runs dense in
one process or tensor-parallel; the module itself makes no parallelism decisions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parallel.attention import attention
from parallel.layers import DenseLayers
from parallel.model_config import ModelConfig


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back to the input dtype, then multiply by the weight."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding:
    """NeoX-style rotary embedding: dimension i rotates with dimension i + head_dim/2, in fp32."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, str(device))
        if key not in self._cache:
            inv_freq = 1.0 / (self.theta ** (
                torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim))
            freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)  # [s, head_dim]
            self._cache[key] = (angles.cos()[None, :, None, :], angles.sin()[None, :, None, :])
        return self._cache[key]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, s, h, head_dim]; returns x rotated, in x's dtype."""
        cos, sin = self.cos_sin(x.shape[1], x.device)
        x32 = x.float()
        first, second = x32.chunk(2, dim=-1)
        rotated_half = torch.cat((-second, first), dim=-1)
        return (x32 * cos + rotated_half * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """Pre-norm attention and SwiGLU MLP with residuals; names as in the released blocks."""

    def __init__(self, config: ModelConfig, layers: DenseLayers, rope: RotaryEmbedding,
                 attention_backend: str):
        super().__init__()
        self.config = config
        self.rope = rope
        self.attention_backend = attention_backend
        tp = layers.tp_size
        self.local_heads = config.n_heads // tp
        self.local_kv_heads = config.n_kv_heads // tp
        kv_dim = config.n_kv_heads * config.head_dim
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.q_proj = layers.column(config.d_model, config.d_model)
        self.k_proj = layers.column(config.d_model, kv_dim)
        self.v_proj = layers.column(config.d_model, kv_dim)
        self.attn_out = layers.row(config.d_model, config.d_model)
        self.ff_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_proj = layers.column(config.d_model, config.mlp_hidden_size)  # gate (SiLU)
        self.up_proj = layers.column(config.d_model, config.mlp_hidden_size)
        self.ff_out = layers.row(config.mlp_hidden_size, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        hd = self.config.head_dim
        h = self.attn_norm(x)
        q = self.rope.apply(self.q_proj(h).view(b, s, self.local_heads, hd))
        k = self.rope.apply(self.k_proj(h).view(b, s, self.local_kv_heads, hd))
        v = self.v_proj(h).view(b, s, self.local_kv_heads, hd)
        a = attention(q, k, v, causal=self.config.causal, backend=self.attention_backend)
        x = x + self.attn_out(a.reshape(b, s, self.local_heads * hd))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class _Transformer(nn.Module):
    def __init__(self, config: ModelConfig, layers: DenseLayers, attention_backend: str):
        super().__init__()
        rope = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.transformer = nn.ModuleDict(dict(
            wte=layers.embedding(config.vocab_size, config.d_model),
            blocks=nn.ModuleList(LLaDABlock(config, layers, rope, attention_backend)
                                 for _ in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
        ))
        if not config.weight_tying:
            self.transformer["ff_out"] = layers.head(config.d_model, config.vocab_size)


class LLaDAModel(nn.Module):
    """Token ids [b, s] -> fp32 logits [b, s, vocab] (vocab / TP per rank when tensor-parallel)."""

    def __init__(self, config: ModelConfig, layers: DenseLayers | None = None,
                 attention_backend: str = "auto", init: bool = True):
        super().__init__()
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        self.layers = layers or DenseLayers()
        self.model = _Transformer(config, self.layers, attention_backend)
        if init:
            self.reset_parameters()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        x = t.wte(input_ids)
        for block in t.blocks:
            x = block(x)
        x = t.ln_f(x)
        if self.config.weight_tying:
            logits = F.linear(x, self.layers.head_weight_of(t.wte))
        else:
            logits = t.ff_out(x)
        return logits.float()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The released `mitchell` init: truncated normal (cut at +-cutoff std), std 1/sqrt(d_in);
        each block's output projections (attn_out, ff_out) further / sqrt(2 (layer + 1))."""
        c = self.config
        t = self.model.transformer

        def trunc(weight: torch.Tensor, d_in: int, layer: int | None = None) -> None:
            std = 1.0 / math.sqrt(d_in)
            if layer is not None:
                std /= math.sqrt(2 * (layer + 1))
            cut = c.init_cutoff_factor * std
            nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-cut, b=cut)

        trunc(t.wte.weight, c.d_model)
        for i, blk in enumerate(t.blocks):
            for lin in (blk.q_proj, blk.k_proj, blk.v_proj, blk.ff_proj, blk.up_proj):
                trunc(lin.weight, c.d_model)
            trunc(blk.attn_out.weight, c.d_model, layer=i)
            trunc(blk.ff_out.weight, c.mlp_hidden_size, layer=i)
            blk.attn_norm.weight.fill_(1.0)
            blk.ff_norm.weight.fill_(1.0)
        t.ln_f.weight.fill_(1.0)
        if "ff_out" in t:
            trunc(t.ff_out.weight, c.d_model)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights (the only 1-D parameters: the model has no biases) take no weight decay."""
    return param.ndim < 2 or name.endswith("norm.weight") or ".ln_f." in name

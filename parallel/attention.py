"""Bidirectional (or, for the AR baseline, causal) attention kernels behind one function.

flash-attn's `flash_attn_func` runs when it is installed and the tensors are bf16/fp16 on a
GPU; everywhere else torch's `scaled_dot_product_attention` runs with no mask at all, which
keeps its flash / cuDNN / memory-efficient kernels eligible. Both take grouped-query K/V
directly (KV head j serves query heads j*g .. j*g+g-1, as `repeat_interleave` would).
Batched inference over left-padded prompts passes a key mask: flash-attn cannot take one, so
SDPA then runs with a boolean mask that hides the padding keys.

`KVCache` holds each layer's keys and values for the block-wise approximate cache of fast
decoding (Fast-dLLM): denoising steps that recompute only a window of positions attend to the
cached keys and values of the others; queries and keys then differ in length.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Backends that hold SDPA to one kernel (the fast-path switch `train.attention_backend`); on CPU
# only flash (its CPU kernel) and math exist.
SDPA_KERNELS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}
ATTENTION_BACKENDS = ("auto", "flash", "sdpa", *SDPA_KERNELS)

try:  # optional, GPU-only
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


def flash_attn_usable(q: torch.Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def _sdpa_mask(key_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """key_mask [b, s] -> boolean attn_mask [b, 1, 1, s], or [b, 1, s, s] with the causal mask.

    Under the causal mask a left pad before the first real token would see no key at all; it
    sees itself instead, so no softmax row is empty (real queries see their own key anyway)."""
    mask = key_mask[:, None, None, :]
    if not causal:
        return mask
    s = key_mask.shape[1]
    ones = torch.ones(s, s, dtype=torch.bool, device=key_mask.device)
    return (mask & ones.tril()) | torch.eye(s, dtype=torch.bool, device=key_mask.device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              backend: str = "auto", key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q: [b, sq, hq, d]; k, v: [b, sk, hkv, d] -> [b, sq, hq, d]. Queries and keys have the
    same length except under a KV cache (bidirectional only: every query sees every key).

    backend: "auto" (flash-attn when usable, else SDPA), "flash" or "sdpa"; or SDPA held to
    one of its kernels: "sdpa_flash", "sdpa_cudnn", "sdpa_efficient" or "sdpa_math"
    (`SDPA_KERNELS`; torch raises when the chosen kernel cannot take these inputs). key_mask:
    None (every key is real) or bool [b, sk], True at real keys; padding keys are hidden from
    every query, and SDPA runs whatever the backend.
    """
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[1]} and "
                         f"{k.shape[1]}: a KV cache serves bidirectional denoising only")
    if backend == "flash" and key_mask is not None:
        raise RuntimeError("attention backend 'flash': flash-attn takes no padding mask; use "
                           "backend 'auto' or 'sdpa' with an attention mask")
    if backend == "flash" and not flash_attn_usable(q):
        raise RuntimeError("attention backend 'flash' needs flash-attn installed and bf16/fp16 "
                           "CUDA tensors; use backend 'auto' or 'sdpa'")
    if key_mask is None and backend in ("auto", "flash") and flash_attn_usable(q):
        return flash_attn_func(q, k, v, dropout_p=0.0, causal=causal)
    attn_mask = None if key_mask is None else _sdpa_mask(key_mask, causal)
    kernel = sdpa_kernel(SDPA_KERNELS[backend]) if backend in SDPA_KERNELS else contextlib.nullcontext()
    with kernel:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
            dropout_p=0.0, is_causal=causal and attn_mask is None,
            enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


class KVCache:
    """Each layer's keys and values over the whole sequence, after RoPE: [b, s, kv_heads, head_dim]
    (this rank's heads under tensor parallelism).

    A forward over the whole sequence with an empty cache fills it (`fill`, layer by layer); a
    forward over a window of positions then recomputes only the window and attends to the
    cached keys and values of every other position, with the window's fresh ones written in
    their place (`window`), so the cache always holds the newest entries of the positions last
    computed. Refreshing means a new cache and a whole forward. Inference only (in-place writes).
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __len__(self) -> int:
        """Layers filled."""
        return len(self.keys)

    @property
    def length(self) -> int:
        """Positions held (0 while empty)."""
        return self.keys[0].shape[1] if self.keys else 0

    def fill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep layer `layer`'s keys and values of the whole sequence; returns them unchanged.
        Views (a fused projection's slices) are copied, so the cache does not keep their base."""
        if layer != len(self.keys):
            raise RuntimeError(f"KVCache.fill: layer {layer} arrived after {len(self.keys)} filled layers; "
                               f"a cache is filled by one whole forward, in layer order")
        self.keys.append(k.contiguous())
        self.values.append(v.contiguous())
        return k, v

    def window(self, layer: int, start: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the window's fresh keys and values (positions start .. start + k.shape[1]) into
        layer `layer`'s cache; returns that layer's keys and values of the whole sequence."""
        keys, values = self.keys[layer], self.values[layer]
        keys[:, start:start + k.shape[1]] = k
        values[:, start:start + v.shape[1]] = v
        return keys, values

"""Bidirectional (or, for the AR baseline, causal) attention kernels behind one function.

flash-attn's `flash_attn_func` runs when it is installed and the tensors are bf16/fp16 on a
GPU; everywhere else torch's `scaled_dot_product_attention` runs with no mask at all, which
keeps its flash / cuDNN / memory-efficient kernels eligible. Both take grouped-query K/V
directly (KV head j serves query heads j*g .. j*g+g-1, as `repeat_interleave` would).
Batched inference over left-padded prompts passes a key mask: flash-attn cannot take one, so
SDPA then runs with a boolean mask that hides the padding keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    """q: [b, s, hq, d]; k, v: [b, s, hkv, d] -> [b, s, hq, d].

    backend: "auto" (flash-attn when usable, else SDPA), "flash" or "sdpa". key_mask: None
    (every key is real) or bool [b, s], True at real keys; padding keys are hidden from every
    query, and SDPA runs whatever the backend.
    """
    if backend == "flash" and key_mask is not None:
        raise RuntimeError("attention backend 'flash': flash-attn takes no padding mask; use "
                           "backend 'auto' or 'sdpa' with an attention mask")
    if backend == "flash" and not flash_attn_usable(q):
        raise RuntimeError("attention backend 'flash' needs flash-attn installed and bf16/fp16 "
                           "CUDA tensors; use backend 'auto' or 'sdpa'")
    if key_mask is None and backend != "sdpa" and flash_attn_usable(q):
        return flash_attn_func(q, k, v, dropout_p=0.0, causal=causal)
    attn_mask = None if key_mask is None else _sdpa_mask(key_mask, causal)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
        dropout_p=0.0, is_causal=causal and attn_mask is None,
        enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)

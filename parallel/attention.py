"""Bidirectional (or, for the AR baseline, causal) attention kernels behind one function.

flash-attn's `flash_attn_func` runs when it is installed and the tensors are bf16/fp16 on a
GPU; everywhere else torch's `scaled_dot_product_attention` runs with no mask at all, which
keeps its flash / cuDNN / memory-efficient kernels eligible. Both take grouped-query K/V
directly (KV head j serves query heads j*g .. j*g+g-1, as `repeat_interleave` would).
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              backend: str = "auto") -> torch.Tensor:
    """q: [b, s, hq, d]; k, v: [b, s, hkv, d] -> [b, s, hq, d].

    backend: "auto" (flash-attn when usable, else SDPA), "flash" or "sdpa".
    """
    if backend == "flash" and not flash_attn_usable(q):
        raise RuntimeError("attention backend 'flash' needs flash-attn installed and bf16/fp16 "
                           "CUDA tensors; use backend 'auto' or 'sdpa'")
    if backend != "sdpa" and flash_attn_usable(q):
        return flash_attn_func(q, k, v, dropout_p=0.0, causal=causal)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=None, dropout_p=0.0, is_causal=causal, enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)

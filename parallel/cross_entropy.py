"""Per-token cross-entropy from hidden states, computed chunk by chunk through the LM head.

A 126464-wide fp32 log-softmax over a 4 x 4096 micro-batch is about 8 GB, plus its gradient
(DESIGN.md section 3). Here the head and the cross-entropy run on `chunk_tokens` positions at a
time under activation checkpointing: only one chunk's logits ever exist, in the forward pass and
again when backward recomputes them. Only the positions of `loss_mask` (the masked tokens of the
diffusion objective) go through the head; that saves work but does not bound the peak (t near 1
masks everything), the chunk does. The result is exactly the unchunked cross-entropy.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def chunked_token_cross_entropy(
        hidden: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None, *,
        logits_fn: Callable[[torch.Tensor], torch.Tensor],
        ce_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [b, l, d], targets [b, l] -> (fp32 cross-entropy [b, l], zero outside `loss_mask`;
    the largest logit computed, a detached scalar: -inf when no position was scored).

    logits_fn maps hidden rows [n, d] to (possibly vocabulary-sharded) logits; ce_fn maps
    logits and targets [n] to fp32 per-row cross-entropy. chunk_tokens <= 0: one chunk.
    """
    b, l, d = hidden.shape
    flat_hidden, flat_targets = hidden.reshape(b * l, d), targets.reshape(b * l)
    if loss_mask is None:
        rows = None
    else:
        rows = loss_mask.reshape(b * l).nonzero().squeeze(1)
        flat_hidden, flat_targets = flat_hidden[rows], flat_targets[rows]

    maxima = []  # recorded in the forward pass (a recomputation in backward appends again)

    def chunk_ce(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = logits_fn(h)
        maxima.append(logits.detach().max().float())
        return ce_fn(logits, t).float()

    n = flat_hidden.shape[0]
    step = chunk_tokens if 0 < chunk_tokens < n else max(n, 1)
    pieces = []
    for start in range(0, n, step):
        h, t = flat_hidden[start:start + step], flat_targets[start:start + step]
        if step < n and torch.is_grad_enabled():
            pieces.append(checkpoint(chunk_ce, h, t, use_reentrant=False))
        else:
            pieces.append(chunk_ce(h, t))
    ce = torch.cat(pieces) if pieces else flat_hidden.new_zeros(0, dtype=torch.float32)
    max_logit = (torch.stack(maxima).max() if maxima
                 else torch.tensor(float("-inf"), device=hidden.device))
    if rows is None:
        return ce.view(b, l), max_logit
    out = torch.zeros(b * l, dtype=torch.float32, device=hidden.device)
    return out.index_put((rows,), ce).view(b, l), max_logit


class ChunkedLossHead:
    """Mixin for an LM-head linear layer: `forward(x)` gives its logits; `forward(x, targets,
    loss_mask)` gives the per-token cross-entropy through `chunked_token_cross_entropy` with
    the layer's `cross_entropy` (plain or vocabulary-parallel) and records `max_logit`."""

    chunk_tokens: int

    @staticmethod
    def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, targets=None, loss_mask=None):
        if targets is None:
            return super().forward(x)
        ce, self.max_logit = chunked_token_cross_entropy(
            x, targets, loss_mask, logits_fn=super().forward, ce_fn=self.cross_entropy,
            chunk_tokens=self.chunk_tokens)
        return ce

"""The paper's 1% variable-length rule, in the reference's `discard` mode.

With probability `prob` a whole micro-batch is cut to one length drawn uniformly from
[1, L] and the tail is discarded, so the model also sees sequences shorter than the
context it is trained on. Both draws are taken from the caller's keyed generator on every
call, shortened or not, so what the generator yields next does not depend on the outcome.
"""

from __future__ import annotations

import torch


def shorten_batch(batch: torch.Tensor, generator: torch.Generator, prob: float) -> torch.Tensor:
    """`batch` [B, L], or with probability `prob` its first `length` columns, length ~ U{1..L}."""
    seq_len = batch.shape[1]
    shorten = torch.rand((), generator=generator).item() < prob
    length = int(torch.randint(1, seq_len + 1, (), generator=generator))
    return batch[:, :length].contiguous() if shorten else batch

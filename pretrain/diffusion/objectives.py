"""The training objectives of the paper, exactly: forward process, Algorithms 1 and 2, AR loss.

Every function takes its random draws (t, masks, lengths) from the caller or from an explicit
`torch.Generator`, never from global RNG state, so tests can fix them and resumed or parallel
runs replay them. Losses take logits from any callable model; cross-entropy and the
1/p_mask-weighted sums run in fp32 whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FORWARD_EPS = 1e-3


@dataclass
class NoisedBatch:
    noisy: torch.Tensor    # [b, l] token ids with masked positions set to mask_id
    masked: torch.Tensor   # [b, l] bool, True where a token was masked
    p_mask: torch.Tensor   # [b] float32, the masking probability of each row


def p_mask_of(t: torch.Tensor, eps: float = FORWARD_EPS) -> torch.Tensor:
    """p_mask = (1 - eps) t + eps: keeps every row's masking probability at least eps."""
    return (1 - eps) * t.float() + eps


def draw_t(batch_size: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """t ~ U[0, 1), one per sequence."""
    return torch.rand(batch_size, generator=generator, device=device)


def draw_mask(p_mask: torch.Tensor, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Each token masked independently with its row's probability."""
    u = torch.rand(p_mask.shape[0], seq_len, generator=generator, device=p_mask.device)
    return u < p_mask[:, None]


def forward_process(input_ids: torch.Tensor, mask_id: int, *, generator: torch.Generator | None = None,
                    t: torch.Tensor | None = None, masked: torch.Tensor | None = None,
                    eps: float = FORWARD_EPS) -> NoisedBatch:
    """q(x_t | x_0): draw t per row (or take it), mask with p_mask (or take the mask)."""
    b, l = input_ids.shape
    if t is None:
        if generator is None:
            raise ValueError("forward_process needs t or a generator")
        t = draw_t(b, generator, input_ids.device)
    p_mask = p_mask_of(t, eps)
    if masked is None:
        if generator is None:
            raise ValueError("forward_process needs masked or a generator")
        masked = draw_mask(p_mask, l, generator)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return NoisedBatch(noisy=noisy, masked=masked, p_mask=p_mask)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32 cross-entropy at every position ([b, l]) from whole-vocabulary logits."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return ce.view(targets.shape)


def pretrain_loss_from_ce(ce: torch.Tensor, nb: NoisedBatch) -> torch.Tensor:
    """Algorithm 1 from per-token cross-entropy [b, l]: sum over masked positions of CE / p_mask,
    divided by b x l, where l is the batch's actual (possibly shortened) length, not the masked
    count."""
    b, l = ce.shape
    return (ce * nb.masked / nb.p_mask[:, None]).sum() / (b * l)


def pretrain_loss(logits: torch.Tensor, input_ids: torch.Tensor, nb: NoisedBatch) -> torch.Tensor:
    """Algorithm 1 from logits (any model that maps ids to logits)."""
    return pretrain_loss_from_ce(token_cross_entropy(logits, input_ids), nb)


def sft_noise(input_ids: torch.Tensor, prompt_lengths: torch.Tensor, mask_id: int, *,
              generator: torch.Generator | None = None, t: torch.Tensor | None = None,
              masked: torch.Tensor | None = None, eps: float = FORWARD_EPS) -> NoisedBatch:
    """The forward process with the prompt kept clean: prompt tokens are never masked."""
    nb = forward_process(input_ids, mask_id, generator=generator, t=t, masked=masked, eps=eps)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    in_prompt = positions[None, :] < prompt_lengths[:, None]
    masked = nb.masked & ~in_prompt
    noisy = torch.where(masked, nb.noisy, input_ids)
    return NoisedBatch(noisy=noisy, masked=masked, p_mask=nb.p_mask)


def sft_loss_from_ce(ce: torch.Tensor, prompt_lengths: torch.Tensor, nb: NoisedBatch) -> torch.Tensor:
    """Algorithm 2 from per-token cross-entropy [b, l]: per row, sum of CE / p_mask over masked
    answer positions divided by that row's answer length (EOS padding included: it is masked
    and trained), then mean over rows."""
    answer_len = (ce.shape[1] - prompt_lengths).clamp(min=1).float()
    per_row = (ce * nb.masked / nb.p_mask[:, None]).sum(dim=1) / answer_len
    return per_row.mean()


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, prompt_lengths: torch.Tensor,
             nb: NoisedBatch) -> torch.Tensor:
    """Algorithm 2 from logits (any model that maps ids to logits)."""
    return sft_loss_from_ce(token_cross_entropy(logits, input_ids), prompt_lengths, nb)


def next_token_targets(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, loss_mask) for the AR baseline: position i predicts token i + 1; the last
    position has no target and is left out of the loss mask, except in a length-1 batch, which
    has no target at all: its one position is still scored (`ar_loss_from_ce` leaves it out of
    the loss) so that the loss, 0, stays a function of the weights with a zero gradient, which an
    engine's backward needs (a model scores no position outside the loss mask)."""
    targets = torch.roll(input_ids, -1, dims=1)
    loss_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if input_ids.shape[1] > 1:
        loss_mask[:, -1] = False
    return targets, loss_mask


def ar_loss_from_ce(ce: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the b x (l - 1) positions that have a target, defined
    at every length: the sum over those positions divided by their count clamped to >= 1. For
    l >= 2 that is the plain mean; a length-1 batch (the 1% random-length rule can draw it) has
    no next-token target, so its loss is 0 with a zero gradient, where a mean over no positions
    is NaN (a step the guard rails would count as skipped, though the optimizer applied it)."""
    with_target = ce[:, :-1]
    return with_target.sum() / max(with_target.numel(), 1)


def ar_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The autoregressive baseline from logits: mean next-token cross-entropy."""
    targets, _ = next_token_targets(input_ids)
    return ar_loss_from_ce(token_cross_entropy(logits, targets))

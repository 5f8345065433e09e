"""Held-out loss that is comparable across steps and runs.

A fixed set of held-out batches is scored at a fixed grid of t (the centres of `t_buckets`
equal buckets of [0, 1]) with masks drawn from generators keyed only by (seed, batch, bucket),
so two evaluations differ only because the weights differ. The mean over buckets is a
midpoint-rule estimate of the Algorithm-1 loss (the negative ELBO bound per token); the
per-bucket values show where the model improves (`fixed_t_loss`). The AR baseline is scored
by its next-token loss on the same batches (`next_token_loss`); the run's objective
(`pretrain.training.objective`) picks which.

The Algorithm 3 bound (`heldout_elbo`) scores whole held-out rows as answers to an empty prompt
(in SFT: held-out responses given their prompts) with the official stratified masking: the
same bound the evaluation reports, costlier, so it has its own period. Rows are split over the
data-parallel ranks by the evaluation sampler (a short rank scores a dummy row), each row's
draws are keyed by its index, so the value does not depend on the layout, and every rank runs
the same number of forwards.
"""

from __future__ import annotations

import torch

from data_pipeline.eval_sampler import shard_examples
from data_pipeline.seeding import keyed_generator
from pretrain.diffusion.likelihood import sequence_nll_bound
from pretrain.diffusion.model_fn import TokenCrossEntropy
from pretrain.diffusion.objectives import (
    ar_loss_from_ce,
    draw_mask,
    forward_process,
    next_token_targets,
    p_mask_of,
    pretrain_loss_from_ce,
)


def t_grid(buckets: int) -> list[float]:
    return [(k + 0.5) / buckets for k in range(buckets)]


@torch.no_grad()
def fixed_t_loss(token_ce: TokenCrossEntropy, batches: list[torch.Tensor],
                 *, mask_id: int, t_buckets: int, seed: int) -> dict[str, float]:
    """{'val/loss': mean, 'val/loss_t0.05': bucket mean, ...} over the fixed batches.

    Every rank runs the same forwards (lockstep under ZeRO-3 and TP)."""
    out: dict[str, float] = {}
    for k, t in enumerate(t_grid(t_buckets)):
        total = 0.0
        for i, batch in enumerate(batches):
            t_rows = torch.full((batch.shape[0],), t, device=batch.device)
            masked = draw_mask(p_mask_of(t_rows), batch.shape[1],
                               keyed_generator(seed, "val", i, k, device=batch.device))
            nb = forward_process(batch, mask_id, t=t_rows, masked=masked)
            total += pretrain_loss_from_ce(token_ce(nb.noisy, batch, nb.masked), nb).item()
        out[f"val/loss_t{t:.2f}"] = total / len(batches)
    out["val/loss"] = sum(out.values()) / t_buckets
    return out


@torch.no_grad()
def next_token_loss(token_ce: TokenCrossEntropy, batches: list[torch.Tensor]) -> dict[str, float]:
    """{'val/loss': the AR baseline's mean next-token loss} over the fixed batches."""
    losses = [ar_loss_from_ce(token_ce(batch, *next_token_targets(batch))).item() for batch in batches]
    return {"val/loss": sum(losses) / len(losses)}


@torch.no_grad()
def heldout_elbo(token_ce: TokenCrossEntropy, examples: list[tuple[torch.Tensor, int]], *,
                 dp_rank: int, dp_size: int, mask_id: int, mc_num: int, batch_size: int,
                 seed: int) -> tuple[float, int]:
    """(sum of the examples' negative bounds in nats, their answer token count) over this rank's
    share of `examples`, each (prompt + answer ids [s], prompt length): a held-out row with an
    empty prompt in pretraining, a held-out (prompt, response) pair in SFT. The caller sums both
    over ranks (tensor-parallel peers score the same examples, which scales both sums alike) and
    divides."""
    total, tokens = 0.0, 0
    for index, (seq, prompt_length) in shard_examples(examples, dp_rank, dp_size):
        nll = sequence_nll_bound(token_ce, seq, mask_id=mask_id, mc_num=mc_num, batch_size=batch_size,
                                 generator=keyed_generator(seed, "elbo", index or 0, device=seq.device),
                                 prompt_length=prompt_length)
        if index is not None:
            total, tokens = total + nll, tokens + seq.numel() - prompt_length
    return total, tokens

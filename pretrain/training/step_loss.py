"""The noise of a training step's micro-batches, and the pipeline engine's step.

Shared by the objectives' micro-batch losses (`pretrain.training.objective`), the pipeline step
and the tests and benchmarks that must reproduce the loop's numbers: each row's t and mask come
from a generator keyed by (seed, step, row of the global batch), whatever the split of the global
batch over ranks and micro-steps.
"""

from __future__ import annotations

import torch

from data_pipeline.seeding import keyed_generator
from pretrain.diffusion.objectives import (
    NoisedBatch,
    draw_mask,
    draw_t,
    forward_process,
    p_mask_of,
    pretrain_loss_from_ce,
    sft_noise,
)
from pretrain.training.config import RunConfig


def draw_noise(batch: torch.Tensor, mask_id: int, seed: int, step: int, first_row: int,
               prompt_lengths: torch.Tensor | None = None) -> NoisedBatch:
    """t and the mask of each row from a generator keyed by (seed, step, global row index): the
    tensor-parallel ranks of a replica draw the same noise, replicas draw different noise, and a
    row gets the same noise whichever rank and micro-step it lands on. With `prompt_lengths`
    (SFT), each row's prompt is then unmasked."""
    rows_t, rows_masked = [], []
    for i in range(batch.shape[0]):
        gen = keyed_generator(seed, "noise", step, first_row + i, device=batch.device)
        t = draw_t(1, gen, batch.device)
        rows_t.append(t)
        rows_masked.append(draw_mask(p_mask_of(t), batch.shape[1], gen))
    t, masked = torch.cat(rows_t), torch.cat(rows_masked)
    if prompt_lengths is not None:
        return sft_noise(batch, prompt_lengths, mask_id, t=t, masked=masked)
    return forward_process(batch, mask_id, t=t, masked=masked)


def first_global_row(micro_step: int, dp_rank: int, dp_size: int, micro_batch_size: int) -> int:
    """The index, in the step's global batch, of the first row of this rank's `micro_step`-th
    micro-batch: the key of its rows' noise, whatever the split over ranks and micro-steps."""
    return (micro_step * dp_size + dp_rank) * micro_batch_size


def pipeline_loss(ce: torch.Tensor, labels: tuple) -> torch.Tensor:
    """Algorithm 1 at a pipeline's last stage; labels are (targets, masked, p_mask)."""
    _, masked, p_mask = labels
    return pretrain_loss_from_ce(ce, NoisedBatch(noisy=None, masked=masked, p_mask=p_mask))


def pipeline_step(engine, cfg: RunConfig, batches: list[torch.Tensor], mask_id: int, step: int,
                  dp_rank: int, dp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of a pipeline engine (`parallel.pipeline`) over this replica's
    micro-batches, their noise drawn as `objective.MaskedDiffusion.micro_batch_loss` draws it and
    carried as (noisy ids, (targets, masked, p_mask)). Returns (the sum of the micro-batches'
    losses, the largest logit)."""
    from parallel.pipeline import train_step

    micro_batches = []
    for micro_step, batch in enumerate(batches):
        first_row = first_global_row(micro_step, dp_rank, dp_size, cfg.train.micro_batch_size)
        nb = draw_noise(batch, mask_id, cfg.train.seed, step, first_row)
        micro_batches.append((nb.noisy, (batch, nb.masked, nb.p_mask)))
    mean_loss, max_logit = train_step(engine, micro_batches)
    return mean_loss * len(batches), max_logit

"""Micro-batches read in the trainer's order, for the data tests that simulate a run's ranks as
one loader per data-parallel rank in one process: per optimizer step, micro-step by micro-step,
every rank's next micro-batch with the global row of its first row (`first_global_row`, the row
the loss keys its noise on)."""

from pretrain.training.step_loss import first_global_row


def step_micro_batches(loaders, *, dp_size: int, micro_batch_size: int, grad_accum: int):
    """(first global row, micro-batch) of every rank's micro-batches of one optimizer step."""
    for micro_step in range(grad_accum):
        for rank, loader in enumerate(loaders):
            yield first_global_row(micro_step, rank, dp_size, micro_batch_size), next(loader)

"""Fixed validation batches from a prepared held-out directory.

Validation must score the same tokens every time, so the batches are the first
n_batches x batch_size consecutive windows of seq_len tokens of the held-out stream in
manifest order: no shuffling, no randomness, nothing that depends on the training state.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from data_pipeline.shards import ShardError, check_tokenizer, iter_shards, read_manifest


def heldout_batches(directory: str | os.PathLike, *, n_batches: int, batch_size: int, seq_len: int,
                    vocab_size: int, tokenizer_sha256: str) -> list[torch.Tensor]:
    manifest = read_manifest(directory)
    check_tokenizer(directory, manifest, tokenizer_sha256)
    needed = n_batches * batch_size * seq_len
    pieces, have = [], 0
    for _, samples in iter_shards(directory, manifest, vocab_size):
        for tokens in samples:
            pieces.append(tokens)
            have += len(tokens)
        if have >= needed:
            break
    if have < needed:
        raise ShardError(f"{directory}: {have} held-out tokens, but validation.batches x "
                         f"validation.batch_size x data.seq_len = {needed}; hold out more data or "
                         f"evaluate fewer batches")
    stream = np.concatenate(pieces)[:needed].astype(np.int64)
    return list(torch.from_numpy(stream).view(n_batches * batch_size, seq_len).split(batch_size))

"""The demo's in-memory token source: one packed token stream, random training windows, a fixed held-out tail.

A few MB of corpus fit in memory, so the demo tokenizes everything once, joins the documents
with EOS, and cuts windows of `seq_len` out of the stream (windows cross document boundaries,
as in pretraining on packed data). The last `heldout_fraction` of the stream is never
trained on and gives the same validation batches every time. Training offsets come from
`keyed_generator(seed, "data", step, micro_step, dp_rank)`: a resumed run replays the same
batches and data-parallel replicas see different ones. A streaming shard source replaces this
class later behind the same `train_batch` call.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from data_pipeline.corpus import read_text_document
from data_pipeline.seeding import keyed_generator
from data_pipeline.tokenizer import TokenizerInfo

MIN_HELDOUT_SEQUENCES = 4


def tokenize_files(tokenizer_info: TokenizerInfo, paths: Sequence[str | os.PathLike], workers: int = 1) -> np.ndarray:
    """All documents as one uint32 stream, each document followed by one EOS (no other special token).

    `workers` threads read and encode contiguous shares of the files; the tokenizers library
    releases the GIL and parallelises each `encode_batch` itself, so 1 is usually enough.
    """
    shares = _contiguous_shares(list(paths), max(1, workers))
    with ThreadPoolExecutor(max_workers=len(shares) or 1) as pool:
        streams = list(pool.map(lambda share: _tokenize_share(tokenizer_info, share), shares))
    return np.concatenate(streams) if streams else np.zeros(0, dtype=np.uint32)


def _contiguous_shares(paths: list, workers: int) -> list[list]:
    share_size = max(1, -(-len(paths) // workers))
    return [paths[start : start + share_size] for start in range(0, len(paths), share_size)]


def _tokenize_share(tokenizer_info: TokenizerInfo, paths: Sequence[str | os.PathLike]) -> np.ndarray:
    documents = [read_text_document(path) for path in paths]
    eos = [tokenizer_info.eos_id]
    pieces = [np.asarray(ids + eos, dtype=np.uint32) for ids in tokenizer_info.encode_batch(documents)]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)


class PackedTokens:
    """A token stream split into a training part and a held-out tail, served as [batch, seq_len] windows."""

    def __init__(self, tokens: np.ndarray, heldout_fraction: float, seq_len: int):
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction must be in (0, 1), got {heldout_fraction}")
        if seq_len < 1:
            raise ValueError(f"data.seq_len must be positive, got {seq_len}")
        heldout_len = int(len(tokens) * heldout_fraction)
        self.seq_len = seq_len
        self.train_tokens = tokens[: len(tokens) - heldout_len]
        self.heldout_tokens = tokens[len(tokens) - heldout_len :]
        self._check_parts_long_enough(len(tokens), heldout_fraction)

    def _check_parts_long_enough(self, total: int, heldout_fraction: float) -> None:
        if len(self.heldout_tokens) < MIN_HELDOUT_SEQUENCES * self.seq_len:
            raise ValueError(
                f"held-out part has {len(self.heldout_tokens)} tokens ({total} x data.heldout_fraction="
                f"{heldout_fraction}), fewer than {MIN_HELDOUT_SEQUENCES} sequences of data.seq_len="
                f"{self.seq_len}: raise data.heldout_fraction, lower data.seq_len or use more data"
            )
        if len(self.train_tokens) < self.seq_len:
            raise ValueError(
                f"training part has {len(self.train_tokens)} tokens, shorter than data.seq_len={self.seq_len}: "
                "lower data.heldout_fraction or data.seq_len, or use more data"
            )

    def train_batch(self, batch_size: int, seed: int, step: int, micro_step: int, dp_rank: int) -> torch.Tensor:
        """[batch_size, seq_len] int64 windows of the training part at offsets keyed by (seed, step, micro_step, dp_rank)."""
        generator = keyed_generator(seed, "data", step, micro_step, dp_rank)
        num_offsets = len(self.train_tokens) - self.seq_len + 1
        offsets = torch.randint(0, num_offsets, (batch_size,), generator=generator).numpy()
        return self._windows(self.train_tokens, offsets)

    def heldout_batches(self, n_batches: int, batch_size: int) -> list[torch.Tensor]:
        """The same `n_batches` batches every call: consecutive, non-overlapping windows of the held-out tail."""
        needed = n_batches * batch_size * self.seq_len
        if needed > len(self.heldout_tokens):
            raise ValueError(
                f"{n_batches} held-out batches of {batch_size} x data.seq_len={self.seq_len} need {needed} tokens, "
                f"the held-out part has {len(self.heldout_tokens)}: raise data.heldout_fraction or "
                "evaluate fewer batches"
            )
        offsets = np.arange(n_batches * batch_size) * self.seq_len
        windows = self._windows(self.heldout_tokens, offsets)
        return list(windows.split(batch_size))

    def _windows(self, part: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
        index = offsets[:, None] + np.arange(self.seq_len)[None, :]
        return torch.from_numpy(part[index].astype(np.int64))

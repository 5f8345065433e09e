"""Where one lane of the global batch stands in one data source, and how it moves on: the resumable cursor.

Every source is an infinite sequence of shard *items*: perm(epoch 0) ++ perm(epoch 1) ++ ...,
each perm keyed by (seed, "shards", source, epoch) and the same on every rank. Lane l of G (one
per row of the global batch, see `data_pipeline.streaming`) owns items l, l+G, l+2G, ...: every
lane has data forever, even with fewer shards than lanes (lockstep), and epoch 0 is spread over
the lanes exactly once. Nothing here depends on how the lanes are split over ranks, micro-steps
or loader workers.
Inside an item the samples are visited in the order keyed by (seed, "samples", source,
item_index), and the cursor hands out their tokens in order, never dropping one.

A cursor's position is three integers (item_index, sample_position, token_offset). Restoring it
decodes only the one shard it points into, never the stream before it, so a resumed run starts
as fast as a fresh one and continues bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.seeding import keyed_generator
from data_pipeline.shards import ShardError, ShardInfo, read_shard


@dataclass(frozen=True)
class SourceData:
    """A checked data source: its name, directory, mixing weight and the manifest's shard list."""

    name: str
    directory: Path
    weight: float
    shards: tuple[ShardInfo, ...]


def shard_order(seed: int, source_name: str, epoch: int, num_shards: int) -> list[int]:
    """The shard indices of `epoch` in the order every rank walks them."""
    generator = keyed_generator(seed, "shards", source_name, epoch)
    return torch.randperm(num_shards, generator=generator).tolist()


def start_position(lane: int) -> dict[str, int]:
    """A lane's position before it has read anything: the start of its first item."""
    return {"item_index": lane, "sample_position": 0, "token_offset": 0}


class SourceCursor:
    """The token stream of one source as seen by one lane, positioned at `position`.

    The current shard item is decoded when the cursor reaches it (one shard in memory per
    source); items whose manifest records no tokens are skipped without being read.
    """

    def __init__(self, source: SourceData, *, seed: int, num_lanes: int, vocab_size: int,
                 position: dict[str, int]):
        self.source = source
        self.seed = seed
        self.num_lanes = num_lanes
        self.vocab_size = vocab_size
        self.decoded_samples = 0
        self._order_epoch = -1
        self._order: list[int] = []
        self._open_item(int(position["item_index"]))
        self._seek(int(position["sample_position"]), int(position["token_offset"]))

    def position(self) -> dict[str, int]:
        return {"item_index": self.item_index, "sample_position": self.sample_position,
                "token_offset": self.token_offset}

    @property
    def epoch(self) -> int:
        return self.item_index // len(self.source.shards)

    def take(self, count: int) -> np.ndarray:
        """The next `count` tokens (uint32), crossing sample and shard boundaries as needed."""
        pieces = []
        while count > 0:
            sample = self._samples[self.sample_position]
            piece = sample[self.token_offset:self.token_offset + count]
            pieces.append(piece)
            self.token_offset += len(piece)
            count -= len(piece)
            self._skip_exhausted()
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)

    def _shard_of(self, item_index: int) -> ShardInfo:
        num_shards = len(self.source.shards)
        epoch = item_index // num_shards
        if epoch != self._order_epoch:
            self._order = shard_order(self.seed, self.source.name, epoch, num_shards)
            self._order_epoch = epoch
        return self.source.shards[self._order[item_index % num_shards]]

    def _open_item(self, item_index: int) -> None:
        """Decode the first item at or after `item_index` (in this lane's items) that holds tokens."""
        info = self._shard_of(item_index)
        while info.tokens == 0:
            item_index += self.num_lanes
            info = self._shard_of(item_index)
        path = self.source.directory / info.name
        samples = read_shard(path, self.vocab_size, info.sha256)
        self.decoded_samples += len(samples)
        decoded_tokens = sum(len(s) for s in samples)
        if len(samples) != info.samples or decoded_tokens != info.tokens:
            raise ShardError(f"{path}: holds {len(samples)} samples and {decoded_tokens} tokens but the "
                             f"manifest records {info.samples} and {info.tokens}; the shard or the "
                             f"manifest is stale: prepare the data again")
        visit = torch.randperm(len(samples), generator=keyed_generator(
            self.seed, "samples", self.source.name, item_index)).tolist()
        self._samples = [samples[i] for i in visit]
        self.item_index = item_index
        self.sample_position = 0
        self.token_offset = 0
        self._skip_exhausted()

    def _seek(self, sample_position: int, token_offset: int) -> None:
        if (sample_position, token_offset) == (0, 0):
            return
        if not (0 <= sample_position < len(self._samples)
                and 0 <= token_offset < len(self._samples[sample_position])):
            raise ValueError(f"data state: source {self.source.name!r} item {self.item_index} has no "
                             f"sample {sample_position} with token {token_offset}; the state was saved "
                             f"for other data: resume with the same sources or start the data stream fresh")
        self.sample_position = sample_position
        self.token_offset = token_offset

    def _skip_exhausted(self) -> None:
        """Move past finished samples (and a finished item), so the position always points at a token."""
        while self.token_offset == len(self._samples[self.sample_position]):
            self.token_offset = 0
            self.sample_position += 1
            if self.sample_position == len(self._samples):
                self._open_item(self.item_index + self.num_lanes)
                return

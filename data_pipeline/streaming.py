"""The pretraining data stream: packed micro-batches mixed from weighted sources, forever, resumable.

The trainer calls `next(loader)` once per micro-batch on every data-parallel rank. The stream
never ends (every rank runs the same number of forwards: lockstep), depends only on the seed
and the data-parallel rank (tensor/pipeline ranks of one replica get identical batches), and
its `state_dict` resumes it bit for bit without replaying what was already read.

How a batch is made, by logical worker w of rank r:
- the 1% rule: keyed_generator(seed, "length", r, w, batch_index) draws (shorten?, length) on
  every batch (both draws, shortened or not, so later draws never depend on the outcome).
  "carry" packs the shortened batch's rows at that length, so the tokens not used stay in the
  buffers for the next batch; "discard" packs full rows and cuts them, dropping the tails
  (the reference's behaviour);
- row i of every batch is a *lane* with a cursor of its own in each source (slot
  (w * dp_size + r) * batch_size + i; see stream_state), so the rows of one micro-batch come
  from different shards and documents rather than from one stretch of text. The slots of the
  k-th batches of all ranks are those of the k-th batch of one rank with a dp_size times larger
  batch: the global batch does not depend on how it is split over ranks;
- each row draws its source from keyed_generator(seed, "mix", slot, batch_index) by weight
  and takes the next `length` tokens of its lane in that source (crossing document and shard
  boundaries).

With num_workers > 0 a torch DataLoader runs the logical workers in processes and hands their
batches out round-robin; `TokenBatchLoader` records the state each worker had after its last
batch that was *consumed* (not prefetched), and on restore DataLoader worker i plays logical
worker (i + next_worker) % workers so the round-robin continues where it stopped.
"""

from __future__ import annotations

import bisect
import copy
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.seeding import keyed_generator
from data_pipeline.shards import ShardError, check_tokenizer, read_manifest
from data_pipeline.stream_state import SourceCursor, SourceData, start_position

STATE_FORMAT = "llada-token-stream/3"
VARIABLE_LENGTH_MODES = ("carry", "discard")
RESUME_FIELDS = {  # state field -> what must stay the same to resume the stream
    "dp_size": "data-parallel size",
    "num_workers": "number of loader workers",
    "seq_len": "sequence length",
    "batch_size": "micro-batch size",
    "seed": "seed",
    "dp_rank": "data-parallel rank (each rank loads the data state it saved)",
    "sources": "sources (names, weights and shard files)",
}


@dataclass(frozen=True)
class SourceSpec:
    """A prepared dataset directory (shards + manifest) and its mixing weight."""

    name: str
    path: str
    weight: float


@dataclass(frozen=True)
class StreamConfig:
    seed: int
    dp_rank: int
    dp_size: int
    workers: int  # logical workers per rank: num_workers, or 1 when batches are made in-process
    seq_len: int
    batch_size: int
    vocab_size: int
    variable_length_prob: float
    variable_length_mode: str

    def lane_slot(self, worker: int, lane: int) -> int:
        """The slot of row `lane` of this rank's `worker`: every row of a batch has its own, and
        the ranks' slots for a worker are contiguous (what one rank with all rows would read)."""
        return (worker * self.dp_size + self.dp_rank) * self.batch_size + lane

    @property
    def num_slots(self) -> int:
        return self.dp_size * self.workers * self.batch_size


@dataclass
class TokenBatch:
    """One micro-batch and where it came from.

    `source_tokens` counts the batch's tokens per source; `decoded_samples` is how many samples
    its worker decoded since it (re)started, `restore_decoded_samples` how many of those it
    decoded to reach its starting position (at most one shard per source).
    """

    input_ids: torch.Tensor  # [batch_size, length] int64, as `data_pipeline.sft.SFTBatch.input_ids`
    source_tokens: dict[str, int]
    worker: int
    batch_index: int
    shortened: bool
    decoded_samples: int
    restore_decoded_samples: int


def load_sources(specs: Sequence[SourceSpec], tokenizer_sha256: str) -> list[SourceData]:
    """Read and check every source's manifest against the files and the training tokenizer."""
    if not specs:
        raise ValueError("data sources: none given; name at least one prepared dataset directory")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"data sources: names {names} repeat; give every source its own name")
    sources = []
    for spec in specs:
        if not (math.isfinite(spec.weight) and spec.weight > 0):
            raise ValueError(f"data source {spec.name!r}: weight {spec.weight} must be a positive number")
        manifest = read_manifest(spec.path)
        check_tokenizer(spec.path, manifest, tokenizer_sha256)
        if manifest.tokens == 0:
            raise ValueError(f"data source {spec.name!r}: {spec.path} holds no tokens; prepare it again "
                             f"or remove it from the sources")
        sources.append(SourceData(spec.name, Path(spec.path), float(spec.weight), tuple(manifest.shards)))
    return sources


def fresh_worker_state(sources: Sequence[SourceData], config: StreamConfig, worker: int) -> dict[str, Any]:
    lanes = [config.lane_slot(worker, lane) for lane in range(config.batch_size)]
    return {"batch_index": 0,
            "sources": {source.name: [start_position(slot) for slot in lanes] for source in sources}}


def draw_variable_length(generator: torch.Generator, prob: float, seq_len: int) -> int:
    """The batch's length: `seq_len`, or with probability `prob` a length ~ U{1..seq_len}."""
    shorten = torch.rand((), generator=generator).item() < prob
    length = int(torch.randint(1, seq_len + 1, (), generator=generator))
    return length if shorten else seq_len


class WorkerStream:
    """The batches of one logical worker, from its state on."""

    def __init__(self, sources: Sequence[SourceData], config: StreamConfig, worker: int,
                 state: dict[str, Any]):
        self.sources = list(sources)
        self.config = config
        self.worker = worker
        self.batch_index = int(state["batch_index"])
        self.cursors = [[SourceCursor(source, seed=config.seed, num_slots=config.num_slots,
                                      vocab_size=config.vocab_size, position=position)
                         for position in state["sources"][source.name]]
                        for source in self.sources]
        self.restore_decoded_samples = self.decoded_samples
        total_weight = sum(source.weight for source in self.sources)
        running = np.cumsum([source.weight / total_weight for source in self.sources])
        self._cumulative_weights = running.tolist()

    @property
    def decoded_samples(self) -> int:
        return sum(cursor.decoded_samples for lanes in self.cursors for cursor in lanes)

    def state(self) -> dict[str, Any]:
        return {"batch_index": self.batch_index,
                "sources": {lanes[0].source.name: [cursor.position() for cursor in lanes]
                            for lanes in self.cursors}}

    def next_batch(self) -> dict[str, Any]:
        config = self.config
        lengths = keyed_generator(config.seed, "length", config.dp_rank, self.worker, self.batch_index)
        length = draw_variable_length(lengths, config.variable_length_prob, config.seq_len)
        if config.variable_length_mode == "carry":
            tokens, row_sources = self._pack_rows(length)
        else:
            full, row_sources = self._pack_rows(config.seq_len)
            tokens = full[:, :length].contiguous()
        source_tokens = {source.name: 0 for source in self.sources}
        for source_index in row_sources:
            source_tokens[self.sources[source_index].name] += tokens.shape[1]
        batch = {"input_ids": tokens, "source_tokens": source_tokens, "worker": self.worker,
                 "batch_index": self.batch_index, "shortened": tokens.shape[1] < config.seq_len}
        self.batch_index += 1
        batch.update(state=self.state(), decoded_samples=self.decoded_samples,
                     restore_decoded_samples=self.restore_decoded_samples)
        return batch

    def _pack_rows(self, length: int) -> tuple[torch.Tensor, list[int]]:
        rows = np.empty((self.config.batch_size, length), dtype=np.int64)
        row_sources = []
        for row in range(self.config.batch_size):
            source_index = self._draw_source(row)
            rows[row] = self.cursors[source_index][row].take(length)
            row_sources.append(source_index)
        return torch.from_numpy(rows), row_sources

    def _draw_source(self, lane: int) -> int:
        config = self.config
        generator = keyed_generator(config.seed, "mix", config.lane_slot(self.worker, lane),
                                    self.batch_index)
        draw = torch.rand((), dtype=torch.float64, generator=generator).item()
        return min(bisect.bisect_right(self._cumulative_weights, draw), len(self.sources) - 1)


class TokenStream(IterableDataset):
    """The DataLoader's dataset: each DataLoader worker plays one logical worker from its state."""

    def __init__(self, sources: Sequence[SourceData], config: StreamConfig,
                 worker_states: Sequence[dict[str, Any]], first_worker: int):
        self.sources = list(sources)
        self.config = config
        self.worker_states = copy.deepcopy(list(worker_states))
        self.first_worker = first_worker

    def __iter__(self):
        info = get_worker_info()
        loader_worker, loader_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if loader_workers != self.config.workers:
            raise RuntimeError(f"TokenStream built for {self.config.workers} workers runs in a DataLoader "
                               f"with {loader_workers}; build it through TokenBatchLoader")
        worker = (loader_worker + self.first_worker) % loader_workers
        try:
            stream = WorkerStream(self.sources, self.config, worker, self.worker_states[worker])
            while True:
                yield stream.next_batch()
        except ShardError as e:  # handed to the main process as data, so it arrives as one line
            yield {"shard_error": str(e)}


class TokenBatchLoader:
    """What the trainer iterates: `next(loader)` gives a `TokenBatch` [batch_size, length] forever.

    `state_dict()` is plain JSON-able data (save one per data-parallel rank); `load_state_dict`
    continues the stream exactly after the last batch this loader handed out.
    """

    def __init__(self, sources: Sequence[SourceSpec], *, seq_len: int, batch_size: int, seed: int,
                 dp_rank: int, dp_size: int, num_workers: int, vocab_size: int, tokenizer_sha256: str,
                 variable_length_prob: float = 0.01, variable_length_mode: str = "carry",
                 prefetch_factor: int = 2, pin_memory: bool = False):
        _check_arguments(seq_len=seq_len, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size,
                         num_workers=num_workers, variable_length_prob=variable_length_prob,
                         variable_length_mode=variable_length_mode, prefetch_factor=prefetch_factor)
        self.sources = load_sources(list(sources), tokenizer_sha256)
        self.num_workers = num_workers
        self.config = StreamConfig(seed=seed, dp_rank=dp_rank, dp_size=dp_size, workers=max(1, num_workers),
                                   seq_len=seq_len, batch_size=batch_size, vocab_size=vocab_size,
                                   variable_length_prob=variable_length_prob,
                                   variable_length_mode=variable_length_mode)
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self._worker_states = [fresh_worker_state(self.sources, self.config, w)
                               for w in range(self.config.workers)]
        self._next_worker = 0
        self._consumed_tokens = {source.name: 0 for source in self.sources}
        self._iterator = None

    def __iter__(self) -> TokenBatchLoader:
        return self

    def __next__(self) -> TokenBatch:
        if self._iterator is None:
            self._iterator = iter(self._data_loader())
        item = next(self._iterator)
        if "shard_error" in item:
            self._iterator = None
            raise ShardError(item["shard_error"])
        worker = item["worker"]
        self._worker_states[worker] = item["state"]
        self._next_worker = (worker + 1) % self.config.workers
        for name, count in item["source_tokens"].items():
            self._consumed_tokens[name] += count
        return TokenBatch(input_ids=item["input_ids"], source_tokens=item["source_tokens"], worker=worker,
                          batch_index=item["batch_index"], shortened=item["shortened"],
                          decoded_samples=item["decoded_samples"],
                          restore_decoded_samples=item["restore_decoded_samples"])

    def close(self) -> None:
        """Stop the worker processes (the next `next` starts them again from the recorded state)."""
        self._iterator = None

    def counters(self) -> dict[str, dict[str, int]]:
        """Per source: tokens this rank has trained on, and the epoch its workers are in (the earliest)."""
        return {source.name: {"tokens": self._consumed_tokens[source.name],
                              "epoch": min(position["item_index"] for state in self._worker_states
                                           for position in state["sources"][source.name]) // len(source.shards)}
                for source in self.sources}

    def state_dict(self) -> dict[str, Any]:
        config = self.config
        return {"format": STATE_FORMAT, "seed": config.seed, "dp_rank": config.dp_rank,
                "dp_size": config.dp_size, "num_workers": self.num_workers, "seq_len": config.seq_len,
                "batch_size": config.batch_size, "sources": self._source_identity(),
                "workers": copy.deepcopy(self._worker_states), "next_worker": self._next_worker,
                "consumed_tokens": dict(self._consumed_tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data state: format {state.get('format')!r}, expected {STATE_FORMAT!r}; "
                             f"it was not saved by TokenBatchLoader: start the data stream fresh")
        current = self.state_dict()
        for field, what in RESUME_FIELDS.items():
            saved, now = state.get(field), current[field]
            if _comparable(field, saved) != _comparable(field, now):
                raise ValueError(f"data state: {field} is {_describe(saved)} in the checkpoint but "
                                 f"{_describe(now)} now; resume with the same {what}, or start the "
                                 f"data stream fresh (do not load the data state)")
        self._worker_states = copy.deepcopy(state["workers"])
        self._next_worker = int(state["next_worker"])
        self._consumed_tokens = dict(state["consumed_tokens"])
        self.close()

    def _source_identity(self) -> list[dict[str, Any]]:
        return [{"name": source.name, "path": str(source.directory), "weight": source.weight,
                 "shards_sha256": [shard.sha256 for shard in source.shards]} for source in self.sources]

    def _data_loader(self) -> DataLoader:
        dataset = TokenStream(self.sources, self.config, self._worker_states, self._next_worker)
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, worker_init_fn=_ignore_preemption_notice, **extra)


def _ignore_preemption_notice(worker_id: int) -> None:
    """SIGUSR1 announces preemption (`scancel --signal=USR1` reaches every process of the job,
    loader workers too, and its default action ends a process): the workers ignore it and keep
    feeding the rank until it has saved its checkpoint. SIGTERM keeps its default, as the
    DataLoader and the interpreter's exit end workers with it."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _comparable(field: str, value: Any) -> Any:
    """What must match to resume: 0 workers is the stream of one worker, and a source is the same
    data under another path (name, weight and shard hashes decide)."""
    if field == "num_workers" and isinstance(value, int):
        return max(1, value)
    if field == "sources" and isinstance(value, list):
        return [{k: v for k, v in source.items() if k != "path"} for source in value]
    return value


def _describe(value: Any) -> str:
    if isinstance(value, list):  # sources: name the sources, not every shard hash
        return str([(s.get("name"), s.get("weight"), f"{len(s.get('shards_sha256', []))} shards")
                    for s in value])
    return repr(value)


def _check_arguments(*, seq_len: int, batch_size: int, dp_rank: int, dp_size: int, num_workers: int,
                     variable_length_prob: float, variable_length_mode: str, prefetch_factor: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}); pass the data-parallel "
                         f"rank and size, not the global ones")
    if num_workers < 0 or prefetch_factor < 1:
        raise ValueError(f"num_workers={num_workers} must be >= 0 and prefetch_factor={prefetch_factor} >= 1")
    if not 0.0 <= variable_length_prob <= 1.0:
        raise ValueError(f"variable_length_prob={variable_length_prob} must be in [0, 1] (the paper uses 0.01)")
    if variable_length_mode not in VARIABLE_LENGTH_MODES:
        raise ValueError(f"variable_length_mode={variable_length_mode!r} must be one of {VARIABLE_LENGTH_MODES}")

"""The pretraining data stream: packed micro-batches mixed from weighted sources, forever, resumable
under another data-parallel size, micro-batch split or worker count.

The trainer calls `next(loader)` once per micro-batch on every data-parallel rank. The stream
never ends (every rank runs the same number of forwards: lockstep) and depends only on the seed
and the data-parallel rank (tensor/pipeline ranks of one replica get identical batches).

Lanes. The global batch of an optimizer step has G = batch_size * dp_size * grad_accum rows,
and each row is a *lane* with a cursor of its own in every source (`stream_state`): row i of
micro-step m on data-parallel rank r is lane (m * dp_size + r) * batch_size + i, the global row
that keys the row's noise in the loss (`pretrain.training.step_loss.first_global_row`). Each
lane is read exactly once per step, and lane l owns shard items l, l+G, l+2G, ... of every
source, so the global batch of step s does not depend on how it is split over ranks,
micro-steps or loader workers. Each row draws its source from keyed_generator(seed, "mix",
lane, s) by weight and takes its tokens from its lane in that source (crossing document and
shard boundaries).

The 1% rule is the one part that depends on the layout: the rows of one micro-batch share one
length, drawn from keyed_generator(seed, "length", s, m * dp_size + r) (the micro-batch's index
in the step's global batch; both draws, shortened or not, every time), so which rows are cut
together follows the micro-batch split. "carry" has every row take `length` tokens from its
lane (nothing is lost, the rest stays for the next step); "discard" reads full rows and cuts
them, dropping the tails (the reference's behaviour). With variable_length_prob 0 the data is
the same under any layout; with "carry" every lane still reads each source's stream in order
under any layout, so a resume under another layout neither repeats nor skips a token.

Loader workers. The rank's R = batch_size * grad_accum lanes of a step are split over the W
workers by rank-local row j = m * batch_size + i: worker w reads the rows with j % W == w. Every
DataLoader item is one worker's piece of one micro-batch (its rows of it, possibly none), so the
DataLoader's round-robin hands out the W pieces of micro-batch n in order and the main process
assembles them in row order; the rows do not depend on W. A piece carries the positions of the
lanes it read, and the loader records them only when its micro-batch is handed out (not while
it is prefetched). With num_workers 0 one logical worker makes the micro-batches in-process.
With pin_memory the assembled micro-batch is allocated in pinned memory.

Memory: every lane holds its current decoded shard of every source, so a worker holds
(R / W) x sources decoded shards and a rank R x sources, whatever W; many accumulation steps
with large shards multiply this (R = 64 lanes x 3 sources of 4 MiB shards is about 0.75 GiB per rank).

State. `state_dict()` is this rank's (its lanes' positions, micro-batches handed out, tokens);
`TokenBatchLoader.merge` joins every rank's into the run's layout-free state (one position per
lane and the step count), which `load_state_dict` continues from under any layout with the same
global batch size.
"""

from __future__ import annotations

import bisect
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

STATE_FORMAT = "llada-token-stream/4"
VARIABLE_LENGTH_MODES = ("carry", "discard")
RESUME_FIELDS = {  # run state field -> what must stay the same to resume the stream
    "seed": "seed",
    "seq_len": "sequence length",
    "global_batch_size": "global batch size (micro-batch x data-parallel size x accumulation)",
    "variable_length_prob": "variable-length probability",
    "variable_length_mode": "variable-length mode",
    "sources": "sources (names, weights and shard files)",
}
LAYOUT_FIELDS = ("dp_size", "batch_size", "grad_accum", "num_workers")


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
    batch_size: int  # rows of one micro-batch
    grad_accum: int  # micro-batches of one optimizer step on one rank
    workers: int  # logical workers per rank: num_workers, or 1 when micro-batches are made in-process
    seq_len: int
    vocab_size: int
    variable_length_prob: float
    variable_length_mode: str

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.dp_size * self.grad_accum

    @property
    def rank_rows(self) -> int:
        """Rows of one step on this rank: its lanes."""
        return self.batch_size * self.grad_accum

    def lane(self, rank_row: int) -> int:
        """The global row (lane) of this rank's row `rank_row` = micro_step * batch_size + row."""
        micro_step, row = divmod(rank_row, self.batch_size)
        return (micro_step * self.dp_size + self.dp_rank) * self.batch_size + row

    def rank_lanes(self) -> list[int]:
        return [self.lane(j) for j in range(self.rank_rows)]

    def worker_of(self, rank_row: int) -> int:
        """The logical worker that reads this rank's row `rank_row` = micro_step * batch_size + row."""
        return rank_row % self.workers

    def worker_rows(self, worker: int) -> list[int]:
        return [j for j in range(self.rank_rows) if self.worker_of(j) == worker]


@dataclass
class TokenBatch:
    """One micro-batch and where it came from.

    `lanes` are its rows' global rows in the step's batch; `source_tokens` counts its tokens per
    source; `decoded_samples` is how many samples the rank's workers decoded since they
    (re)started, `restore_decoded_samples` how many of those they decoded to reach their starting
    positions (at most one shard per source and lane).
    """

    input_ids: torch.Tensor  # [batch_size, length] int64, as `data_pipeline.sft.SFTBatch.input_ids`
    source_tokens: dict[str, int]
    micro_batch: int  # micro-batches this rank handed out before this one
    lanes: tuple[int, ...]
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


def draw_variable_length(generator: torch.Generator, prob: float, seq_len: int) -> int:
    """The micro-batch's length: `seq_len`, or with probability `prob` a length ~ U{1..seq_len}."""
    shorten = torch.rand((), generator=generator).item() < prob
    length = int(torch.randint(1, seq_len + 1, (), generator=generator))
    return length if shorten else seq_len


class WorkerStream:
    """One logical worker's pieces of the rank's micro-batches, from micro-batch `micro_batch` on."""

    def __init__(self, sources: Sequence[SourceData], config: StreamConfig, worker: int,
                 lane_positions: dict[str, dict[str, dict[str, int]]], micro_batch: int):
        self.sources = list(sources)
        self.config = config
        self.worker = worker
        self.micro_batch = micro_batch
        self.cursors = {j: [SourceCursor(source, seed=config.seed, num_lanes=config.global_batch_size,
                                         vocab_size=config.vocab_size,
                                         position=lane_positions[str(config.lane(j))][source.name])
                            for source in self.sources]
                        for j in config.worker_rows(worker)}
        self.restore_decoded_samples = self.decoded_samples
        total_weight = sum(source.weight for source in self.sources)
        self._cumulative_weights = np.cumsum([source.weight / total_weight for source in self.sources]).tolist()

    @property
    def decoded_samples(self) -> int:
        return sum(cursor.decoded_samples for cursors in self.cursors.values() for cursor in cursors)

    def next_piece(self) -> dict[str, Any]:
        config = self.config
        step, micro_step = divmod(self.micro_batch, config.grad_accum)
        length = draw_variable_length(
            keyed_generator(config.seed, "length", step, micro_step * config.dp_size + config.dp_rank),
            config.variable_length_prob, config.seq_len)
        read = length if config.variable_length_mode == "carry" else config.seq_len
        rows = [i for i in range(config.batch_size) if config.worker_of(micro_step * config.batch_size + i)
                == self.worker]
        tokens = np.empty((len(rows), read), dtype=np.int64)
        source_tokens = {source.name: 0 for source in self.sources}
        lanes = {}
        for k, row in enumerate(rows):
            rank_row = micro_step * config.batch_size + row
            lane = config.lane(rank_row)
            source_index = self._draw_source(lane, step)
            tokens[k] = self.cursors[rank_row][source_index].take(read)
            source_tokens[self.sources[source_index].name] += length
            lanes[str(lane)] = {cursor.source.name: cursor.position() for cursor in self.cursors[rank_row]}
        piece = {"micro_batch": self.micro_batch, "rows": rows, "length": length,
                 "input_ids": torch.from_numpy(tokens[:, :length].copy()), "source_tokens": source_tokens,
                 "lanes": lanes, "decoded_samples": self.decoded_samples,
                 "restore_decoded_samples": self.restore_decoded_samples}
        self.micro_batch += 1
        return piece

    def _draw_source(self, lane: int, step: int) -> int:
        generator = keyed_generator(self.config.seed, "mix", lane, step)
        draw = torch.rand((), dtype=torch.float64, generator=generator).item()
        return min(bisect.bisect_right(self._cumulative_weights, draw), len(self.sources) - 1)


class TokenStream(IterableDataset):
    """The DataLoader's dataset: DataLoader worker w plays logical worker w from the recorded positions."""

    def __init__(self, sources: Sequence[SourceData], config: StreamConfig,
                 lane_positions: dict[str, dict[str, dict[str, int]]], micro_batch: int):
        self.sources = list(sources)
        self.config = config
        self.lane_positions = lane_positions
        self.micro_batch = micro_batch

    def __iter__(self):
        info = get_worker_info()
        worker, loader_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if loader_workers != self.config.workers:
            raise RuntimeError(f"TokenStream built for {self.config.workers} workers runs in a DataLoader "
                               f"with {loader_workers}; build it through TokenBatchLoader")
        try:
            stream = WorkerStream(self.sources, self.config, worker, self.lane_positions, self.micro_batch)
            while True:
                yield stream.next_piece()
        except ShardError as e:  # handed to the main process as data, so it arrives as one line
            yield {"shard_error": str(e)}


class TokenBatchLoader:
    """What the trainer iterates: `next(loader)` gives a `TokenBatch` [batch_size, length] forever.

    `state_dict()` is this rank's plain JSON-able state; `merge` joins every rank's into the run's,
    and `load_state_dict(run_state)` continues the stream exactly after the last step, under this
    loader's layout (any data-parallel size, micro-batch split and worker count with the same
    global batch size).
    """

    def __init__(self, sources: Sequence[SourceSpec], *, seq_len: int, batch_size: int, grad_accum: int,
                 seed: int, dp_rank: int, dp_size: int, num_workers: int, vocab_size: int,
                 tokenizer_sha256: str, variable_length_prob: float = 0.01, variable_length_mode: str = "carry",
                 prefetch_factor: int = 2, pin_memory: bool = False):
        _check_arguments(seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, dp_rank=dp_rank,
                         dp_size=dp_size, num_workers=num_workers, variable_length_prob=variable_length_prob,
                         variable_length_mode=variable_length_mode, prefetch_factor=prefetch_factor)
        self.sources = load_sources(list(sources), tokenizer_sha256)
        self.num_workers = num_workers
        self.config = StreamConfig(seed=seed, dp_rank=dp_rank, dp_size=dp_size, batch_size=batch_size,
                                   grad_accum=grad_accum, workers=max(1, num_workers), seq_len=seq_len,
                                   vocab_size=vocab_size, variable_length_prob=variable_length_prob,
                                   variable_length_mode=variable_length_mode)
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self._lane_positions = {str(lane): {source.name: start_position(lane) for source in self.sources}
                                for lane in self.config.rank_lanes()}
        self._micro_batches = 0
        self._consumed_tokens = {source.name: 0 for source in self.sources}
        self._iterator = None

    def __iter__(self) -> TokenBatchLoader:
        return self

    def __next__(self) -> TokenBatch:
        if self._iterator is None:
            self._iterator = iter(self._data_loader())
        pieces = [self._next_piece() for _ in range(self.config.workers)]
        config = self.config
        length = pieces[0]["length"]
        input_ids = torch.empty((config.batch_size, length), dtype=torch.int64,
                                pin_memory=self.pin_memory and torch.cuda.is_available())
        source_tokens = {source.name: 0 for source in self.sources}
        for piece in pieces:
            if piece["micro_batch"] != self._micro_batches:
                raise RuntimeError(f"data loader: got a piece of micro-batch {piece['micro_batch']} while "
                                   f"assembling micro-batch {self._micro_batches}")
            input_ids[piece["rows"]] = piece["input_ids"]
            for name, count in piece["source_tokens"].items():
                source_tokens[name] += count
            self._lane_positions.update(piece["lanes"])
        micro_step = self._micro_batches % config.grad_accum
        batch = TokenBatch(input_ids=input_ids, source_tokens=source_tokens, micro_batch=self._micro_batches,
                           lanes=tuple(config.lane(micro_step * config.batch_size + i)
                                       for i in range(config.batch_size)),
                           shortened=length < config.seq_len,
                           decoded_samples=sum(piece["decoded_samples"] for piece in pieces),
                           restore_decoded_samples=sum(piece["restore_decoded_samples"] for piece in pieces))
        for name, count in source_tokens.items():
            self._consumed_tokens[name] += count
        self._micro_batches += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes (the next `next` starts them again from the recorded state)."""
        self._iterator = None

    def counters(self) -> dict[str, dict[str, int]]:
        """Per source: tokens this rank has trained on, and the epoch its lanes are in (the earliest)."""
        return {source.name: {"tokens": self._consumed_tokens[source.name],
                              "epoch": min(positions[source.name]["item_index"]
                                           for positions in self._lane_positions.values()) // len(source.shards)}
                for source in self.sources}

    def layout(self) -> dict[str, int]:
        config = self.config
        return {"dp_size": config.dp_size, "batch_size": config.batch_size, "grad_accum": config.grad_accum,
                "num_workers": self.num_workers}

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (plain JSON data); `merge` every data-parallel rank's to resume."""
        return {**self._stream_identity(), "micro_batches": self._micro_batches,
                "lanes": {lane: {name: dict(position) for name, position in positions.items()}
                          for lane, positions in self._lane_positions.items()},
                "consumed_tokens": dict(self._consumed_tokens), "dp_rank": self.config.dp_rank,
                "layout": self.layout()}

    @staticmethod
    def merge(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The run's layout-free state from every rank's `state_dict()` (tensor/pipeline peers of a
        replica may repeat a data-parallel rank: they must agree)."""
        if not states:
            raise ValueError("data state: no rank state to merge; pass every data-parallel rank's state_dict()")
        by_rank: dict[int, dict[str, Any]] = {}
        for state in states:
            _check_format(state)
            if "dp_rank" not in state:
                raise ValueError("data state: merge takes the ranks' state_dict(), not a merged run state")
            rank = state["dp_rank"]
            if rank in by_rank and _comparable_state(by_rank[rank]) != _comparable_state(state):
                raise ValueError(f"data state: two states of data-parallel rank {rank} differ; tensor/pipeline "
                                 f"peers of one replica must save the same data state")
            by_rank.setdefault(rank, state)
        first = by_rank[min(by_rank)]
        for rank, state in sorted(by_rank.items()):
            for field in (*RESUME_FIELDS, "layout", "micro_batches"):
                if _comparable(field, state.get(field)) != _comparable(field, first.get(field)):
                    raise ValueError(f"data state: {field} is {_describe(first.get(field))} on data-parallel "
                                     f"rank {min(by_rank)} but {_describe(state.get(field))} on rank {rank}; "
                                     f"the states come from different runs or steps")
        grad_accum = first["layout"]["grad_accum"]
        if first["micro_batches"] % grad_accum:
            raise ValueError(f"data state: saved after {first['micro_batches']} micro-batches, not a whole number "
                             f"of steps of {grad_accum}; save the data state at the end of a step")
        lanes: dict[str, Any] = {}
        for state in by_rank.values():
            repeated = sorted(int(lane) for lane in lanes.keys() & state["lanes"].keys())
            if repeated:
                raise ValueError(f"data state: lanes {repeated} appear on two data-parallel "
                                 f"ranks; the states come from different runs")
            lanes.update(state["lanes"])
        expected = {str(lane) for lane in range(first["global_batch_size"])}
        if lanes.keys() != expected:
            missing = sorted(int(lane) for lane in expected - lanes.keys())
            raise ValueError(f"data state: lanes {missing} of {first['global_batch_size']} are missing (data-parallel "
                             f"ranks {sorted(by_rank)} of {first['layout']['dp_size']} given); merge the states of "
                             f"every data-parallel rank")
        consumed = {name: sum(state["consumed_tokens"][name] for state in by_rank.values())
                    for name in first["consumed_tokens"]}
        return {**{field: first[field] for field in ("format", *RESUME_FIELDS)},
                "steps": first["micro_batches"] // grad_accum,
                "lanes": {lane: lanes[lane] for lane in sorted(lanes, key=int)},
                "consumed_tokens": consumed, "saved_layout": dict(first["layout"])}

    def load_state_dict(self, run_state: dict[str, Any]) -> None:
        """Continue after the run state's last step under this loader's layout. A one-rank
        state_dict() is merged first (complete only when it was the run's one data-parallel rank)."""
        _check_format(run_state)
        if "dp_rank" in run_state:
            run_state = self.merge([run_state])
        current = self._stream_identity()
        for field, what in RESUME_FIELDS.items():
            saved, now = run_state.get(field), current[field]
            if _comparable(field, saved) != _comparable(field, now):
                raise ValueError(f"data state: {field} is {_describe(saved)} in the checkpoint but "
                                 f"{_describe(now)} now; resume with the same {what}, or start the "
                                 f"data stream afresh (do not load the data state)")
        self._lane_positions = {str(lane): {source.name: dict(run_state["lanes"][str(lane)][source.name])
                                            for source in self.sources}
                                for lane in self.config.rank_lanes()}
        self._micro_batches = int(run_state["steps"]) * self.config.grad_accum
        first_replica = self.config.dp_rank == 0  # the trainer sums the counters over data-parallel ranks
        self._consumed_tokens = {source.name: int(run_state["consumed_tokens"][source.name]) if first_replica else 0
                                 for source in self.sources}
        self.close()

    def describe_change(self, run_state: dict[str, Any]) -> str | None:
        """What changed in the stream's layout since the run state was saved, or None."""
        _check_format(run_state)
        if "dp_rank" in run_state:
            run_state = self.merge([run_state])
        saved, now = run_state["saved_layout"], self.layout()
        if all(saved[field] == now[field] for field in LAYOUT_FIELDS):
            return None
        return (f"data stream: {self.config.global_batch_size} lanes continue from {_describe_layout(saved)} "
                f"to {_describe_layout(now)}")

    def _stream_identity(self) -> dict[str, Any]:
        config = self.config
        return {"format": STATE_FORMAT, "seed": config.seed, "seq_len": config.seq_len,
                "global_batch_size": config.global_batch_size, "variable_length_prob": config.variable_length_prob,
                "variable_length_mode": config.variable_length_mode, "sources": self._source_identity()}

    def _source_identity(self) -> list[dict[str, Any]]:
        return [{"name": source.name, "path": str(source.directory), "weight": source.weight,
                 "shards_sha256": [shard.sha256 for shard in source.shards]} for source in self.sources]

    def _next_piece(self) -> dict[str, Any]:
        piece = next(self._iterator)
        if "shard_error" in piece:
            self._iterator = None
            raise ShardError(piece["shard_error"])
        return piece

    def _data_loader(self) -> DataLoader:
        dataset = TokenStream(self.sources, self.config, dict(self._lane_positions), self._micro_batches)
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          worker_init_fn=_ignore_preemption_notice, **extra)


def _ignore_preemption_notice(worker_id: int) -> None:
    """SIGUSR1 announces preemption (`scancel --signal=USR1` reaches every process of the job,
    loader workers too, and its default action ends a process): the workers ignore it and keep
    feeding the rank until it has saved its checkpoint. SIGTERM keeps its default, as the
    DataLoader and the interpreter's exit end workers with it."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _check_format(state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"data state: format {found!r}, expected {STATE_FORMAT!r}; it was not saved by this "
                         f"TokenBatchLoader: start the data stream afresh (do not load the data state)")


def _comparable(field: str, value: Any) -> Any:
    """What must match to resume: a source is the same data under another path (name, weight and
    shard hashes decide)."""
    if field == "sources" and isinstance(value, list):
        return [{k: v for k, v in source.items() if k != "path"} for source in value]
    return value


def _comparable_state(state: dict[str, Any]) -> dict[str, Any]:
    return {field: _comparable(field, value) for field, value in state.items()}


def _describe(value: Any) -> str:
    if isinstance(value, list):  # sources: name the sources, not every shard hash
        return str([(s.get("name"), s.get("weight"), f"{len(s.get('shards_sha256', []))} shards")
                    for s in value])
    return repr(value)


def _describe_layout(layout: dict[str, int]) -> str:
    workers = layout["num_workers"]
    return (f"DP {layout['dp_size']} x micro {layout['batch_size']} x accumulation {layout['grad_accum']}, "
            f"{workers} worker{'' if workers == 1 else 's'}")


def _check_arguments(*, seq_len: int, batch_size: int, grad_accum: int, dp_rank: int, dp_size: int,
                     num_workers: int, variable_length_prob: float, variable_length_mode: str,
                     prefetch_factor: int) -> None:
    if seq_len < 1 or batch_size < 1 or grad_accum < 1:
        raise ValueError(f"seq_len={seq_len}, batch_size={batch_size} and grad_accum={grad_accum} must be positive")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}); pass the data-parallel "
                         f"rank and size, not the global ones")
    if num_workers < 0 or prefetch_factor < 1:
        raise ValueError(f"num_workers={num_workers} must be >= 0 and prefetch_factor={prefetch_factor} >= 1")
    if not 0.0 <= variable_length_prob <= 1.0:
        raise ValueError(f"variable_length_prob={variable_length_prob} must be in [0, 1] (the paper uses 0.01)")
    if variable_length_mode not in VARIABLE_LENGTH_MODES:
        raise ValueError(f"variable_length_mode={variable_length_mode!r} must be one of {VARIABLE_LENGTH_MODES}")

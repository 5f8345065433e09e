"""Offline data preparation: raw text, JSONL and Parquet documents into tokenized shards.

Training streams shards of token ids (`data_pipeline.shards`) and never tokenizes on the fly,
so a corpus is prepared once, on CPU:

    python -m data_pipeline.prepare --input corpus/ extra.jsonl --tokenizer tokenizer.json --out data/

Every document is encoded as plain text (a literal "<|endoftext|>" in it stays text) and
followed by EOS; whole documents are grouped into samples of up to `sample_tokens` tokens (a
longer document is a sample of its own, never split), and a shard is written as soon as it
holds `tokens_per_shard` tokens. Worker processes tokenize chunks of documents while the main
process reads the inputs and groups the results in input order, so the output is the same
bytes for any number of workers. The manifest is written last and only on success; on any
error the shards of this run are removed, so a directory with a manifest is always complete.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import numpy as np
from tqdm import tqdm

from data_pipeline.shards import MANIFEST, Manifest, ShardInfo, shard_name, write_manifest, write_shard
from data_pipeline.tokenizer import TokenizerInfo, load_tokenizer

DEFAULT_TOKENS_PER_SHARD = 16_777_216
DEFAULT_SAMPLE_TOKENS = 8192
CHUNK_CHARS = 1 << 20          # a worker's unit of work: about 1 MB of text ...
CHUNK_DOCUMENTS = 1024         # ... or this many documents, whichever comes first
PENDING_CHUNKS_PER_WORKER = 2  # read-ahead bound: memory stays flat on any corpus size
PARQUET_BATCH_ROWS = 1024
ALWAYS_SKIPPED = frozenset({"empty"})  # skipped (and counted) even without skip_bad
SHARD_FILE = re.compile(r"shard-\d{6,}\.tar")


class PrepareError(ValueError):
    """Bad input or arguments; the message names the file (and line, row or byte offset)."""


@dataclass(frozen=True)
class Skipped:
    """A document (or a file's `documents` rows) that is not written, and why."""

    reason: str
    message: str
    documents: int = 1


Item = Union[str, Skipped]  # what the readers yield: a document's text, or why there is none


# ----------------------------------------------------------------------------- inputs

def expand_inputs(inputs: Sequence[str | os.PathLike], exclude: Path | None = None) -> list[Path]:
    """Input files in order: files as given, directories expanded recursively in sorted order
    (hidden entries and anything under `exclude`, the output directory, left out)."""
    excluded = exclude.resolve() if exclude is not None else None
    files: list[Path] = []
    for given in map(Path, inputs):
        if given.is_dir():
            files.extend(path for path in sorted(given.rglob("*"))
                         if path.is_file() and not _is_hidden(path, given) and not _is_under(path, excluded))
        elif given.is_file():
            files.append(given)
        else:
            raise PrepareError(f"input not found: {given}")
    return files


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _is_under(path: Path, directory: Path | None) -> bool:
    return directory is not None and directory in path.resolve().parents


def read_documents(path: Path, text_field: str) -> Iterator[Item]:
    """The documents of one input file: a JSONL line or a Parquet row each, or the whole file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_documents(path, text_field)
    if suffix == ".parquet":
        return _parquet_documents(path, text_field)
    return _text_file_documents(path)


def _text_file_documents(path: Path) -> Iterator[Item]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        yield Skipped("non_utf8", f"{path}: not valid UTF-8 at byte offset {err.start} ({err.reason})")
        return
    yield _non_empty(text, str(path))


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Item]:
    """One document per line; blank lines are not documents and are passed over."""
    offset = 0
    with open(path, "rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            if raw.strip():
                yield _jsonl_document(raw, text_field, f"{path}:{line_number}", offset)
            offset += len(raw)


def _jsonl_document(raw: bytes, text_field: str, where: str, offset: int) -> Item:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return Skipped("non_utf8", f"{where}: not valid UTF-8 at byte offset {offset + err.start} "
                                   f"of the file ({err.reason})")
    except json.JSONDecodeError as err:
        return Skipped("bad_json", f"{where}: not valid JSON ({err.msg} at column {err.colno})")
    if not isinstance(record, dict):
        return Skipped("bad_json", f"{where}: a JSON {type(record).__name__}, expected an object "
                                   f"with a {text_field!r} string")
    if not isinstance(record.get(text_field), str):
        found = "is missing" if text_field not in record else f"holds {type(record[text_field]).__name__}"
        return Skipped("missing_field", f"{where}: field {text_field!r} {found}, expected a string "
                                        f"(set --text-field to the field that holds the text)")
    return _non_empty(record[text_field], where)


def _parquet_documents(path: Path, text_field: str) -> Iterator[Item]:
    """One document per row of column `text_field`, read one batch of a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        yield Skipped("bad_parquet", f"{path}: not a readable Parquet file ({_one_line(err)})")
        return
    problem = _parquet_column_problem(parquet.schema_arrow, text_field)
    if problem:
        yield Skipped("missing_column", f"{path}: {problem} (set --text-field to the column that "
                                        f"holds the text)", documents=parquet.metadata.num_rows)
        return
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            where = f"{path}: row {row}"
            if text is None:
                yield Skipped("missing_field", f"{where}: {text_field!r} is null")
            else:
                yield _non_empty(text, where)
            row += 1


def _parquet_column_problem(schema, text_field: str) -> str | None:
    import pyarrow as pa

    if text_field not in schema.names:
        return f"no column {text_field!r} (columns: {', '.join(schema.names)})"
    column_type = schema.field(text_field).type
    value_type = column_type.value_type if pa.types.is_dictionary(column_type) else column_type
    if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)
            or pa.types.is_string_view(value_type)):
        return f"column {text_field!r} holds {column_type}, not strings"
    return None


def _non_empty(text: str, where: str) -> Item:
    return text if text.strip() else Skipped("empty", f"{where}: empty or whitespace-only document")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


# ----------------------------------------------------------------------------- tokenization

def _chunks(items: Iterable[Item]) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    chars = 0
    for item in items:
        chunk.append(item)
        chars += len(item) if isinstance(item, str) else 0
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCUMENTS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def encode_chunk(tokenizer: TokenizerInfo, chunk: Sequence[Item]) -> list[np.ndarray | Skipped]:
    """Each text as uint32 ids of the plain text followed by EOS; skipped items pass through."""
    texts = [item for item in chunk if isinstance(item, str)]
    encoded = iter(tokenizer.encode_text(texts))
    eos = [tokenizer.eos_id]
    return [np.array(next(encoded) + eos, dtype=np.uint32) if isinstance(item, str) else item
            for item in chunk]


_worker_tokenizer: TokenizerInfo | None = None


def _init_worker(tokenizer: TokenizerInfo) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_chunk_in_worker(chunk: Sequence[Item]) -> list[np.ndarray | Skipped]:
    return encode_chunk(_worker_tokenizer, chunk)


def _encoded_chunks(tokenizer: TokenizerInfo, chunks: Iterable[list[Item]], workers: int
                    ) -> Iterator[list[np.ndarray | Skipped]]:
    """`encode_chunk` of every chunk, in order: in this process for one worker, else in a pool
    of fresh (spawned) processes with a bounded number of chunks in flight."""
    if workers == 1:
        yield from (encode_chunk(tokenizer, chunk) for chunk in chunks)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk_in_worker, (chunk,)))
            if len(pending) > PENDING_CHUNKS_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- grouping

class ShardBuilder:
    """Groups encoded documents into samples and samples into shards, writing each shard as it fills."""

    def __init__(self, out_dir: Path, sample_tokens: int, tokens_per_shard: int):
        self.out_dir = out_dir
        self.sample_tokens = sample_tokens
        self.tokens_per_shard = tokens_per_shard
        self.written: list[ShardInfo] = []
        self._sample: list[np.ndarray] = []
        self._sample_len = 0
        self._shard_samples: list[np.ndarray] = []
        self._shard_tokens = 0
        self._shard_documents = 0

    def add_document(self, tokens: np.ndarray) -> None:
        if self._sample and self._sample_len + len(tokens) > self.sample_tokens:
            self._close_sample()
        self._sample.append(tokens)
        self._sample_len += len(tokens)
        if self._sample_len >= self.sample_tokens:
            self._close_sample()

    def finish(self) -> list[ShardInfo]:
        if self._sample:
            self._close_sample()
        if self._shard_samples:
            self._write_shard()
        return self.written

    def remove_written(self) -> None:
        for info in self.written:
            (self.out_dir / info.name).unlink(missing_ok=True)

    def _close_sample(self) -> None:
        self._shard_samples.append(np.concatenate(self._sample))
        self._shard_documents += len(self._sample)
        self._shard_tokens += self._sample_len
        self._sample, self._sample_len = [], 0
        if self._shard_tokens >= self.tokens_per_shard:
            self._write_shard()

    def _write_shard(self) -> None:
        path = self.out_dir / shard_name(len(self.written))
        self.written.append(write_shard(path, self._shard_samples, self._shard_documents))
        self._shard_samples, self._shard_tokens, self._shard_documents = [], 0, 0


# ----------------------------------------------------------------------------- preparation

def prepare(inputs: Sequence[str | os.PathLike], tokenizer: str | os.PathLike, out: str | os.PathLike, *,
            tokens_per_shard: int = DEFAULT_TOKENS_PER_SHARD, sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
            workers: int | None = None, text_field: str = "text", skip_bad: bool = False,
            overwrite: bool = False, progress: bool = True) -> Manifest:
    """Tokenize `inputs` with the tokenizer.json at `tokenizer` into shards and a manifest in `out`.

    Raises PrepareError for bad arguments or input (with `skip_bad`, bad documents are skipped
    and counted in `manifest.skipped` instead); on any error no manifest is written and the
    shards of this run are removed. `workers` defaults to the number of CPUs.
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    _check_arguments(tokens_per_shard=tokens_per_shard, sample_tokens=sample_tokens, workers=workers)
    if not text_field:
        raise PrepareError("--text-field must not be empty")
    out = Path(out)
    files = expand_inputs(inputs, exclude=out)
    tokenizer_info = load_tokenizer(tokenizer)
    _clear_output_dir(out, overwrite)
    builder = ShardBuilder(out, sample_tokens, tokens_per_shard)
    try:
        skipped = _write_documents(builder, files, tokenizer_info, workers, text_field, skip_bad, progress)
        shards = builder.finish()
        if not shards:
            raise PrepareError(f"no documents in the inputs (skipped: {_format_counts(skipped)})")
        manifest = Manifest(tokenizer_sha256=tokenizer_info.sha256, vocab_size=tokenizer_info.vocab_size,
                            eos_id=tokenizer_info.eos_id, shards=shards, skipped=dict(sorted(skipped.items())))
        write_manifest(out, manifest)
    except BaseException:
        builder.remove_written()
        raise
    return manifest


def _check_arguments(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise PrepareError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _clear_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a prepared dataset unless `overwrite`; remove its manifest, then its shards (and
    shard files left by an interrupted run, which has no manifest and so is incomplete)."""
    if (out / MANIFEST).exists() and not overwrite:
        raise PrepareError(f"{out} already holds a prepared dataset ({MANIFEST}); pass --overwrite "
                           f"to replace it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for path in out.iterdir():
        if SHARD_FILE.fullmatch(path.name):
            path.unlink()


def _write_documents(builder: ShardBuilder, files: Sequence[Path], tokenizer: TokenizerInfo, workers: int,
                     text_field: str, skip_bad: bool, progress: bool) -> collections.Counter:
    """Feed every document, in input order, to `builder`; return the skipped counts by reason."""
    skipped: collections.Counter = collections.Counter()
    items = (item for path in files for item in read_documents(path, text_field))
    tokens, start = 0, time.perf_counter()
    with tqdm(desc="prepare", unit="doc", file=sys.stderr, disable=not progress, leave=False) as bar, \
            contextlib.closing(_encoded_chunks(tokenizer, _chunks(items), workers)) as encoded:
        for chunk in encoded:
            for item in chunk:
                if isinstance(item, Skipped):
                    _count_skipped(item, skipped, skip_bad)
                else:
                    builder.add_document(item)
                    tokens += len(item)
            bar.update(len(chunk))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tok/s", refresh=False)
    return skipped


def _count_skipped(item: Skipped, skipped: collections.Counter, skip_bad: bool) -> None:
    if not (skip_bad or item.reason in ALWAYS_SKIPPED):
        raise PrepareError(f"{item.message}; fix the input, or pass --skip-bad to skip and count such documents")
    skipped[item.reason] += item.documents


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}={count}" for reason, count in sorted(counts.items())) or "none"


# ----------------------------------------------------------------------------- command line

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="text files, .jsonl, .parquet, or directories (expanded recursively, sorted)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json")
    parser.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    parser.add_argument("--tokens-per-shard", type=int, default=DEFAULT_TOKENS_PER_SHARD)
    parser.add_argument("--sample-tokens", type=int, default=DEFAULT_SAMPLE_TOKENS)
    parser.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: CPU count)")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad documents instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = prepare(args.input, args.tokenizer, args.out, tokens_per_shard=args.tokens_per_shard,
                           sample_tokens=args.sample_tokens, workers=args.workers, text_field=args.text_field,
                           skip_bad=args.skip_bad, overwrite=args.overwrite)
    except (ValueError, OSError) as err:  # PrepareError and ShardError are ValueErrors
        print(f"prepare error: {_one_line(err)}", file=sys.stderr)
        return 2
    print(f"prepared {args.out}: {len(manifest.shards)} shards, {manifest.documents} documents, "
          f"{manifest.tokens} tokens, skipped: {_format_counts(manifest.skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

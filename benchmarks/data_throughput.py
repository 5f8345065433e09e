"""Throughput of data preparation, for sizing a corpus job: tokens/s for 1 and 2 worker processes.

Tokenization is almost all of the cost of `python -m data_pipeline.prepare`, and it scales with
worker processes, so tokens/s per worker says how many CPU-hours a corpus needs
(2T tokens / (tokens/s per worker) / 3600) and the two rows say whether workers scale. Input:
the stdlib corpus (about 6 MB, one document per file) with a 4096-vocabulary byte-level BPE
trained on it; times are whole `prepare` runs (pool start, reading, tokenizing, writing shards).

    python benchmarks/data_throughput.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from data_pipeline.corpus import stdlib_corpus_files
from data_pipeline.prepare import prepare
from data_pipeline.streaming import SourceSpec, TokenBatchLoader
from data_pipeline.tokenizer import train_bpe

CORPUS_BYTES = 6_000_000
VOCAB_SIZE = 4096
WORKER_COUNTS = (1, 2)
TOKENS_PER_SHARD = 1 << 20
STREAM_WORKERS = (0, 1, 2)
STREAM_BATCHES = 200
GPU_TOKENS_PER_S = 8_000  # LLaDA 8B, sequence 4096, per H100 (order of magnitude)


def timed_prepare(files: list[Path], tokenizer_path: Path, out: Path, workers: int) -> dict:
    start = time.perf_counter()
    manifest = prepare(files, tokenizer_path, out, tokens_per_shard=TOKENS_PER_SHARD, workers=workers,
                       progress=False)
    seconds = time.perf_counter() - start
    return {"workers": workers, "documents": manifest.documents, "tokens": manifest.tokens,
            "shards": len(manifest.shards), "seconds": seconds}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| workers | documents | tokens | shards | seconds | tokens/s | tokens/s per worker |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        rate = row["tokens"] / row["seconds"]
        lines.append(f"| {row['workers']} | {row['documents']:,} | {row['tokens']:,} | {row['shards']} | "
                     f"{row['seconds']:.2f} | {rate:,.0f} | {rate / row['workers']:,.0f} |")
    return "\n".join(lines)


def timed_stream(data_dir: Path, tokenizer, num_workers: int) -> dict:
    loader = TokenBatchLoader([SourceSpec("stdlib", str(data_dir), 1.0)], seq_len=4096, batch_size=4,
                              grad_accum=1, seed=0, dp_rank=0, dp_size=1, num_workers=num_workers,
                              vocab_size=tokenizer.vocab_size, tokenizer_sha256=tokenizer.sha256)
    next(loader)  # start-up: worker processes, first shard decoded
    start = time.perf_counter()
    tokens = sum(next(loader).input_ids.numel() for _ in range(STREAM_BATCHES))
    seconds = time.perf_counter() - start
    loader.close()
    return {"workers": num_workers, "tokens": tokens, "seconds": seconds}


def stream_table(rows: list[dict]) -> str:
    lines = ["| loader workers | tokens | seconds | tokens/s | x what one H100 consumes (8B, seq 4096) |",
             "|---:|---:|---:|---:|---:|"]
    for row in rows:
        rate = row["tokens"] / row["seconds"]
        lines.append(f"| {row['workers']} | {row['tokens']:,} | {row['seconds']:.2f} | {rate:,.0f} | "
                     f"{rate / GPU_TOKENS_PER_S:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    files = stdlib_corpus_files(CORPUS_BYTES)
    corpus_bytes = sum(path.stat().st_size for path in files)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        tokenizer = train_bpe(files, VOCAB_SIZE, tmp / "tokenizer.json")
        train_seconds = time.perf_counter() - start
        rows = [timed_prepare(files, tokenizer.path, tmp / f"out-{workers}", workers) for workers in WORKER_COUNTS]
        streams = [timed_stream(tmp / "out-1", tokenizer, workers) for workers in STREAM_WORKERS]
    print(f"prepare throughput: stdlib corpus, {len(files)} files, {corpus_bytes / 1e6:.1f} MB; "
          f"BPE vocab {tokenizer.vocab_size} (trained in {train_seconds:.1f} s); {os.cpu_count()} CPU cores\n")
    print(markdown_table(rows))
    print(f"\nstream throughput: {STREAM_BATCHES} micro-batches of 4 x 4096 after start-up\n")
    print(stream_table(streams))


if __name__ == "__main__":
    main()

"""One rank of the 4-process data test (run by torchrun from test_data_ranks.py).

Reads RANK / WORLD_SIZE from the environment, places itself in a TP=2 x DP=2 grid, pulls a
few micro-batches from the stream keyed on its data-parallel rank, and, as the negative
control, from a stream wrongly keyed on its global rank; it also records the rows of its
micro-batches (fixed length), and rank 0 those of one rank reading twice the rows, to compare
with the global batch. Rank 0 writes every rank's record to the JSON file named by argv[1].
"""

import hashlib
import json
import os
import sys

import torch.distributed as dist

from data_pipeline.streaming import SourceSpec, TokenBatchLoader
from parallel.topology import coordinates


def batch_hashes(loader: TokenBatchLoader, count: int) -> list[str]:
    hashes = [hashlib.sha256(next(loader).input_ids.numpy().tobytes()).hexdigest() for _ in range(count)]
    loader.close()
    return hashes


def batch_rows(loader: TokenBatchLoader, count: int) -> list[list[list[int]]]:
    rows = [next(loader).input_ids.tolist() for _ in range(count)]
    loader.close()
    return rows


def main(out_path: str, data_dir: str, tokenizer_sha256: str, vocab_size: int) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    grid = coordinates(rank, world, tp_size=2)
    common = dict(seq_len=16, batch_size=2, grad_accum=1, seed=7, num_workers=2, vocab_size=vocab_size,
                  tokenizer_sha256=tokenizer_sha256, variable_length_prob=0.3)
    sources = [SourceSpec("corpus", data_dir, 1.0)]
    by_dp_rank = batch_hashes(TokenBatchLoader(sources, dp_rank=grid.dp_rank, dp_size=grid.dp_size, **common), 6)
    by_global_rank = batch_hashes(TokenBatchLoader(sources, dp_rank=rank, dp_size=world, **common), 6)
    fixed = dict(common, variable_length_prob=0.0)
    rows = batch_rows(TokenBatchLoader(sources, dp_rank=grid.dp_rank, dp_size=grid.dp_size, **fixed), 4)
    record = {"rank": rank, "tp_rank": grid.tp_rank, "dp_rank": grid.dp_rank,
              "by_dp_rank": by_dp_rank, "by_global_rank": by_global_rank, "rows": rows}
    if rank == 0:
        fixed["batch_size"] *= grid.dp_size
        record["one_rank_rows"] = batch_rows(TokenBatchLoader(sources, dp_rank=0, dp_size=1, **fixed), 4)
    gathered = [None] * world
    dist.all_gather_object(gathered, record)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))

"""A real 4-process run (TP=2 x DP=2, ranks from the environment) reads the data as DESIGN.md
section 4 requires: identical batches inside a tensor-parallel pair, different batches across
data-parallel ranks, and the data-parallel ranks' micro-batches together are exactly the batch
one rank reads with twice the rows. The negative control keys the stream on the global rank
instead, which gives the two ranks of a tensor-parallel pair different data (a silently wrong
model)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from support.ports import free_port

from data_pipeline.shards import Manifest, shard_name, write_manifest, write_shard

VOCAB = 80_000
SHA = "ab" * 32


def test_tensor_parallel_pairs_share_batches_and_replicas_differ(tmp_path, subprocess_env):
    data = tmp_path / "data"
    data.mkdir()
    ids = np.arange(70_000, 70_000 + 5 * 400, dtype=np.uint32).reshape(5, 4, 100)
    shards = [write_shard(data / shard_name(i), list(ids[i]), documents=4) for i in range(5)]
    write_manifest(data, Manifest(tokenizer_sha256=SHA, vocab_size=VOCAB, eos_id=0, shards=shards))
    out = tmp_path / "hashes.json"
    worker = Path(__file__).with_name("support") / "multirank_data_worker.py"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(worker), str(out), str(data), SHA, str(VOCAB)],
        capture_output=True, text=True, timeout=300, env=subprocess_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    assert [(r["tp_rank"], r["dp_rank"]) for r in ranks] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    # equal inside each tensor-parallel pair, different across data-parallel ranks
    assert ranks[0]["by_dp_rank"] == ranks[1]["by_dp_rank"]
    assert ranks[2]["by_dp_rank"] == ranks[3]["by_dp_rank"]
    assert set(ranks[0]["by_dp_rank"]).isdisjoint(ranks[2]["by_dp_rank"])
    # negative control: keyed on the global rank, a tensor-parallel pair reads different data
    assert set(ranks[0]["by_global_rank"]).isdisjoint(ranks[1]["by_global_rank"])
    # the two replicas' micro-batches are disjoint and together form the one-rank global batch
    for step, (dp0, dp1) in enumerate(zip(ranks[0]["rows"], ranks[2]["rows"])):
        assert not {tuple(r) for r in dp0} & {tuple(r) for r in dp1}
        assert dp0 + dp1 == ranks[0]["one_rank_rows"][step]

"""The evaluation sampler: the index split (each example once, equal counts, dummies last) and a
real 2-rank gloo run in lockstep whose gathered results come back in example order on both ranks."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from support.ports import free_port

from data_pipeline.eval_sampler import gather_in_order, shard_examples, shard_indices

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("num_examples, dp_size", [(0, 2), (1, 1), (1, 4), (3, 8), (5, 2), (8, 4), (9, 4), (10, 3)])
def test_every_index_once_equal_counts_dummies_last(num_examples, dp_size):
    shards = [shard_indices(num_examples, rank, dp_size) for rank in range(dp_size)]
    per_rank = -(-num_examples // dp_size)
    assert all(len(shard) == per_rank for shard in shards)
    real = [index for shard in shards for index in shard if index is not None]
    assert sorted(real) == list(range(num_examples))
    for shard in shards:
        first_dummy = shard.index(None) if None in shard else len(shard)
        assert all(index is None for index in shard[first_dummy:])
        assert all(index is not None for index in shard[:first_dummy])
    assert sum(None in shard for shard in shards) == per_rank * dp_size - num_examples


def test_dummies_carry_a_stand_in_example():
    assert shard_examples(["a", "b", "c"], 1, 2) == [(1, "b"), (None, "a")]
    with pytest.raises(ValueError, match="dp_rank"):
        shard_indices(3, 2, 2)


def test_gather_without_process_group_is_a_world_of_one():
    indices = shard_indices(3, 0, 1)
    assert gather_in_order([f"r{i}" for i in indices], indices) == ["r0", "r1", "r2"]
    assert gather_in_order(["x", "dummy"], [0, None]) == ["x"]
    with pytest.raises(ValueError, match=r"examples \[0\] were scored by no rank"):
        gather_in_order(["b"], [1])


RANK_SCRIPT = """
import datetime, json, os, torch, torch.distributed as dist
from data_pipeline.eval_sampler import gather_in_order, shard_examples
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rank, world = dist.get_rank(), dist.get_world_size()
items = shard_examples(list(range(5)), rank, world)
scores, lockstep_total = [], 0.0
for index, example in items:
    score = torch.tensor(float(example * 10))
    total = score * (index is not None)
    dist.all_reduce(total)  # every item, dummies included, is a collective on every rank
    lockstep_total += total.item()
    scores.append(score.item())
ordered = gather_in_order(scores, [index for index, _ in items])
print(json.dumps({"rank": rank, "items": len(items), "ordered": ordered, "lockstep_total": lockstep_total}))
dist.destroy_process_group()
"""


def test_two_gloo_ranks_stay_in_lockstep_and_gather_in_order(subprocess_env):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], cwd=REPO_ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**subprocess_env, "RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in range(2)]
    try:
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr
    reports = sorted((json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs), key=lambda r: r["rank"])
    for report in reports:
        assert report["items"] == 3
        assert report["ordered"] == [0.0, 10.0, 20.0, 30.0, 40.0]
        assert report["lockstep_total"] == 100.0

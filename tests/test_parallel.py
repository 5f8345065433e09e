"""Tensor and data parallelism give the single-process model's numbers, with real ranks.

- TP=2 (2 gloo ranks): megatron-core layers give the dense model's weights, logits, loss and
  gradients, with and without activation checkpointing and a chunked head; local weights are
  1/TP of the full ones. Control: dropping the input-gradient all-reduce of the column-parallel
  layers must break the gradients. Fused projections under TP draw, load, compute and
  differentiate the dense model's released tensors. Control: fused weights stacked whole
  before the TP split must not.
- TP=2 x DP=2 under ZeRO-3 with zero.Init, full activation checkpointing and a chunked head
  (4 gloo ranks): 5 optimizer steps with accumulation follow plain torch AdamW on the dense
  model over the whole global batch (loss, gradient norm, the whole weights a checkpoint
  publishes), with and without fused projections. Control: the same run without the `mpu`
  adapter must not.
- ZeRO-3 DP=2: `deepspeed --num_gpus 2 recipes/tiny.sh` typed as users type it, from another
  directory, trains on 2 CPU ranks, the engine reports DP 2, and its loss trajectory equals the
  single-process run's on the same global batch (32 rows = 2 ranks x 16); so does the
  Algorithm 3 held-out bound, its rows split over the ranks with a dummy.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.ports import free_port

REPO = Path(__file__).resolve().parents[1]


def run_scenario(scenario: str, ranks: int, tmp_path: Path, env: dict) -> dict:
    out = tmp_path / f"{scenario}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(REPO / "tests" / "support" / "multirank_parallel_worker.py"), scenario, str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_tensor_parallel_matches_the_dense_model(tmp_path, subprocess_env):
    r = run_scenario("tp", 2, tmp_path, subprocess_env)
    assert r["names_equal"] == 1 and r["state_dict_keys_equal"] == 1  # released names, no extras
    assert r["shape_errors"] == 0
    assert r["weights"] == 0.0  # the same seed draws the same full weights
    assert r["logits"] < 1e-5 and r["loss"] < 1e-6 and r["grads"] < 1e-6, r
    assert r["positions_picked"] <= 1e-6 and r["positions_block"] <= 1e-6 and r["control_positions"] > 1e-2, r
    for mode in ("full", "selective"):
        assert r[f"{mode}_chunked_loss"] < 1e-6 and r[f"{mode}_chunked_grads"] < 1e-6, r
    assert r["control_grads"] > 1e-2, r
    assert r["fused_weights"] == 0.0 and r["fused_loaded_weights"] == 0.0, r
    assert r["fused_loss"] < 1e-6 and r["fused_grads"] < 1e-6, r
    assert r["control_fused_weights"] > 1e-2, r


def test_tp2_dp2_zero3_follows_the_single_process_run_and_fails_without_mpu(tmp_path, subprocess_env):
    r = run_scenario("zero3", 4, tmp_path, subprocess_env)
    for label in ("mpu", "fused"):
        assert r[f"{label}_dp_world_size"] == 2
        assert r[f"{label}_loss"] < 1e-5 and r[f"{label}_grad_norm"] < 1e-5 and r[f"{label}_weights"] < 1e-5, r
    # without the adapter DeepSpeed sees 4 data-parallel ranks, raises nothing, trains wrongly
    assert r["control_dp_world_size"] == 4
    assert r["control_loss"] > 1e-2 and r["control_weights"] > 1e-2, r


SMALL_RUN = ["train.steps=5", "logging.every=1", "validation.every=0", "checkpoint.every=0",
             "data.variable_length_prob=0", "logging.progress_bar=false", "sample.gen_length=8",
             "sample.steps=8", "sample.block_length=8"]


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


# The Algorithm 3 bound on 5 held-out rows at steps 0 and 5: 3 rows on one rank, 2 and a dummy
# on the other.
ELBO = ["validation.elbo_every=5", "validation.elbo_sequences=5", "validation.batches=1",
        "validation.batch_size=8", "validation.elbo_mc_num=4", "validation.elbo_batch_size=2"]


def elbo_values(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["val/elbo_nll"]) for r in map(json.loads, lines) if "val/elbo_nll" in r]


def test_deepspeed_launch_of_tiny_recipe_on_two_ranks_follows_one_process(tmp_path, subprocess_env):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    two = subprocess.run(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
         str(REPO / "recipes" / "tiny.sh"), *SMALL_RUN, *ELBO, "data.max_bytes=1500000",
         "data.heldout_fraction=0.1"],
        cwd=cwd, capture_output=True, text=True, timeout=300, env=subprocess_env)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    run2 = cwd / "runs" / "tiny_2ranks"
    assert "TP 1 x DP 2" in two.stdout and "engine DP 2" in two.stdout
    assert (run2 / "checkpoints" / "latest").is_file()

    data = run2 / "data"
    one = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "--config", str(REPO / "recipes" / "tiny.yaml"),
         *SMALL_RUN, *ELBO, "data.source=shards", f"data.sources=[{{path: {data / 'train'}}}]",
         f"data.validation_path={data / 'heldout'}", f"data.tokenizer={data / 'tokenizer.json'}",
         f"train.out_dir={tmp_path / 'one'}"],
        cwd=cwd, capture_output=True, text=True, timeout=300, env=subprocess_env)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "micro 32 x DP 1" in one.stdout
    two_losses, one_losses = losses(run2), losses(tmp_path / "one")
    assert len(two_losses) == len(one_losses) == 5
    assert two_losses == pytest.approx(one_losses, rel=1e-5, abs=0)
    assert one_losses[-1] < one_losses[0]
    # the held-out bound, rows split over ranks with a dummy, equals the one-process value
    two_elbo, one_elbo = elbo_values(run2), elbo_values(tmp_path / "one")
    assert [s for s, _ in one_elbo] == [s for s, _ in two_elbo] == [0, 5]
    assert [v for _, v in two_elbo] == pytest.approx([v for _, v in one_elbo], rel=1e-5)

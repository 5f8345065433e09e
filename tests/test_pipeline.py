"""Pipeline parallelism (DeepSpeed's PipelineEngine) trains the model the single process trains.

Real ranks, real engines (multirank_pipeline_worker.py; one torchrun launch per world size):
- PP=2 (2 ranks; 3 blocks split 2 + 1): 5 optimizer steps with accumulation, two micro-batches
  cut short, follow plain torch AdamW on the dense model (loss, gradient norm, whole weights);
  the second stage receives the full hidden state at each micro-batch's own length. A
  checkpoint at step 3 holds the whole weights under the released names, resumes bit for bit
  in a fresh engine, and exports to a directory whose transformers logits equal the pipeline's.
  Controls: the short micro-batches padded back to full length, a restart from the weights
  only, and the export against the model two steps later, must all differ.
- PP=2 x TP=2 (with fused projections) and PP=2 x DP=2 (4 ranks) follow the same reference
  (the whole weights under the released names), boundaries carrying the
  full (not tensor-sharded) hidden state. Control: a DeepSpeed topology without the tensor
  axis (DeepSpeed then averages the TP shards as replicas) must not.
- The CLI: `deepspeed --num_gpus 2 --module pretrain.train ... parallel.pipeline_parallel=2`
  trains, validates, checkpoints, resumes (3 + 2 steps) and samples, with the losses,
  held-out values and sample of the one-process PP=1 run on the same data.
- Config: PP with ZeRO-2/3, more stages than blocks, tied weights, another objective, and a
  world TP x PP does not divide are refused with the fix; blocks the stages do not divide are
  balanced, as DeepSpeed's partitioner splits them, and the plan is printed.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.ports import free_port
from support.tiny_checkpoints import stdlib_tokenizer

from pretrain.training.config import ConfigError, load_config
from pretrain.training.layout import engine_config, launch_report, memory_estimates, resolve_layout

REPO = Path(__file__).resolve().parents[1]
D_MODEL = 64  # the worker's model


def run_worker(scenario: str, ranks: int, tmp_path: Path, env: dict) -> list[dict]:
    stdlib_tokenizer(tmp_path / "tokenizer.json")
    env = {**env, "HF_HOME": str(tmp_path / "hf_home")}  # transformers' remote-code cache
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(REPO / "tests" / "support" / "multirank_pipeline_worker.py"), scenario, str(tmp_path),
         str(tmp_path / "tokenizer.json")],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]


def test_pp2_follows_pp1_with_short_micro_batches_resumes_and_exports(tmp_path, subprocess_env):
    ranks = run_worker("pp2", 2, tmp_path, subprocess_env)
    first, second = ranks
    for r in ranks:
        assert r["pp2_loss"] < 1e-5 and r["pp2_grad_norm"] < 1e-5, r
        assert r["compiled_pointwise_names"] == ["compiled"], r
        assert r["positions_picked"] <= 1e-6 and r["positions_block"] <= 1e-6, r  # broadcast to every stage
        assert r["control_positions"] > 1e-2, r
    assert first["pp2_weights"] < 1e-5, first
    # the boundary: full hidden states, at 16 positions or at a short micro-batch's own length
    assert first["boundary_shapes"] == []
    shapes = second["boundary_shapes"]
    assert {s[1] for s in shapes} == {16, 9, 5} and all(s[2] == D_MODEL for s in shapes), shapes
    assert first["control_padded_loss"] > 1e-2, first
    # resume: a fresh engine from the step-3 checkpoint replays steps 4-5 bit for bit
    for r in ranks:
        assert r["resumed_losses"] == r["uninterrupted_losses"]
        assert r["layout_free_resumed_loss"] < 1e-6, r  # from whole weights and optimizer.safetensors
        assert r["control_weights_only_loss"] > 1e-3, r
    assert first["resumed_weights_diff"] == 0.0
    assert first["checkpoint_weights_3"] < 1e-5, first
    # fp32 export loaded by transformers gives the pipeline's logits; not those two steps later
    assert first["export_logits"] < 1e-5 and first["control_export_logits"] > 1e-2, first


def test_pp2_tp2_and_pp2_dp2_follow_the_single_process_run(tmp_path, subprocess_env):
    ranks = run_worker("pp4", 4, tmp_path, subprocess_env)
    for r in ranks:
        assert r["tp_dp_world_size"] == 1 and r["dp_dp_world_size"] == 2
        assert r["tp_loss"] < 1e-5 and r["tp_grad_norm"] < 1e-5, r
        assert r["dp_loss"] < 1e-5 and r["dp_grad_norm"] < 1e-5, r
        # without the tensor axis DeepSpeed sees 2 replicas, raises nothing, trains wrongly
        assert r["control_dp_world_size"] == 2 and r["control_loss"] > 1e-2, r
    assert ranks[0]["tp_weights"] < 1e-5 and ranks[0]["dp_weights"] < 1e-5, ranks[0]
    assert ranks[0]["control_weights"] > 1e-2, ranks[0]
    assert ranks[0]["dp_master_weights"] == 0.0 and ranks[0]["dp_state_names"], ranks[0]
    # both tensor-parallel ranks of stage 1 receive the whole hidden state, never a TP shard
    for r in ranks:
        shapes = r["tp_boundary_shapes"]
        if r["tp_stage"] == 1:
            assert {s[1] for s in shapes} == {16, 9, 5} and all(s[2] == D_MODEL for s in shapes), shapes
        else:
            assert shapes == []


RUN = ["--config", str(REPO / "recipes" / "tiny.yaml"), "model.n_layers=3", "parallel.zero_stage=1",
       "train.micro_batch_size=8", "logging.every=1", "logging.progress_bar=false",
       "data.variable_length_prob=0.3", "validation.every=5", "validation.batches=1",
       "validation.batch_size=8", "validation.elbo_every=5", "validation.elbo_sequences=4",
       "validation.elbo_mc_num=4", "validation.elbo_batch_size=2", "sample.gen_length=8",
       "sample.steps=8", "sample.block_length=8"]


def records(run_dir: Path, key: str) -> dict[int, object]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def test_cli_pipeline_run_trains_resumes_and_samples_like_one_process(tmp_path, subprocess_env):
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", *RUN, "train.steps=5",
                           "data.max_bytes=1000000", "data.heldout_fraction=0.1", f"train.out_dir={one}"],
                          capture_output=True, text=True, timeout=300, env=subprocess_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = one / "data"
    shards = ["data.source=shards", f"data.sources=[{{path: {data / 'train'}}}]",
              f"data.validation_path={data / 'heldout'}", f"data.tokenizer={data / 'tokenizer.json'}"]
    pp = tmp_path / "pp"
    for steps, resume in ((3, []), (5, ["--resume", "auto"])):
        proc = subprocess.run(
            ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module",
             "pretrain.train", *RUN, *shards, "parallel.pipeline_parallel=2", "checkpoint.every=3",
             f"train.steps={steps}", f"train.out_dir={pp}", *resume],
            capture_output=True, text=True, timeout=300, env=subprocess_env, cwd=REPO)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2 = TP 1 x DP 1 x PP 2" in proc.stdout
    assert "pipeline: stage 0: embedding + blocks 0-1 | stage 1: block 2 + final norm, head, loss" in proc.stdout
    assert "resumed from" in proc.stdout and "ran 2 steps (4..5)" in proc.stdout
    assert (pp / "checkpoints" / "step_00000005" / "model.safetensors").is_file()

    losses, reference = records(pp, "loss"), records(one, "loss")
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert [losses[s] for s in range(1, 6)] == pytest.approx([reference[s] for s in range(1, 6)], rel=1e-5)
    for key in ("tokens", "data/train/tokens"):  # each replica counted once, not each stage
        assert records(pp, key) == records(one, key), key
    for key in ("val/loss", "val/elbo_nll"):  # the 3-step run also validated at its end
        assert sorted(records(one, key)) == [0, 5]
        assert [records(pp, key)[s] for s in (0, 5)] == pytest.approx(list(records(one, key).values()), rel=1e-5)
    assert records(pp, "sample/text")[5] == records(one, "sample/text")[5]
    # micro-batches of the run were cut short (the 1% rule, here at 30%): fewer than 32 x 64 tokens
    assert any(tokens % (32 * 64) for tokens in records(one, "tokens").values())


def config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    return str(e.value)


def test_config_refuses_what_the_pipeline_engine_cannot_run():
    pp = ["parallel.pipeline_parallel=2"]
    assert "set parallel.zero_stage: 1" in config_error(pp)  # the default stage is 3
    assert "set parallel.zero_stage: 1" in config_error([*pp, "parallel.zero_stage=2"])
    ok = [*pp, "parallel.zero_stage=1"]
    load_config(None, ok)
    assert "use at most 2 stages" in config_error(["parallel.pipeline_parallel=3", "parallel.zero_stage=1",
                                                   "model.n_layers=2"])
    assert "tied weights need parallel.pipeline_parallel 1" in config_error([*ok, "model.weight_tying=true"])
    assert "the pipeline trains the masked diffusion objective" in config_error(
        [*ok, "train.objective=arm", "model.causal=true"])
    assert "parallel.pipeline_parallel: must be >= 1" in config_error(["parallel.pipeline_parallel=0"])
    cfg = load_config(None, [*ok, "parallel.tensor_parallel=2", "train.global_batch_size=8"])
    with pytest.raises(ConfigError, match="world size 6 is not divisible by TP 2 x PP 2"):
        resolve_layout(cfg, 6)
    layout = resolve_layout(cfg, 8)
    assert (layout.data_parallel, layout.pipeline_parallel) == (2, 2)
    assert layout.checkpoint_key() == {"tensor_parallel": 2, "data_parallel": 2, "pipeline_parallel": 2}
    assert engine_config(cfg, layout)["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    single = load_config(None, [])
    assert "pipeline" not in engine_config(single, resolve_layout(single, 1))


def test_uneven_blocks_are_balanced_as_deepspeed_splits_them_and_the_plan_is_printed():
    from deepspeed.runtime.utils import partition_balanced

    from parallel.topology import stage_blocks
    for stages in range(2, 9):
        for blocks in range(stages, 34):
            # DeepSpeed's `type:BlockStage` split of [embedding, blocks..., head]
            split = [int(p) for p in partition_balanced([0] + [1] * blocks + [0], stages)]
            plan = stage_blocks(blocks, stages)
            assert split == [0] + [1 + b[0] for b in plan[1:]] + [blocks + 2], (blocks, stages)
    cfg = load_config(None, ["model.preset=llada_1b", "parallel.pipeline_parallel=4",
                             "parallel.zero_stage=1", "train.global_batch_size=8",
                             "train.micro_batch_size=1"])
    layout = resolve_layout(cfg, 8)
    report = launch_report(cfg, layout, memory_estimates(cfg, layout, bf16=True))
    assert ("pipeline: stage 0: embedding + blocks 0-5 | stage 1: blocks 6-11 | stage 2: blocks "
            "12-16 | stage 3: blocks 17-21 + final norm, head, loss") in report
    assert "memory per stage in GiB (1F1B: stage s keeps min(4 - s, 4) micro-batches in flight): stage 0: " in report
    assert "memory plan per device (stage 0, the most loaded)" in report

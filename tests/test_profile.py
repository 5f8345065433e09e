"""`python -m pretrain.profile` on two data-parallel gloo ranks, and the loop's step profiler.

One real 2-rank launch of the profile CLI on the demo config (the real training loop, DeepSpeed
ZeRO-3, fused AdamW switched on) must print the table (tokens/s, model and executed TFLOP/s,
MFU "unknown" on a CPU, peak memory, the time split), write a Chrome trace per rank that shows
the fused optimizer kernel, leave no checkpoint behind, and report per-device FLOP/s and tokens/s
that agree with the FLOPs per token: FLOPs summed over both ranks, each counted once (counting
one rank's only would halve the ratio). In process, the profiler leaves the warm-up steps out
and gives MFU only with a known peak.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.ports import free_port

from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from pretrain.diffusion.objectives import forward_process, pretrain_loss_from_ce
from pretrain.profile import last_perf_record, table
from pretrain.runtime.flops import FlopMeter, model_flops_per_token
from pretrain.runtime.throughput import PHASES, ProfileConfig, StepProfiler
from pretrain.training.config import load_config

OVERRIDES = ["data.max_bytes=1000000", "data.heldout_fraction=0.2", "data.variable_length_prob=0",
             "data.num_workers=1", "model.n_layers=2", "train.micro_batch_size=8",
             "train.global_batch_size=16", "logging.progress_bar=false", "fast.fused_adamw=true"]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, subprocess_env):
    out = tmp_path_factory.mktemp("profile")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "pretrain.profile", "--config", "recipes/tiny.yaml",
         "--steps", "3", "--warmup", "1", "--trace-steps", "2", *OVERRIDES, f"train.out_dir={out}"],
        capture_output=True, text=True, timeout=600, env=subprocess_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_prints_the_table(profiled):
    _, stdout = profiled
    for row in ("| device ", "cpu x 2", "| steps measured ", "3 (of 4)", "| tokens/s per device ",
                "| model TFLOP/s per device ", "GFLOP/token at seq 64", "| executed TFLOP/s per device ",
                "unknown (no peak for 'cpu'; pass --peak-tflops)", "GiB (process peak RSS)",
                *(f"|   {phase} " for phase in ("data", "forward", "backward", "optimizer",
                                                  "communication", "other")),
                "fused_adamw True"):
        assert row in stdout, row


def test_writes_a_trace_per_rank_showing_the_fused_optimizer(profiled):
    out, _ = profiled
    for rank in (0, 1):
        events = json.loads((out / "profile" / f"trace_rank{rank:05d}.json").read_text())["traceEvents"]
        names = {e.get("name", "") for e in events}
        assert sum(name.startswith("ProfilerStep#") for name in names) == 2
        assert "aten::_fused_adamw_" in names
    assert not (out / "checkpoints").exists()  # a profile saves nothing


def test_flop_rate_agrees_with_tokens_per_device_over_both_ranks(profiled):
    out, _ = profiled
    record = last_perf_record(out)
    cfg = load_config("recipes/tiny.yaml", OVERRIDES)
    per_token = model_flops_per_token(cfg.model, cfg.data.seq_len)
    ratio = record["perf/model_tflops_per_device"] * 1e12 / record["perf/tokens_per_s_per_device"]
    assert ratio == pytest.approx(per_token, rel=1e-9)
    # the head ran at masked positions only (about half of them)
    assert 0.5 < record["perf/executed_tflops_per_device"] / record["perf/model_tflops_per_device"] < 1
    assert record["perf/mfu"] is None and record["perf/peak_tflops"] is None
    phases = [record[f"perf/ms/{p}"] for p in PHASES if p != "pipeline"] + [record["perf/ms/other"]]
    assert sum(phases) == pytest.approx(record["perf/ms/step"])
    assert record["perf/ms/forward"] > 0 and record["perf/ms/backward"] > 0


CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                  vocab_size=50, max_sequence_length=32)


def profiled_steps(peak_tflops: float, steps: int) -> dict:
    model = LLaDAModel(CFG)
    meter = FlopMeter(CFG, activation_checkpointing="none", loss_chunk_tokens=0).attach(model)
    profiler = StepProfiler(ProfileConfig(peak_tflops=peak_tflops, warmup_steps=1), meter=meter,
                            out_dir=Path("unused"), rank=0, world_size=1, ranks_per_replica=1)
    ids = torch.randint(0, 49, (2, 16), generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        profiler.start_step()
        noise = forward_process(ids, 49, generator=torch.Generator().manual_seed(step))
        profiler.lap("data")
        loss = pretrain_loss_from_ce(model(noise.noisy, targets=ids, loss_mask=noise.masked), noise)
        profiler.lap("forward")
        loss.backward()
        profiler.lap("backward")
        profiler.end_step(ids.numel())
    return profiler.report()


def test_step_profiler_leaves_out_the_warmup_and_needs_a_peak_for_mfu():
    assert profiled_steps(0.0, steps=1) == {}  # only the warm-up step ran
    unknown, known = profiled_steps(0.0, steps=3), profiled_steps(2.0, steps=3)
    assert unknown["perf/steps"] == known["perf/steps"] == 2
    assert unknown["perf/mfu"] is None
    assert known["perf/mfu"] == pytest.approx(known["perf/model_tflops_per_device"] / 2.0)
    cfg = load_config(None, [])
    text = table(cfg, {**known, "perf/peak_tflops": 2.0, "perf/mfu": 0.123}, 1, Path("trace"))
    assert "| MFU " in text and "12.3% of 2 TFLOP/s" in text

"""Elastic resume: a checkpoint continues in another layout with nothing dropped.

A run of the tiny model saved under TP 2 x DP 2 (ZeRO-3, 4 gloo ranks, fp32, the 1% rule off) is
restored by the trainer under 1 rank, DP 4 (two loader workers), TP 2 x DP 1 (fused
projections) and PP 2 (ZeRO-1) (`support/elastic_worker.py`):
- the whole weights and every optimizer-state tensor (fp32 master, both Adam moments), gathered
  under the released names right after the restore, equal the checkpoint's bit for bit;
- the next three steps, on the same global batches (the data stream's lanes and the noise are
  keyed by the row of the global batch), follow the uninterrupted 4-rank run within fp32
  tolerance;
- controls: the same resume from a scrambled optimizer state, and one that restarts the
  optimizer (`checkpoint.resume_without_optimizer`), leave that tolerance; a checkpoint without
  the layout-free state is refused in another layout, with the reason and what works.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.training_runs import BASE, REPO, TINY, launch, losses_after_last_resume, train_run

from pretrain.checkpoint.optimizer_state import OPTIMIZER_FILE
from pretrain.checkpoint.store import CheckpointError, tag_of
from pretrain.training.config import load_config
from pretrain.training.layout import resolve_layout
from pretrain.training.resume_plan import resume_plan

WORKER = REPO / "tests" / "support" / "elastic_worker.py"
SAVED = ["parallel.tensor_parallel=2", "train.micro_batch_size=2", "data.variable_length_prob=0",
         "schedule.warmup_steps=2"]
COMMON = ["train.micro_batch_size=2", "data.variable_length_prob=0", "schedule.warmup_steps=2"]
LAYOUTS = {
    "one rank": (1, []),
    "DP 4, two loader workers": (4, ["data.num_workers=2"]),
    "TP 2 x DP 1, fused projections": (2, ["parallel.tensor_parallel=2", "fast.fuse_projections=true"]),
    "PP 2, ZeRO-1": (2, ["parallel.pipeline_parallel=2", "parallel.zero_stage=1"]),
}
RESUMED_STEPS = 3
TOLERANCE = 1e-5  # relative, on each step's loss


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, subprocess_env, data_args) -> Path:
    """TP 2 x DP 2 under ZeRO-3 for 6 steps, saving at step 3 (with the layout-free state)."""
    out = tmp_path_factory.mktemp("tp2dp2")
    train_run(subprocess_env, 4, out, "train.steps=6", *SAVED, *data_args)
    return out


def resume_elsewhere(env, checkpoint: Path, out: Path, ranks: int, *overrides: str) -> subprocess.CompletedProcess:
    args = [*BASE, *COMMON, *overrides]
    proc = subprocess.run(launch(ranks, str(WORKER), str(TINY), str(checkpoint), str(out), str(RESUMED_STEPS), *args),
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def resumed_losses(out: Path) -> dict[int, float]:
    return {int(step): loss for step, loss in json.loads((out / "losses.json").read_text()).items()}


def close_to(losses: dict[int, float], reference: dict[int, float]) -> bool:
    return all(abs(loss - reference[step]) <= TOLERANCE * abs(reference[step]) for step, loss in losses.items())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_in_another_layout_is_exact(tmp_path, subprocess_env, data_args, uninterrupted, layout):
    ranks, overrides = LAYOUTS[layout]
    checkpoint = uninterrupted / "checkpoints" / tag_of(3)
    proc = resume_elsewhere(subprocess_env, checkpoint, tmp_path, ranks, *overrides, *data_args)
    assert "layout changed from TP 2 x DP 2, ZeRO-3 to" in proc.stdout
    assert "carried over: the weights, the optimizer state (fp32 master weights, both Adam moments, AdamW step 3)" \
        in proc.stdout
    restored = load_file(tmp_path / "restored.safetensors")
    saved = {**{f"weights/{k}": v for k, v in load_file(checkpoint / "model.safetensors").items()},
             **load_file(checkpoint / OPTIMIZER_FILE)}
    assert sorted(restored) == sorted(saved)
    assert {k for k in saved if k.startswith("exp_avg_sq/")} and all(saved[k].abs().sum() > 0 for k in saved)
    unequal = [k for k in saved if not torch.equal(restored[k], saved[k])]
    assert not unequal, f"{len(unequal)} tensors differ after the restore, e.g. {unequal[:3]}"
    reference = losses_after_last_resume(uninterrupted)
    losses = resumed_losses(tmp_path)
    assert sorted(losses) == [4, 5, 6]
    assert close_to(losses, reference), (losses, {s: reference[s] for s in losses})


def scramble_moments(checkpoint: Path, into: Path) -> Path:
    """A copy of the checkpoint whose Adam moments are each tensor's values in reversed order."""
    copy = into / checkpoint.name
    shutil.copytree(checkpoint, copy)
    tensors = load_file(copy / OPTIMIZER_FILE)
    scrambled = {k: (v.flatten().flip(0).reshape(v.shape).contiguous() if k.startswith("exp_avg") else v)
                 for k, v in tensors.items()}
    save_file(scrambled, str(copy / OPTIMIZER_FILE), metadata={"format": "llada-optimizer-state/1",
                                                                "optimizer": "AdamW", "step": "3"})
    return copy


@pytest.mark.parametrize("control", ["scrambled moments", "optimizer restarted"])
def test_controls_leave_the_tolerance(tmp_path, subprocess_env, data_args, uninterrupted, control):
    checkpoint = uninterrupted / "checkpoints" / tag_of(3)
    extra = []
    if control == "scrambled moments":
        checkpoint = scramble_moments(checkpoint, tmp_path)
    else:
        copy = tmp_path / checkpoint.name
        shutil.copytree(checkpoint, copy, ignore=shutil.ignore_patterns(OPTIMIZER_FILE))
        checkpoint, extra = copy, ["checkpoint.resume_without_optimizer=true"]
    proc = resume_elsewhere(subprocess_env, checkpoint, tmp_path / "run", 1, *extra, *data_args)
    if extra:
        assert "the optimizer restarts (checkpoint.resume_without_optimizer)" in proc.stdout
    losses = resumed_losses(tmp_path / "run")
    assert not close_to(losses, losses_after_last_resume(uninterrupted))


def test_a_checkpoint_without_the_layout_free_state_is_refused_in_another_layout(tmp_path, uninterrupted):
    copy = tmp_path / tag_of(3)
    shutil.copytree(uninterrupted / "checkpoints" / tag_of(3), copy, ignore=shutil.ignore_patterns(OPTIMIZER_FILE))
    cfg = load_config(TINY, [*BASE, *COMMON])
    with pytest.raises(CheckpointError) as refused:
        resume_plan(copy, cfg, resolve_layout(cfg, 1).checkpoint_key())
    message = str(refused.value)
    assert "\n" not in message
    assert ("layout changed from TP 2 x DP 2, ZeRO-3 to TP 1 x DP 1, ZeRO-3, but the checkpoint holds no "
            "layout-free optimizer state") in message
    assert "resume it in TP 2 x DP 2, ZeRO-3" in message and "checkpoint.resume_without_optimizer=true" in message
    same = load_config(TINY, [*BASE, *SAVED])
    assert resume_plan(copy, same, resolve_layout(same, 4).checkpoint_key()).same_layout


def test_another_global_batch_is_refused_before_the_engine_is_built(tmp_path, subprocess_env, data_args,
                                                                   uninterrupted):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(uninterrupted / "checkpoints" / tag_of(3), out / "checkpoints" / tag_of(3))
    proc = train_run(subprocess_env, 1, out, *COMMON, "train.global_batch_size=16", "train.steps=6", *data_args,
                     "--resume", "auto", check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    [line] = [line for line in proc.stderr.splitlines() if "data_state.json" in line]
    assert "global_batch_size is 8 in the checkpoint but 16 now" in line
    assert f"train.init_from={out / 'checkpoints' / tag_of(3)}" in line

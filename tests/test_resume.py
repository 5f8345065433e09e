"""Checkpoints lose nothing: exact resume after kill -9, preemption, guard rails, overrides.

Real training runs of the tiny model (fp32, CPU; 2 gloo ranks under torchrun where it matters)
on data prepared once for the module:
- kill -9 of a 2-rank run at a random step, then `--resume auto`: the first resumed step is the
  checkpoint's step + 1 and every loss from there equals the uninterrupted run's bit for bit;
  the same for a tensor-parallel (TP=2, fused projections) run;
- a perturbed optimizer shard changes the resumed losses (optimizer state is really restored);
- a crash inside the save, after the shards are written and before publishing: the next resume
  uses the previous complete checkpoint;
- SIGTERM to one rank: both ranks save the same step and the job exits 0;
- injected NaN steps are skipped and counted, K in a row halt the run with the recovery;
- a learning-rate override on resume is logged and followed; a new layout (one rank, fused
  projections) says what changed and what was carried over (test_elastic_resume.py checks that
  it is exact), and its checkpoint keeps the released tensor names; retention keeps last N +
  every Mth.
"""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from support.training_runs import (
    BASE,
    REPO,
    command,
    losses_after_last_resume,
    step_records,
    train_run,
)

from pretrain.checkpoint import store as ckpt
from pretrain.checkpoint import weights
from pretrain.checkpoint.hf_format import expected_tensors
from pretrain.checkpoint.safetensors_stream import read_header
from pretrain.training.config import load_config
from pretrain.training.loop import run


@pytest.fixture(scope="module")
def reference_2ranks(tmp_path_factory, subprocess_env, data_args) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    train_run(subprocess_env, 2, out, "train.steps=10", *data_args)
    return out


def test_kill_9_then_resume_auto_replays_the_uninterrupted_run(tmp_path, subprocess_env, data_args,
                                                              reference_2ranks):
    out = tmp_path / "killed"
    kill_after = random.Random().randint(4, 8)
    proc = subprocess.Popen(command(2, *BASE, "train.steps=10", *data_args, f"train.out_dir={out}"),
                            env=subprocess_env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and any(r.get("step", 0) >= kill_after and "loss" in r
                                    for r in step_records(metrics.parent)):
            break
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    saved = ckpt.published_steps(out / "checkpoints")
    assert saved and saved[-1] < 10
    resumed = train_run(subprocess_env, 2, out, "train.steps=10", *data_args, "--resume", "auto")
    first = saved[-1] + 1
    assert f"resumed from {out / 'checkpoints' / ckpt.tag_of(saved[-1])}: steps {first}..10" in resumed.stdout
    assert f"ran {10 - saved[-1]} steps ({first}..10)" in resumed.stdout
    after = losses_after_last_resume(out)
    reference = losses_after_last_resume(reference_2ranks)
    assert sorted(after) == list(range(first, 11))
    assert after == {s: reference[s] for s in after}  # bit for bit


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"PPid:\t{pid}\n" in (entry / "status").read_text():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it (torchrun's workers get their own sessions)."""
    stack, tree = [pid], []
    while stack:
        p = stack.pop()
        tree.append(p)
        stack.extend(children(p))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def perturb_optimizer_state(path: Path) -> None:
    for shard in path.glob("*optim_states.pt"):
        state = torch.load(shard, map_location="cpu", weights_only=False)

        def scale(node):
            if isinstance(node, dict):
                return {k: (v * 50 if k in ("exp_avg", "exp_avg_sq") and torch.is_tensor(v) else scale(v))
                        for k, v in node.items()}
            if isinstance(node, list):
                return [scale(v) for v in node]
            return node
        torch.save(scale(state), shard)


def test_optimizer_state_is_restored_not_recreated(tmp_path, subprocess_env, data_args, reference_2ranks):
    out = tmp_path / "corrupted"
    source = reference_2ranks / "checkpoints" / ckpt.tag_of(6)
    target = out / "checkpoints" / ckpt.tag_of(6)
    target.parent.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    perturb_optimizer_state(target)
    train_run(subprocess_env, 2, out, "train.steps=8", *data_args, "--resume", "auto")
    after, reference = losses_after_last_resume(out), losses_after_last_resume(reference_2ranks)
    assert sorted(after) == [7, 8]
    assert after[7] == reference[7]  # the weights are intact: the first loss is unchanged ...
    assert after[8] != reference[8]  # ... but the update from the perturbed moments differs


def test_sigterm_to_one_rank_saves_the_same_step_everywhere_and_exits_0(tmp_path, subprocess_env, data_args):
    out = tmp_path / "preempted"
    proc = subprocess.Popen(command(2, *BASE, "train.steps=500", "checkpoint.every=0", *data_args,
                                    f"train.out_dir={out}"),
                            env=subprocess_env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and any("loss" in r for r in step_records(out)):
            break
        time.sleep(0.05)
    rank1 = [p for p in children(proc.pid) if b"\x00RANK=1\x00" in Path(f"/proc/{p}/environ").read_bytes()]
    assert len(rank1) == 1
    rank1 = rank1[0]
    os.kill(rank1, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    saved = ckpt.published_steps(out / "checkpoints")
    assert len(saved) == 1 and saved[0] < 500
    path = out / "checkpoints" / ckpt.tag_of(saved[0])
    assert (path / "rank_00000.json").is_file() and (path / "rank_00001.json").is_file()
    assert ckpt.read_trainer_state(path)["step"] == saved[0]
    assert "preempted (" in stdout and f"saved step {saved[0]}" in stdout


def test_nan_steps_are_skipped_and_k_in_a_row_halt(tmp_path, subprocess_env, data_args):
    out = tmp_path / "nan"
    proc = train_run(subprocess_env, 1, out, "train.steps=20", *data_args,
                     "guard.inject_nan_at_steps=[2,5,6,7]", "guard.max_consecutive_skips=3",
                     check=False)
    assert proc.returncode == 4, proc.stderr[-2000:]
    records = {r["step"]: r for r in step_records(out) if "loss" in r}
    assert records[2]["skipped_steps"] == 1 and records[3]["skipped_steps"] == 1
    assert records[4]["grad_norm"] > 0 and records[4]["max_logit"] > 0
    assert records[7]["skipped_steps"] == 4 and 8 not in records
    message = proc.stdout
    assert "halting at step 7" in message and "3 consecutive steps" in message
    assert str(out / "checkpoints" / ckpt.tag_of(6)) in message and "schedule.lr_scale=0.5" in message


def test_crash_inside_the_save_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch, data_args):
    out = tmp_path / "crash"
    cfg = load_config(REPO / "recipes" / "tiny.yaml", [*BASE, "train.steps=6", *data_args,
                                                       f"train.out_dir={out}"])
    real_publish = ckpt.publish

    def crash_at_6(root, tmp, step):
        if step == 6:
            raise OSError("injected: node lost while publishing")
        return real_publish(root, tmp, step)

    monkeypatch.setattr(ckpt, "publish", crash_at_6)
    with pytest.raises(OSError, match="injected"):
        run(cfg)
    root = out / "checkpoints"
    assert ckpt.published_steps(root) == [3] and (root / ".tmp-step_00000006").is_dir()
    assert ckpt.find_resume(root, "auto") == root / ckpt.tag_of(3)


def test_lr_override_and_new_layout_on_resume(tmp_path, subprocess_env, data_args, reference_2ranks):
    out = tmp_path / "override"
    (out / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(reference_2ranks / "checkpoints" / ckpt.tag_of(6)),
                    str(out / "checkpoints")], check=True)
    proc = train_run(subprocess_env, 1, out, "train.steps=8", *data_args, "schedule.lr_scale=0.5",
                     "fast.fuse_projections=true", "--resume", "auto")
    assert "resume override schedule.lr_scale: 1.0 -> 0.5" in proc.stdout
    assert ("layout changed from TP 1 x DP 2, ZeRO-3 to TP 1 x DP 1, ZeRO-3, fused projections\n"
            "carried over: the weights, the optimizer state (fp32 master weights, both Adam moments, AdamW step 6)"
            ) in proc.stdout
    # the fused run read the unfused checkpoint and writes the released format itself
    newest = weights.weights_checkpoint(out / "checkpoints")
    assert newest.name == ckpt.tag_of(8)
    expected = expected_tensors(weights.read_model_config(newest))
    assert sorted(read_header(newest / "model.safetensors")) == sorted(expected)
    lr = {r["step"]: r["lr"] for r in step_records(out) if "lr" in r}
    reference = {r["step"]: r["lr"] for r in step_records(reference_2ranks) if "lr" in r}
    assert lr[7] == pytest.approx(0.5 * reference[7]) and lr[8] == pytest.approx(0.5 * reference[8])


def test_retention_keeps_the_last_n_and_every_mth(tmp_path):
    for step in range(2, 14, 2):
        (tmp_path / ckpt.tag_of(step)).mkdir()
    (tmp_path / ".tmp-step_00000014").mkdir()
    assert ckpt.prune(tmp_path, keep_last=2, keep_every=4) == [2, 6]
    assert ckpt.published_steps(tmp_path) == [4, 8, 10, 12]
    assert (tmp_path / ".tmp-step_00000014").is_dir()


def test_tensor_parallel_run_resumes_bit_for_bit(tmp_path, subprocess_env, data_args):
    """TP=2 under ZeRO-3 (each rank's megatron shard and ZeRO partition) with full checkpointing,
    a chunked head and fused projections: 6 steps, then resumed to 9, equal an uninterrupted
    9-step run."""
    tp = ["parallel.tensor_parallel=2", "train.micro_batch_size=8", "memory.activation_checkpointing=full",
          "memory.loss_chunk_tokens=100", "fast.fuse_projections=true", *data_args]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    train_run(subprocess_env, 2, resumed, "train.steps=6", *tp)
    train_run(subprocess_env, 2, resumed, "train.steps=9", *tp, "--resume", "auto")
    train_run(subprocess_env, 2, straight, "train.steps=9", *tp)
    after = losses_after_last_resume(resumed)
    assert sorted(after) == [7, 8, 9]
    assert after == {s: losses_after_last_resume(straight)[s] for s in after}

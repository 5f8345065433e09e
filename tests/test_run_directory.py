"""A run directory holds one run: a second fresh run is refused (or moves the old one aside with
--overwrite), retention never deletes the checkpoint just written nor leaves `latest` dangling,
and `--resume` names its accepted forms on a bad path, accepts a checkpoints root, and refuses a
checkpoint already past train.steps; every refusal comes before any data preparation (exit 2).

One tiny run (4 steps, checkpoints at 2 and 4) is shared by the module; the other runs either
stop at the check or train on its prepared shards.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.checkpoint import store
from pretrain.training.config import load_config
from pretrain.training.loop import check_run_directory

REPO = Path(__file__).resolve().parents[1]
BASE = ["train.micro_batch_size=4", "train.global_batch_size=8", "model.n_layers=2",
        "validation.every=0", "validation.elbo_every=0", "logging.every=1",
        "logging.progress_bar=false", "data.num_workers=1", "checkpoint.every=2",
        "checkpoint.keep_last=3", "sample.gen_length=4", "sample.steps=4", "sample.block_length=4",
        "data.max_bytes=1500000", "data.heldout_fraction=0.1"]


def train(env, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(REPO / "recipes" / "tiny.yaml"),
                           *BASE, *args, f"train.out_dir={out}"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, subprocess_env) -> Path:
    out = tmp_path_factory.mktemp("first") / "run"
    ok(train(subprocess_env, out, "train.steps=4"))
    assert store.published_steps(out / "checkpoints") == [2, 4]
    return out


def shards(run: Path) -> list[str]:
    data = run / "data"
    return ["data.source=shards", f"data.sources=[{{path: {data / 'train'}}}]",
            f"data.tokenizer={data / 'tokenizer.json'}"]


def refusal_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_second_fresh_run_is_refused_before_data(first_run, subprocess_env, tmp_path):
    data_mtime = (first_run / "data").stat().st_mtime_ns
    metrics = (first_run / "metrics.jsonl").read_text()
    line = refusal_line(train(subprocess_env, first_run, "train.steps=2"))
    for choice in ("--resume auto", "train.out_dir", "--overwrite"):
        assert choice in line
    assert (first_run / "data").stat().st_mtime_ns == data_mtime
    assert (first_run / "metrics.jsonl").read_text() == metrics
    assert store.published_steps(first_run / "checkpoints") == [2, 4]
    # the same over a shared checkpoint.dir: the new out_dir's corpus is never prepared
    other = tmp_path / "other"
    refusal_line(train(subprocess_env, other, "train.steps=2", f"checkpoint.dir={first_run / 'checkpoints'}"))
    assert not (other / "data").exists()


def test_resume_bad_path_names_the_forms(first_run, subprocess_env, tmp_path):
    out = tmp_path / "typo"
    missing = first_run / "checkpoints" / "step_0000004"
    line = refusal_line(train(subprocess_env, out, "train.steps=2", "--resume", str(missing)))
    assert str(missing) in line and "'auto'" in line and "step_XXXXXXXX" in line and "checkpoints directory" in line
    assert not (out / "data").exists()


def test_resume_checkpoints_root_and_already_past_steps(first_run, subprocess_env, tmp_path):
    root = first_run / "checkpoints"
    assert store.find_resume(root, str(root)) == root / "step_00000004"
    # through the command: the root resolves to step 4, which is past train.steps 2
    out = tmp_path / "past"
    line = refusal_line(train(subprocess_env, out, "train.steps=2", "--resume", str(root)))
    assert "already at step 4" in line and "train.steps 2" in line
    assert not (out / "data").exists()


def test_overwrite_moves_the_old_run_aside(first_run, subprocess_env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(first_run, run)
    proc = ok(train(subprocess_env, run, "train.steps=2", "--overwrite", *shards(first_run)))
    aside = list(tmp_path.glob("run.replaced-*"))
    assert len(aside) == 1, proc.stdout
    assert store.published_steps(aside[0] / "checkpoints") == [2, 4]
    assert (aside[0] / "metrics.jsonl").read_text() == (first_run / "metrics.jsonl").read_text()
    assert store.published_steps(run / "checkpoints") == [2]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert "resumed_from" not in (run / "metrics.jsonl").read_text()


def test_resume_of_older_step_keeps_what_it_writes(first_run, subprocess_env, tmp_path):
    """keep_last 1, resumed from step 2 while step 4 exists, saving step 3: the old rule (newest
    keep_last by step) deleted step 3 right after writing it and left `latest` dangling."""
    run = tmp_path / "run"
    shutil.copytree(first_run, run)
    ok(train(subprocess_env, run, "train.steps=3", "checkpoint.keep_last=1", *shards(first_run),
             "--resume", str(run / "checkpoints" / "step_00000002")))
    root = run / "checkpoints"
    latest = (root / "latest").read_text().strip()
    assert latest == "step_00000003" and (root / latest / "trainer_state.json").is_file()
    assert store.published_steps(root) == [3, 4]  # step 2 pruned; the abandoned step 4 kept


def old_prune_rule(steps: list[int], keep_last: int) -> set[int]:
    return set(steps[-keep_last:])


@pytest.mark.parametrize("keep_last", [1, 2, 3])
@pytest.mark.parametrize("written", [5, 15, 25, 40])
def test_prune_keeps_the_written_step(tmp_path, keep_last, written):
    root = tmp_path / "checkpoints"
    for s in (10, 20, 30):
        (root / store.tag_of(s)).mkdir(parents=True)
        (root / store.tag_of(s) / store.TRAINER_STATE).write_text("{}")
    tmp = root / f".tmp-{store.tag_of(written)}"
    tmp.mkdir()
    (tmp / store.TRAINER_STATE).write_text("{}")
    store.publish(root, tmp, written)
    before = store.published_steps(root)
    store.prune(root, keep_last, 0, written=written)
    after = store.published_steps(root)
    latest = (root / store.LATEST).read_text().strip()
    assert (root / latest).is_dir() and latest == store.tag_of(written)
    older = [s for s in before if s <= written]
    assert set(after) == set(older[-keep_last:]) | {s for s in before if s > written}
    # negative control: the old rule (newest keep_last by step) drops the step just written
    # whenever keep_last or more newer steps are on disk (e.g. 5 with keep_last 3, 25 with 1)
    newer = sum(s > written for s in before)
    assert (written in old_prune_rule(before, keep_last)) == (newer < keep_last)


def test_metrics_of_a_run_without_checkpoints_is_not_appended_to(tmp_path):
    """A run that crashed before its first checkpoint left only metrics.jsonl: a fresh run is
    refused like one over checkpoints; --overwrite and --resume auto (a fresh start) go ahead."""
    out = tmp_path / "run"
    cfg = load_config(None, [f"train.out_dir={out}"], check_paths=False)
    check_run_directory(cfg, resume=None, overwrite=False)  # control: an empty directory is fine
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    check_run_directory(cfg, resume=None, overwrite=False)  # an empty file holds no run
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n')
    with pytest.raises(store.CheckpointError, match="metrics.jsonl.*--resume auto.*train.out_dir.*--overwrite"):
        check_run_directory(cfg, resume=None, overwrite=False)
    check_run_directory(cfg, resume=None, overwrite=True)
    check_run_directory(cfg, resume="auto", overwrite=False)

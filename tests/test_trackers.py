"""The experiment trackers record what metrics.jsonl records, and a resume continues their runs.

Real tiny training runs (CPU) with W&B in offline mode (its `.wandb` files read back record by
record) and MLflow on a local file store (read back with its client):
- 4 steps, then `--resume auto` to 6: each tracker holds one run (the id kept in the checkpoint)
  whose loss curve is steps 1..6 with metrics.jsonl's values; the config and the launch report
  were logged once;
- control: the same resume from a checkpoint without the kept ids (as written before trackers)
  starts new tracker runs whose curves begin at the resumed step;
- with the packages unimportable a configured tracker is refused at config time (exit 2, one
  line naming the pip command, before any data is prepared); a run without trackers works.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.training.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
BASE = ["train.micro_batch_size=4", "train.global_batch_size=8", "model.n_layers=2",
        "validation.every=0", "validation.elbo_every=0", "logging.every=1",
        "logging.progress_bar=false", "data.num_workers=1", "checkpoint.every=2",
        "sample.gen_length=4", "sample.steps=4", "sample.block_length=4",
        "data.max_bytes=1500000", "data.heldout_fraction=0.1"]
TRACKERS = ["logging.wandb.mode=offline", "logging.mlflow={}"]  # MLflow: a file store in <out_dir>/mlruns
HIDE_TRACKERS = ("import sys; sys.modules['wandb'] = sys.modules['mlflow'] = None; "
                 "from pretrain.training.entry import main; sys.exit(main(sys.argv[1:]))")


def train(env, out: Path, *args: str, python=("-m", "pretrain.train")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python, "--config", str(REPO / "recipes" / "tiny.yaml"), *BASE,
                           *args, f"train.out_dir={out}"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def kept_ids(out: Path, step: int) -> dict[str, str]:
    return json.loads((out / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())["trackers"]


def jsonl_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def wandb_records(path: Path):
    """The protobuf records of a `.wandb` file: a 7-byte header, then LevelDB-log-style chunks
    (crc32, uint16 length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2
    data, block, pos, parts = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def wandb_losses(out: Path, run_id: str) -> dict[int, float]:
    """Every logged loss of W&B run `run_id`, over its offline files in start order."""
    files = sorted(out.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, f"no offline W&B run {run_id} in {out}"
    losses = {}
    for path in files:
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = {item.key or ".".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                if "loss" in items:
                    assert record.history.step.num not in losses, "a step logged twice"
                    losses[record.history.step.num] = items["loss"]
    return losses


def mlflow_client(out: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow
    return mlflow.MlflowClient((out / "mlruns").resolve().as_uri())


def mlflow_losses(client, run_id: str) -> dict[int, float]:
    history = client.get_metric_history(run_id, "loss")
    assert len({m.step for m in history}) == len(history), "a step logged twice"
    return {m.step: m.value for m in history}


def assert_same_curve(tracked: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(tracked) == sorted(expected)
    for step, loss in expected.items():
        assert tracked[step] == pytest.approx(loss, abs=1e-6), step


@pytest.fixture(scope="module")
def env(subprocess_env) -> dict[str, str]:
    return {**subprocess_env, "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env) -> dict[str, Path]:
    """A tracked run of 4 steps resumed to 6 ("resumed"), and a copy of it at step 4 whose
    checkpoint holds no tracker ids, resumed to 5 ("control")."""
    root = tmp_path_factory.mktemp("trackers")
    resumed, control = root / "resumed", root / "control"
    ok(train(env, resumed, "train.steps=4", *TRACKERS))
    shutil.copytree(resumed, control)
    state_file = control / "checkpoints" / "step_00000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["trackers"]
    state_file.write_text(json.dumps(state))
    ok(train(env, resumed, "train.steps=6", "--resume", "auto", *TRACKERS))
    ok(train(env, control, "train.steps=5", "--resume", "auto", *TRACKERS))
    return {"resumed": resumed, "control": control}


def test_a_resumed_run_continues_one_curve_per_tracker(runs, monkeypatch):
    out = runs["resumed"]
    ids = kept_ids(out, 4)
    assert kept_ids(out, 6) == ids and set(ids) == {"wandb", "mlflow"}
    expected = jsonl_losses(out)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert_same_curve(wandb_losses(out, ids["wandb"]), expected)
    assert len(list(out.glob("wandb/offline-run-*"))) == 2  # the first run and its resume, one id
    client = mlflow_client(out, monkeypatch)
    assert_same_curve(mlflow_losses(client, ids["mlflow"]), expected)
    run = client.get_run(ids["mlflow"])
    [experiment_run] = client.search_runs([run.info.experiment_id])
    assert experiment_run.info.run_id == ids["mlflow"]
    assert run.data.params["train.steps"] == "4" and run.data.params["layout.data_parallel"] == "1"
    artifacts = {a.path for a in client.list_artifacts(ids["mlflow"])}
    assert artifacts == {"launch_report.txt", "resumed_at_step_00000004.txt"}
    [first_files] = out.glob(f"wandb/offline-run-*-{ids['wandb']}/files/launch_report.txt")
    assert first_files.read_text().startswith("layout: world 1")


def test_control_without_kept_ids_starts_new_tracker_runs(runs, monkeypatch):
    out, original = runs["control"], kept_ids(runs["resumed"], 4)
    ids = kept_ids(out, 5)
    assert ids["wandb"] != original["wandb"] and ids["mlflow"] != original["mlflow"]
    step_5 = {5: jsonl_losses(out)[5]}
    assert_same_curve(wandb_losses(out, ids["wandb"]), step_5)  # a second curve, from the resumed step
    assert_same_curve(mlflow_losses(mlflow_client(out, monkeypatch), ids["mlflow"]), step_5)


def test_missing_tracker_package_is_refused_before_data(runs, env, tmp_path, monkeypatch):
    hidden, out = ("-c", HIDE_TRACKERS), tmp_path / "wandb"
    proc = train(env, out, "train.steps=1", "logging.wandb.mode=offline", python=hidden)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install -e .[wandb]" in lines[0], proc.stderr
    assert not out.exists()
    monkeypatch.setitem(sys.modules, "mlflow", None)  # the same check, in this process
    with pytest.raises(ConfigError, match=re.escape("pip install -e .[mlflow]")):
        load_config(REPO / "recipes" / "tiny.yaml", ["logging.mlflow={}"])
    data = runs["resumed"] / "data"
    shards = ["data.source=shards", f"data.sources=[{{path: {data / 'train'}}}]",
              f"data.tokenizer={data / 'tokenizer.json'}"]
    ok(train(env, tmp_path / "untracked", "train.steps=1", *shards, python=hidden))

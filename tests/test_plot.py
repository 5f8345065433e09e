"""`python -m pretrain.plot` on real runs: the PNG it writes, the panels it chooses, the x axis.

Two real short runs of `python -m pretrain.train` (shared by the module): one validates (held-out
loss per t bucket and the Algorithm 3 bound), the other does not and has another seed and peak
learning rate. The checks read the image's pixels: each run's colour is drawn inside the loss
panel's axes, a run absent from a panel leaves no trace of its colour there, and a run without
validation records gets a figure without the held-out panels (one row shorter). A resumed run's
file, whose steps repeat, gives one point per step with the later value.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pretrain.plot import main
from pretrain.runtime.exit_codes import UsageError
from pretrain.training.plots import (
    HEADER,
    PANEL_HEIGHT,
    PANEL_WIDTH,
    PLOT_BOTTOM,
    PLOT_LEFT,
    PLOT_RIGHT,
    PLOT_TOP,
    RUN_COLOURS,
    panels,
    read_run,
    si,
    ticks,
)

ROOT = Path(__file__).resolve().parents[1]
STEPS, TOKENS_PER_STEP = 24, 8 * 64  # global batch x data.seq_len (recipes/tiny.yaml)
COMMON = [
    "model.n_layers=2", "model.vocab_size=500", "data.pad_vocab_to_multiple=64", "data.max_bytes=1000000",
    "data.heldout_fraction=0.1", f"train.steps={STEPS}", "train.micro_batch_size=8", "train.global_batch_size=8",
    "logging.every=4", "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.every=0",
    "checkpoint.save_at_end=false",
]
VALIDATED = ["validation.every=8", "validation.batches=2", "validation.batch_size=8", "validation.elbo_every=12",
             "validation.elbo_sequences=4", "validation.elbo_mc_num=8", "validation.elbo_batch_size=4"]
UNVALIDATED = ["validation.every=0", "validation.elbo_every=0", "train.seed=7", "schedule.peak_lr=0.001"]
ALL_PANELS = ["training loss", "held-out loss per t bucket", "held-out Algorithm 3 bound", "learning rate",
              "tokens/s"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, subprocess_env) -> tuple[Path, Path]:
    """(a run with validation, one without), trained side by side."""
    root = tmp_path_factory.mktemp("plot_runs")
    validated, unvalidated = root / "validated", root / "unvalidated"
    procs = [subprocess.Popen([sys.executable, "-m", "pretrain.train", "--config", "recipes/tiny.yaml", *COMMON,
                               *extra, f"train.out_dir={out}"], cwd=ROOT, env=subprocess_env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for out, extra in ((validated, VALIDATED), (unvalidated, UNVALIDATED))]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return validated, unvalidated


def titles(run_paths) -> list[str]:
    shown = panels([read_run(p) for p in run_paths])
    return [next(t for t in ALL_PANELS if panel.title.startswith(t)) for panel in shown]


def colours_in_panel(image: Image.Image, index: int) -> set[tuple[int, int, int]]:
    """The colours inside the axes of panel `index` (two columns, row-major)."""
    left, top = (index % 2) * PANEL_WIDTH, HEADER + (index // 2) * PANEL_HEIGHT
    box = (left + PLOT_LEFT + 1, top + PLOT_TOP + 1, left + PANEL_WIDTH - PLOT_RIGHT, top + PANEL_HEIGHT - PLOT_BOTTOM)
    return {colour for _, colour in image.crop(box).getcolors(maxcolors=1 << 20)}


def test_command_overlays_two_runs_in_one_png(runs, tmp_path, subprocess_env):
    validated, unvalidated = runs
    out = tmp_path / "both.png"
    proc = subprocess.run([sys.executable, "-m", "pretrain.plot", str(validated), str(unvalidated), "--out", str(out)],
                          cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out}"
    image = Image.open(out).convert("RGB")
    assert image.size == (2 * PANEL_WIDTH, HEADER + 3 * PANEL_HEIGHT)  # 5 panels: 3 rows of 2
    first, second = RUN_COLOURS[:2]
    assert {first, second} <= colours_in_panel(image, 0)  # training loss: both runs
    held_out = colours_in_panel(image, 1)
    assert first in held_out and second not in held_out  # only the validated run has held-out loss
    assert {first, second} <= colours_in_panel(image, 3)  # learning rate: both runs


def test_default_out_is_the_first_runs_loss_png(runs):
    validated, _ = runs
    assert main([str(validated / "metrics.jsonl")]) == 0
    image = Image.open(validated / "loss.png").convert("RGB")
    assert RUN_COLOURS[0] in colours_in_panel(image, 0)
    assert RUN_COLOURS[1] not in colours_in_panel(image, 0)  # control: a colour no run has is absent


def test_a_run_without_validation_has_no_held_out_panels(runs, tmp_path):
    validated, unvalidated = runs
    assert titles([validated]) == ALL_PANELS
    assert titles([unvalidated]) == ["training loss", "learning rate", "tokens/s"]
    assert titles([unvalidated, validated]) == ALL_PANELS
    assert main([str(unvalidated), "--out", str(tmp_path / "one.png")]) == 0
    assert Image.open(tmp_path / "one.png").size == (2 * PANEL_WIDTH, HEADER + 2 * PANEL_HEIGHT)


def test_every_step_is_placed_at_its_tokens_seen(runs):
    run = read_run(runs[0])
    loss = run.curve("loss")
    assert len(loss) == STEPS  # steps between the logged token counts are interpolated
    assert [x for x, _ in loss] == [TOKENS_PER_STEP * step for step in range(1, STEPS + 1)]
    assert [x for x, _ in run.curve("val/elbo_nll")] == [0, 12 * TOKENS_PER_STEP, 24 * TOKENS_PER_STEP]


def test_a_resumed_runs_repeated_steps_give_one_point_each(runs, tmp_path):
    """A run interrupted after step 20 and resumed from its step-16 checkpoint appends steps 17..24
    again (after a line cut by the kill); the later values are the ones drawn."""
    lines = (runs[0] / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    first_part = [r for r in records if r["step"] <= 20]
    resumed = [{**r, "loss": r["loss"] + 1.0} if "loss" in r else r for r in records if r["step"] > 16]
    file = tmp_path / "resumed" / "metrics.jsonl"
    file.parent.mkdir()
    file.write_text("\n".join([*map(json.dumps, first_part), '{"step": 21, "lo', *map(json.dumps, resumed)]) + "\n")
    original = dict(read_run(runs[0]).series["loss"])
    loss = read_run(file).series["loss"]
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert all(loss[s] == original[s] + (1.0 if s > 16 else 0.0) for s in loss)
    xs = [x for x, _ in read_run(file).curve("loss")]
    assert xs == sorted(set(xs)) and len(xs) == STEPS


def test_a_file_without_training_loss_is_a_usage_error(tmp_path):
    file = tmp_path / "metrics.jsonl"
    file.write_text(json.dumps({"step": 0, "tokens": 0.0, "val/loss": 7.0}) + "\n")
    with pytest.raises(UsageError, match=re.escape(f"{file} has no training loss records")):
        read_run(file)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=re.escape(f"{tmp_path / 'empty'} holds no metrics.jsonl")):
        read_run(tmp_path / "empty")


def test_tick_labels():
    assert [si(v) for v in (1_200_000, 30_000, 2.5e9, 512, 0.0002)] == ["1.2M", "30k", "2.5G", "512", "0.0002"]
    assert ticks(0, 30_720) == [0, 10_000, 20_000, 30_000]
    assert ticks(0.0001, 0.002) == pytest.approx([0.0005, 0.001, 0.0015, 0.002])

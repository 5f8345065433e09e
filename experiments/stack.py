"""Running the stack's commands for an experiment: in-process, in parallel, resumable.

Every training and evaluation goes through a command's own `main(argv)` (the code behind
`python -m pretrain.train ...` and `python -m pretrain.evaluate ...`) so an experiment is also an
end-to-end run of the commands a user types. They run inside a pool of worker processes, one
per CPU core by default, each with its own torch threads, so the start-up cost (imports,
DeepSpeed) is paid once per worker rather than once per run, and a worker's output goes to a
log file under `<out>/logs`. A run directory whose training finished with the same command line
(`experiment.json`) is reused, so a claim can be re-run (or `all` after a single claim) without
training again.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable

from pretrain.training.plots import read_run

DONE = "experiment.json"


class ExperimentError(RuntimeError):
    """A stack command failed inside an experiment; the message names the command and its log."""


def _start_worker(log_dir: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    log = open(Path(log_dir) / f"worker-{os.getpid()}.log", "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log


def run_parallel(function: Callable, jobs: Iterable, *, out: Path, workers: int) -> list:
    """`function(job)` for every job, in a pool of `workers` processes; results in job order."""
    jobs = list(jobs)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn"),
                             initializer=_start_worker, initargs=(str(out / "logs"), threads)) as pool:
        return list(pool.map(function, jobs))


def command(name: str, argv: list[str]) -> None:
    """The stack command `name` ("train" or "evaluate") with `argv`; an ExperimentError if it fails."""
    if name == "train":
        from pretrain.training.entry import main
    else:
        from pretrain.evaluate import main
    print(f"$ python -m pretrain.{name} {' '.join(argv)}", flush=True)
    code = main(argv)
    if code:
        raise ExperimentError(f"python -m pretrain.{name} {' '.join(argv)} exited with {code}; its output: "
                              f"{getattr(sys.stdout, 'name', 'the experiment logs/ directory')}")


def train(run_dir: Path, config: Path, overrides: list[str]) -> Path:
    """Train `config` with `overrides` into `run_dir` unless a finished run with the same command
    is there already; returns the run's checkpoints directory."""
    argv = ["--config", str(config), *overrides, f"train.out_dir={run_dir}"]
    marker = run_dir / DONE
    if marker.is_file() and json.loads(marker.read_text()).get("argv") == argv:
        return run_dir / "checkpoints"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    command("train", argv)
    marker.write_text(json.dumps({"argv": argv}) + "\n")
    return run_dir / "checkpoints"


def evaluate(model: Path, tasks: Path, out: Path, seed: int = 0) -> dict[str, Any]:
    """`pretrain.evaluate` of `model` on the task file; its report (per task: metrics, records)."""
    command("evaluate", ["--model", str(model), "--tasks", str(tasks), "--out", str(out), "--seed", str(seed)])
    return json.loads(out.read_text())["tasks"]


def last_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every numeric metric of a run, read as `pretrain.plot` reads it."""
    return {metric: by_step[max(by_step)] for metric, by_step in read_run(run_dir).series.items()}


def write_tasks(path: Path, tasks: list[dict]) -> Path:
    """A task file for `pretrain.evaluate` (JSON is YAML)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tasks, indent=1) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def spread(values: list[float], digits: int = 2) -> str:
    """'mean ± sd' of the values over seeds."""
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"

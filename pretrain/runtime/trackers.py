"""Experiment trackers (Weights & Biases, MLflow) as optional sinks beside metrics.jsonl and TensorBoard.

Labs compare runs in the tracker they already use, so the run's numbers go there too: each sink
receives the same records `MetricsLogger` writes on rank 0 (their finite numeric values, as
TensorBoard does), the resolved config and the launch report once, and keeps one tracker run per
training run. The tracker run's id is kept in the checkpoint (`TrainState.trackers`) and a resume
continues that tracker run, so its curves go on instead of restarting. Both packages are optional
extras (`pip install -e .[wandb]`, `.[mlflow]`), imported only when configured; the config check
names the install command before anything is prepared (`LoggingConfig.problems`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

WANDB_MODES = ("online", "offline")


@dataclass
class WandbConfig:
    """`logging.wandb`: a Weights & Biases run ("offline" writes <out_dir>/wandb/offline-run-*
    without network; `wandb sync` uploads it later)."""
    project: str = "llada-pretrain"
    entity: str | None = None
    name: str | None = None  # default: train.out_dir's name
    mode: str = "online"

    def problems(self, check_package: bool = True) -> list[str]:
        out = [] if self.project else ["logging.wandb.project: must not be empty"]
        if self.mode not in WANDB_MODES:
            out.append(f"logging.wandb.mode: {self.mode!r} is not one of {', '.join(WANDB_MODES)}")
        if check_package and importlib.util.find_spec("wandb") is None:
            out.append(not_installed("wandb"))
        return out


@dataclass
class MlflowConfig:
    """`logging.mlflow`: an MLflow run in `experiment` at `tracking_uri` (a server, a database, or
    a local file store: a path or file: URI; default <out_dir>/mlruns, no server needed)."""
    tracking_uri: str | None = None
    experiment: str = "llada-pretrain"

    def problems(self, check_package: bool = True) -> list[str]:
        out = [] if self.experiment else ["logging.mlflow.experiment: must not be empty"]
        if check_package and importlib.util.find_spec("mlflow") is None:
            out.append(not_installed("mlflow"))
        return out


def not_installed(package: str) -> str:
    return (f"logging.{package}: the {package} package is not installed; pip install -e .[{package}] "
            f"(or remove logging.{package} from the config)")


def import_tracker(package: str):
    """The tracker's package (the config check has refused a missing one; this names the fix
    when a run skipped that check)."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ImportError(not_installed(package)) from error


class TrackerSink(Protocol):
    name: str      # the config key, and the key of its run id in the checkpoint
    run_id: str
    resumed: bool  # the kept run id was continued

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None: ...
    def log_config(self, config: dict) -> None: ...
    def log_text(self, filename: str, text: str) -> None: ...
    def finish(self) -> None: ...


class WandbSink:
    name = "wandb"

    def __init__(self, settings: WandbConfig, out_dir: Path, kept_id: str | None):
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb = import_tracker("wandb")
        self._run = wandb.init(project=settings.project, entity=settings.entity,
                               name=settings.name or out_dir.resolve().name, mode=settings.mode,
                               id=kept_id, resume="allow", dir=str(out_dir),
                               settings=wandb.Settings(silent=True, console="off"))
        self.run_id = self._run.id
        self.resumed = kept_id is not None  # resume="allow": W&B continues the run with that id

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)

    def log_config(self, config: dict) -> None:
        self._run.config.update(config, allow_val_change=True)

    def log_text(self, filename: str, text: str) -> None:
        Path(self._run.dir, filename).write_text(text)  # the run's files, uploaded with it

    def finish(self) -> None:
        self._run.finish()


class MlflowSink:
    name = "mlflow"

    def __init__(self, settings: MlflowConfig, out_dir: Path, kept_id: str | None):
        uri = settings.tracking_uri or (out_dir / "mlruns").resolve().as_uri()
        if "://" not in uri or uri.startswith("file:"):
            # asked for by the config: MLflow 3 refuses a file store unless this opts in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow = import_tracker("mlflow")
        self._entities, self._errors = mlflow.entities, mlflow.exceptions.MlflowException
        self._client = mlflow.MlflowClient(uri)
        self.resumed = kept_id is not None and self._has_run(kept_id)
        if self.resumed:
            self.run_id = kept_id
            self._client.update_run(kept_id, status="RUNNING")
        else:
            experiment = self._client.get_experiment_by_name(settings.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self._client.create_experiment(settings.experiment))
            self.run_id = self._client.create_run(experiment_id, run_name=out_dir.resolve().name).info.run_id

    def _has_run(self, run_id: str) -> bool:
        try:
            self._client.get_run(run_id)
        except self._errors:  # an unknown id (e.g. a tracking store replaced since the checkpoint)
            return False
        return True

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        stamp = int(time.time() * 1000)
        metrics = [self._entities.Metric(mlflow_key(k), v, stamp, step) for k, v in scalars.items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def log_config(self, config: dict) -> None:
        """The config's leaves as `section.field` params (MLflow takes at most 100 per call and
        6000 characters per value)."""
        params = [self._entities.Param(mlflow_key(k), str(v)[:6000]) for k, v in flatten(config).items()]
        for start in range(0, len(params), 100):
            self._client.log_batch(self.run_id, params=params[start:start + 100])

    def log_text(self, filename: str, text: str) -> None:
        self._client.log_text(self.run_id, text, filename)

    def finish(self) -> None:
        self._client.set_terminated(self.run_id)


def mlflow_key(key: str) -> str:
    """MLflow keys hold letters, digits, '_', '-', '.', ' ', ':' and '/'; others become '_'."""
    return re.sub(r"[^\w\-. :/]", "_", key)[:250]


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def open_trackers(wandb: WandbConfig | None, mlflow: MlflowConfig | None, out_dir: Path,
                  kept_ids: dict[str, str], *, config: dict, launch_report: str, step: int,
                  resume_notes: list[str]) -> list[TrackerSink]:
    """The configured trackers' sinks (rank 0), each continuing its kept run if there is one. A new
    tracker run gets the config and the launch report; a continued one a note of the resume."""
    sinks: list[TrackerSink] = []
    if wandb is not None:
        sinks.append(WandbSink(wandb, out_dir, kept_ids.get("wandb")))
    if mlflow is not None:
        sinks.append(MlflowSink(mlflow, out_dir, kept_ids.get("mlflow")))
    for sink in sinks:
        if sink.resumed:
            sink.log_text(f"resumed_at_step_{step:08d}.txt", "\n".join([*resume_notes, launch_report]))
        else:
            sink.log_config(config)
            sink.log_text("launch_report.txt", launch_report)
    return sinks

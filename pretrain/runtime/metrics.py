"""Where a run's numbers go: a JSONL file, TensorBoard, experiment trackers and a progress bar,
from rank 0 only.

Every logged record is one JSON object per line (`metrics.jsonl` in the run directory) with
the optimizer step and the tokens seen, so runs can be compared and plotted without
TensorBoard; TensorBoard and the configured trackers (`pretrain.runtime.trackers`: W&B, MLflow)
get the same scalars. The progress bar shows loss, tokens/s and ETA.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from pretrain.runtime.trackers import TrackerSink


def scalars_of(record: dict) -> dict[str, float]:
    """A record's finite numbers (step and time are the axes, not values)."""
    return {key: value for key, value in record.items()
            if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value)}


class MetricsLogger:
    def __init__(self, out_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 enabled: bool = True, jsonl: bool = True, tensorboard: bool = True,
                 progress_bar: bool = True, trackers: Sequence[TrackerSink] = ()):
        self.enabled = enabled
        self._trackers = list(trackers)
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if progress_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **record}
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
        scalars = scalars_of(record)
        if self._tb:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        for tracker in self._trackers if scalars else ():
            tracker.log_scalars(step, scalars)

    def advance(self, loss: float, tokens_per_s: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self._bar.update(1)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.finish()
        for handle in (self._bar, self._tb, self._jsonl):
            if handle is not None:
                handle.close()

"""Guard rails for a run that lasts weeks: loss spikes, non-finite steps and hangs.

A multi-week pretraining run meets loss spikes and steps whose loss or gradient norm is not
finite; the LLaDA 8B run hit a NaN at 1.2T tokens and recovered by resuming from the last good
checkpoint with a lower learning rate. It also meets hangs: when one rank dies, the others wait
in a collective forever. `GuardRails` decides, from each step's numbers, whether to go on, count
a skipped step, or halt with the recovery spelled out; `HangWatchdog` reports a hang and exits
instead of waiting forever.
"""

from __future__ import annotations

import faulthandler
import math
import os
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class GuardConfig:
    max_consecutive_skips: int = 5   # halt after this many non-finite steps in a row (0: never halt)
    spike_factor: float = 0.0        # halt when a step's loss > spike_factor x the moving average (0: off)
    spike_window: int = 100          # steps in the moving average (mean of the last N finite losses)
    spike_warmup: int = 200          # no spike check before this many finite steps have been seen
    hang_timeout_s: float = 1800.0   # the watchdog reports and exits after this long without progress (0: off)
    # Fault injection, to exercise the guard rails: these 1-based steps get a NaN loss.
    inject_nan_at_steps: list[int] = field(default_factory=list)
    # Fault injection, to exercise the straggler metric: this rank (-1: none) sleeps this long
    # at the end of every step's work.
    inject_delay_rank: int = -1
    inject_delay_s: float = 0.0

    def problems(self) -> list[str]:
        """One 'guard.<field>: ...' line per invalid value."""
        out = []
        if self.inject_delay_rank < -1 or self.inject_delay_s < 0:
            out.append(f"guard.inject_delay_rank / guard.inject_delay_s: a rank >= 0 (-1: none) and "
                       f"seconds >= 0, got {self.inject_delay_rank} / {self.inject_delay_s}")
        for name in ("max_consecutive_skips", "spike_warmup", "hang_timeout_s"):
            value = getattr(self, name)
            if value < 0:
                out.append(f"guard.{name}: must be >= 0, got {value}")
        if self.spike_factor != 0 and not self.spike_factor > 1:
            out.append(f"guard.spike_factor: must be 0 (off) or > 1, got {self.spike_factor}")
        if self.spike_window < 1:
            out.append(f"guard.spike_window: must be >= 1, got {self.spike_window}")
        return out


@dataclass(frozen=True)
class Verdict:
    skipped: bool       # this step's update must be treated as not applied (non-finite loss or grad norm)
    halt: str | None    # None, or the full message to print before stopping


class GuardRails:
    """Per-step verdicts from the loss and gradient norm, identical on every rank."""

    def __init__(self, config: GuardConfig):
        self.config = config
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.finite_seen = 0
        self.window: deque[float] = deque(maxlen=max(config.spike_window, 1))

    def observe(self, step: int, loss: float, grad_norm: float | None,
                last_good_checkpoint: str | None) -> Verdict:
        """The verdict on optimizer step `step` (1-based).

        `loss` and `grad_norm` must already be all-reduced over ranks so that every rank reaches
        the same verdict. A non-finite loss or gradient norm marks the step skipped (counted, kept
        out of the moving average); `max_consecutive_skips` of them in a row halt. A finite loss
        resets the consecutive count, is checked against the mean of the previous finite losses
        once `spike_warmup` finite steps were seen, then joins the window.
        """
        cfg = self.config
        loss = float(loss)
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
            self.skipped_total += 1
            self.consecutive_skips += 1
            if cfg.max_consecutive_skips and self.consecutive_skips >= cfg.max_consecutive_skips:
                cause = (f"{self.consecutive_skips} consecutive steps with a non-finite loss or gradient norm "
                         f"(this step: loss {loss}, gradient norm {grad_norm})")
                return Verdict(skipped=True, halt=self._halt_message(step, cause, last_good_checkpoint))
            return Verdict(skipped=True, halt=None)

        self.consecutive_skips = 0
        halt = None
        if cfg.spike_factor > 0 and self.finite_seen >= cfg.spike_warmup and self.window:
            average = sum(self.window) / len(self.window)
            if average > 0 and loss > cfg.spike_factor * average:
                cause = (f"loss {loss:.4g} is {loss / average:.2f}x its {len(self.window)}-step average "
                         f"{average:.4g} (guard.spike_factor={cfg.spike_factor})")
                halt = self._halt_message(step, cause, last_good_checkpoint)
        self.finite_seen += 1
        self.window.append(loss)
        return Verdict(skipped=False, halt=halt)

    @staticmethod
    def _halt_message(step: int, cause: str, checkpoint: str | None) -> str:
        if checkpoint is None:
            return (f"guard rails: halting at step {step}: {cause}. Last good checkpoint: no checkpoint saved yet. "
                    f"Recovery: restart with a lower learning rate, e.g. `schedule.lr_scale=0.5`.")
        return (f"guard rails: halting at step {step}: {cause}. Last good checkpoint: {checkpoint}. "
                f"Recovery: resume from that checkpoint with a lower learning rate, e.g. "
                f"`--resume {checkpoint} schedule.lr_scale=0.5`.")

    def state_dict(self) -> dict:
        """Counters and recent losses, JSON-serialisable."""
        return {"skipped_total": self.skipped_total, "consecutive_skips": self.consecutive_skips,
                "finite_seen": self.finite_seen, "window": list(self.window)}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved counters and moving average."""
        self.skipped_total = int(state["skipped_total"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.finite_seen = int(state["finite_seen"])
        self.window = deque((float(x) for x in state["window"]), maxlen=self.window.maxlen)


class HangWatchdog:
    """A daemon thread that exits the process when `beat` stops arriving.

    The training loop calls `beat(step, phase)` at each phase boundary (e.g. 'all-reduce of the
    step metrics', 'micro-batch 3 forward/backward', 'checkpoint save'). After `timeout_s`
    without a beat it writes one line naming rank, host, step and phase to stderr, then the
    stacks of every thread, then calls `os._exit(exit_code)`.
    """

    def __init__(self, timeout_s: float, rank: int, exit_code: int = 5, poll_s: float | None = None):
        self.timeout_s = timeout_s
        self.rank = rank
        self.exit_code = exit_code
        self.poll_s = poll_s if poll_s is not None else min(timeout_s / 4, 10.0)
        self._last = (time.monotonic(), 0, "start-up")
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> HangWatchdog:
        """Start watching; does nothing when `timeout_s` is 0."""
        if self.timeout_s > 0:
            self._last = (time.monotonic(), self._last[1], self._last[2])
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, step: int, phase: str) -> None:
        """Record progress: the loop is at `step`, entering `phase`."""
        self._last = (time.monotonic(), step, phase)

    @property
    def position(self) -> tuple[int, str]:
        """The step and phase of the last beat (where a failing rank was)."""
        return self._last[1], self._last[2]

    def stop(self) -> None:
        """Stop watching and wait for the thread to end."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            beat_time, step, phase = self._last
            idle = time.monotonic() - beat_time
            if idle >= self.timeout_s:
                sys.stderr.write(
                    f"hang watchdog: rank {self.rank} on host {socket.gethostname()} made no progress for "
                    f"{idle:.0f} s at step {step} in {phase} (a collective waits for a rank that died, hung "
                    f"or diverged); stacks of every thread follow\n")
                sys.stderr.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(self.exit_code)

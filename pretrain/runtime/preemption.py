"""Preemption: a signal to any one rank makes every rank save the same step and exit 0.

SLURM (and most schedulers) announce preemption with SIGTERM or a configured signal such as
SIGUSR1, possibly to only some processes. Each rank records the signal in a flag; the training
loop adds the flag to the metrics it already all-reduces every step, so all ranks see it after
the same step, save that step's checkpoint together and stop; a requeued job continues with
`--resume auto`.
"""

from __future__ import annotations

import signal

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in PREEMPTION_SIGNALS}

    def close(self) -> None:
        """Give the signals back to whoever handled them before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def raised(self) -> float:
        """1.0 once a preemption signal arrived here (summed over ranks by the caller)."""
        return 1.0 if self.signal_name else 0.0

"""Which rank the others wait for: per-rank step times, gathered and the slowest named.

Every step ends in a collective (the all-reduce of the step's metrics) that no rank leaves
before the last one arrives, so every rank's wall-clock step time is the slowest rank's and
says nothing about who is slow. What differs is the arrival: each rank measures the seconds
from leaving one step's closing all-reduce to arriving at the next one. The rank that arrives
last is the one the others wait for. Every `logging.every` steps the ranks all-gather their
mean over the steps since the last report; the slowest rank, its time, the median rank's time
and their ratio go into the metrics, and a warning names the rank and its host when the ratio
exceeds `logging.straggler_factor`. Under ZeRO-3 (and tensor parallelism) the other ranks also
wait for a slow rank inside the forward and backward collectives, so a rank slow throughout is
still the last to arrive, while the ratio understates how much slower it is.
"""

from __future__ import annotations

import socket
import statistics
import time

import torch

from parallel.engine import rank_device, world_size


class StragglerMonitor:
    """Call `released()` when the step's closing collective returns and `arrived(step)` just
    before the next one; `report()` (a collective: every rank, at the same steps) gives the
    straggler metrics and, when the slowest rank is too slow, the warning to print."""

    def __init__(self, rank: int, warn_factor: float):
        self.rank = rank
        self.warn_factor = warn_factor
        self.world_size = world_size()
        self.hosts = [socket.gethostname()] * self.world_size
        if self.world_size > 1:
            torch.distributed.all_gather_object(self.hosts, socket.gethostname())
        self.device = rank_device()  # NCCL gathers device tensors only
        self._released = time.perf_counter()
        self._seconds: list[float] = []
        self._steps: list[int] = []

    def released(self) -> None:
        self._released = time.perf_counter()

    def arrived(self, step: int) -> None:
        self._seconds.append(time.perf_counter() - self._released)
        self._steps.append(step)

    def report(self) -> tuple[dict[str, float], str | None]:
        """(metrics, warning or None) over the steps since the last report, the same on every rank."""
        mine = sum(self._seconds) / max(len(self._seconds), 1)
        first, last = (self._steps[0], self._steps[-1]) if self._steps else (0, 0)
        self._seconds, self._steps = [], []
        gathered = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(self.world_size)]
        mine_tensor = torch.tensor([mine], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_gather(gathered, mine_tensor)
        else:
            gathered = [mine_tensor]
        seconds = [float(t.item()) for t in gathered]
        slowest = max(range(len(seconds)), key=seconds.__getitem__)
        median = statistics.median(seconds)
        ratio = seconds[slowest] / median if median > 0 else 1.0
        metrics = {"straggler/slowest_rank": slowest, "straggler/slowest_step_s": seconds[slowest],
                   "straggler/median_step_s": median, "straggler/slowest_to_median": ratio}
        warning = None
        if self.warn_factor and ratio > self.warn_factor:
            warning = (f"straggler: rank {slowest} on host {self.hosts[slowest]} took {seconds[slowest]:.3f} s "
                       f"per step against the median rank's {median:.3f} s ({ratio:.2f}x, steps "
                       f"{first}..{last}; logging.straggler_factor {self.warn_factor:g}): every other "
                       f"rank waits for it; look at that host's load, data reads and device health")
        return metrics, warning

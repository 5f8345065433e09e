"""Learning-rate schedules as pure functions of (optimizer step, tokens seen).

The paper's pretraining schedule is keyed on tokens, not steps (warm-up excepted), so a run
whose batch size changes, or that resumes, stays on it. `lr_at(step, tokens)` gives the rate
for the optimizer step about to be taken, `step` counting the steps already completed and
`tokens` the training tokens consumed before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ScheduleConfig:
    # llada_pretrain: warm-up, hold, step down, hold, linear decay (paper 2.2);
    # sft: warm-up, hold, linear decay over the last `decay_fraction` of steps (paper B.1);
    # cosine: warm-up, cosine to final_lr over total_steps; constant: warm-up, hold.
    kind: str = "llada_pretrain"
    peak_lr: float = 4e-4
    warmup_steps: int = 2000
    # llada_pretrain, in tokens
    stable_tokens: float = 1.2e12
    mid_lr: float = 1e-4
    mid_tokens: float = 0.8e12
    decay_tokens: float = 0.3e12
    final_lr: float = 1e-5
    # sft and cosine, in optimizer steps
    total_steps: int = 0
    decay_fraction: float = 0.1
    # Multiplies every learning rate of the schedule: the documented recovery from a loss spike
    # or repeated non-finite steps is to resume the last good checkpoint with e.g. 0.5.
    lr_scale: float = 1.0

    KINDS = ("llada_pretrain", "sft", "cosine", "constant")

    def problems(self, total_steps_from_run: bool = False) -> list[str]:
        """One line per invalid field; total_steps_from_run: the run sets total_steps later
        (SFT by epochs)."""
        out = []
        if self.kind not in self.KINDS:
            out.append(f"schedule.kind: {self.kind!r} is not one of {', '.join(self.KINDS)}")
        if self.warmup_steps < 0:
            out.append(f"schedule.warmup_steps: must be >= 0, got {self.warmup_steps}")
        for name in ("peak_lr", "mid_lr", "final_lr"):
            if getattr(self, name) < 0:
                out.append(f"schedule.{name}: must be >= 0")
        for name in ("stable_tokens", "mid_tokens", "decay_tokens"):
            if getattr(self, name) < 0:
                out.append(f"schedule.{name}: must be >= 0")
        if self.kind in ("sft", "cosine") and self.total_steps <= 0 and not total_steps_from_run:
            out.append(f"schedule.total_steps: the {self.kind} schedule needs the run's total "
                       f"optimizer steps (> 0), got {self.total_steps}")
        if not 0 <= self.decay_fraction <= 1:
            out.append("schedule.decay_fraction: must lie in [0, 1]")
        if self.lr_scale <= 0:
            out.append(f"schedule.lr_scale: must be positive, got {self.lr_scale}")
        return out


def lr_at(cfg: ScheduleConfig, step: int, tokens: float) -> float:
    """The learning rate of 0-based optimizer step `step` after `tokens` tokens."""
    return cfg.lr_scale * _schedule_lr(cfg, step, tokens)


def _schedule_lr(cfg: ScheduleConfig, step: int, tokens: float) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return cfg.peak_lr
    if cfg.kind == "llada_pretrain":
        mid_end = cfg.stable_tokens + cfg.mid_tokens
        if tokens < cfg.stable_tokens:
            return cfg.peak_lr
        if tokens < mid_end:
            return cfg.mid_lr
        if cfg.decay_tokens == 0 or tokens >= mid_end + cfg.decay_tokens:
            return cfg.final_lr
        frac = (tokens - mid_end) / cfg.decay_tokens
        return cfg.mid_lr + frac * (cfg.final_lr - cfg.mid_lr)
    if cfg.kind == "sft":
        decay_start = cfg.total_steps * (1 - cfg.decay_fraction)
        if step < decay_start:
            return cfg.peak_lr
        frac = min(1.0, (step + 1 - decay_start) / max(cfg.total_steps - decay_start, 1))
        return cfg.peak_lr + frac * (cfg.final_lr - cfg.peak_lr)
    # cosine
    span = max(cfg.total_steps - cfg.warmup_steps, 1)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.final_lr + 0.5 * (cfg.peak_lr - cfg.final_lr) * (1 + math.cos(math.pi * frac))

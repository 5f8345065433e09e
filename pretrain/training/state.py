"""The run's resumable state as one object, saved and restored through one pair of methods.

What a checkpoint's `trainer_state.json` holds (step, tokens seen, the guard rails' counters,
the rank layout that wrote it, the experiment trackers' run ids) and what the loop tracks
beside it (the last checkpoint it can fall back to, the step that checkpoint holds) live in
`TrainState`, as torchtitan's trainer keeps its own. `state_dict` is that file's content, key
for key, so existing checkpoints resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pretrain.runtime.guard_rails import GuardRails


@dataclass
class TrainState:
    guard: GuardRails
    layout: dict                     # this run's rank layout (`Layout.checkpoint_key`), saved for the next resume
    step: int = 0                    # optimizer steps done
    tokens_seen: float = 0.0         # tokens trained on, summed over replicas (the schedule's clock)
    last_good: Path | None = None    # the newest complete checkpoint: resumed from or saved
    saved_step: int | None = None    # the step `last_good` holds when this run saved or resumed it
    # {"wandb": id, "mlflow": id}: the tracker runs a resume continues (rank 0 knows them; it saves)
    trackers: dict[str, str] = field(default_factory=dict)

    def state_dict(self) -> dict:
        """`trainer_state.json`'s content (`checkpoint.store.save_checkpoint` writes it)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "guard": self.guard.state_dict(),
                "layout": self.layout, "trackers": self.trackers}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's trainer state. Its `layout` is not taken: this run's layout
        is what the next checkpoint records (the caller compares the two)."""
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.trackers = dict(state.get("trackers", {}))  # absent from checkpoints written before trackers
        self.guard.load_state_dict(state["guard"])

    def saved(self, path: Path) -> None:
        """`path` now holds this state: the checkpoint to fall back to."""
        self.last_good, self.saved_step = path, self.step

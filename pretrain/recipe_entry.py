"""The Python part of every recipe script (`recipes/*.sh`), in one place.

A recipe is both a bash script and a Python script: the deepspeed launcher runs it with Python on
every rank, and that part only puts the checkout on `sys.path` and calls `run_recipe`. It starts
the rank supervisor before torch is imported (`pretrain.runtime.rank_supervisor`: a parent process names
this rank if it ends badly), then trains with the YAML beside the script.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pretrain.runtime.rank_supervisor import supervise


def run_recipe(script: str, *overrides: str) -> int:
    """Train with `script`'s YAML (same name, `.yaml`), the recipe's own `overrides`, then the
    command line's arguments; returns the exit code."""
    supervise()
    from pretrain.training.entry import main  # lazy: torch loads only after supervise()

    return main(["--config", str(Path(script).resolve().with_suffix(".yaml")), *overrides, *sys.argv[1:]])

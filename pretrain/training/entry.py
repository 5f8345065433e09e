"""The train command's flags and exit codes, shared by `python -m pretrain.train` and the recipes.

`pretrain.train` and every recipe script (`pretrain.recipe_entry`, which must start the rank
supervisor before torch loads and so cannot import the command) take the same command line;
this module parses it, plans or runs the training loop (`pretrain.training.loop`) and turns the
predictable failures into one line and an exit code: 2 for a config or checkpoint error, 3 for
a launch (rendezvous) error, 4 when the guard rails halt the run.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

from data_pipeline.shards import ShardError
from parallel.rendezvous import RendezvousError
from pretrain.checkpoint.store import CheckpointError
from pretrain.runtime.exit_codes import DATA, HALTED, LAUNCH, USAGE, run_command
from pretrain.training.config import ConfigError, load_config
from pretrain.training.loop import TrainingHalted, dry_run, run

DESCRIPTION = "Pretrain or fine-tune: python -m pretrain.train --config FILE [section.field=value ...]"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--config", help="YAML run config (defaults to the tiny demo)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=20")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the layout, the memory plan and the DeepSpeed config, then exit "
                             "(0 if the plan fits memory.gpu_memory_gib, 1 if not)")
    parser.add_argument("--resume", default=None, metavar="auto|DIR",
                        help="continue from the newest complete checkpoint ('auto'; a fresh start "
                             "when there is none), a step_XXXXXXXX directory or a checkpoints "
                             "directory (its newest step)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start fresh in a train.out_dir that holds checkpoints: the old run is "
                             "moved to <out_dir>.replaced-<UTC timestamp> (nothing is deleted)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to plan a --dry-run for (default: $WORLD_SIZE, else 1)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_intermixed_args(argv)  # the launcher puts --local_rank among overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def action() -> int:
        cfg = load_config(args.config, args.overrides, check_paths=not args.dry_run)
        if args.dry_run:
            return dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")))
        run(cfg, resume=args.resume, overwrite=args.overwrite)
        return 0

    return with_exit_codes(action)


# The training loop's predictable failures and their exit codes (train, the recipes, profile);
# a halt prints and logs its own message.
TRAINING_FAILURES = {ConfigError: USAGE, CheckpointError: USAGE, RendezvousError: LAUNCH, ShardError: DATA}
KIND_OF_CODE = {USAGE: "config error", LAUNCH: "launch error", DATA: "data error"}


def with_exit_codes(action: Callable[[], int]) -> int:
    """`action()`'s exit code, or the code of the predictable failure it raised (its message
    printed as one line after its kind; `pretrain.runtime.exit_codes`)."""
    failures = {kind: (code, KIND_OF_CODE[code]) for kind, code in TRAINING_FAILURES.items()}
    return run_command(action, {**failures, TrainingHalted: (HALTED, None)})

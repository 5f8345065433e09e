"""Every command's exit codes, and predictable failures printed as one line instead of a traceback.

| code | meaning |
|------|---------|
| 0 | success |
| 1 | a bug (the traceback is printed), or a `--dry-run` plan that does not fit the device |
| 2 | a bad command line, config, path, checkpoint, run directory, prompts, preset, task or data file |
| 3 | a launch error: the rendezvous host or port cannot be reached |
| 4 | the guard rails halted training (non-finite steps, loss spike) |
| 5 | a data error in training data: a shard corrupted since prepare, out-of-vocabulary ids, a malformed input row |
| 6 | a collective failed or timed out on some rank (`pretrain.runtime.rank_failures`) |

A command runs its work through `run_command` with the exception types it expects and their
codes; anything else is a bug and keeps its traceback. `LLADA_TRACEBACK=1` shows the traceback
of a predictable failure too. A command's failure lines start with `<command> error: `
(`command_failures`); the train command's name the kind instead (`config error: `, ...).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Mapping

SUCCESS, BUG, USAGE, LAUNCH, HALTED, DATA, COLLECTIVE = 0, 1, 2, 3, 4, 5, 6


class UsageError(ValueError):
    """A predictable failure of a command's input (a path, a flag's value); the message names
    what is wrong and the fix."""


def run_command(action: Callable[[], int | None],
                failures: Mapping[type[BaseException], tuple[int, str | None]]) -> int:
    """`action()`'s exit code (None: 0); for an exception of a type in `failures` (type -> (code,
    prefix)), `prefix: message` on stderr and that code (one line; a config error lists one
    problem per line). A prefix of None prints nothing: the failure has reported itself."""
    try:
        return action() or SUCCESS
    except tuple(failures) as error:
        if os.environ.get("LLADA_TRACEBACK") == "1":
            raise
        code, prefix = next(failures[kind] for kind in type(error).__mro__ if kind in failures)
        if prefix is not None:
            print(f"{prefix}: {error}", file=sys.stderr, flush=True)
        return code


def command_failures(command: str,
                     codes: Mapping[type[BaseException], int]) -> dict[type[BaseException], tuple[int, str]]:
    """`run_command`'s failures for `command`: every one printed as `<command> error: <message>`."""
    return {kind: (code, f"{command} error") for kind, code in codes.items()}

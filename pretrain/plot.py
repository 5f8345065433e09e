"""Draw runs' curves: `python -m pretrain.plot RUN_DIR [RUN_DIR ...] [--out FILE.png]`.

Each RUN_DIR is a training run's directory (train.out_dir) or its metrics.jsonl. One PNG shows
training loss, held-out loss per t bucket, the held-out Algorithm 3 bound, learning rate and
tokens/s against tokens seen, the runs overlaid in one colour each with a legend
(`pretrain.training.plots`); by default it is `loss.png` in the first run's directory. A missing
directory, a directory without metrics.jsonl or a file without training loss records is one
line on stderr and exit code 2 (the README's exit-code table).
"""

from __future__ import annotations

import argparse
import sys

from pretrain.runtime.exit_codes import USAGE, UsageError, command_failures, run_command
from pretrain.training.plots import draw_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run directory or its metrics.jsonl")
    parser.add_argument("--out", help="the PNG to write (default: loss.png in the first run's directory)")
    args = parser.parse_args(argv)
    return run_command(lambda: print(f"wrote {draw_runs(args.runs, args.out)}"),
                       command_failures("plot", {UsageError: USAGE}))


if __name__ == "__main__":
    sys.exit(main())

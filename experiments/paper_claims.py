"""The LLaDA paper's claims at small scale, one command each:

    python -m experiments.paper_claims {reversal,remasking,scaling,sampling_steps,all} --out DIR
        [--seeds 1 2 3] [--workers N] [--fast]

Each claim writes DIR/<claim>.md (a table, mean ± sd over the seeds, with what the paper
reports), DIR/<claim>.png and DIR/<claim>.json (every seed's numbers); `all` runs the four and
writes DIR/README.md from the tables.
Models and evaluations are kept under DIR, and a finished training run is reused when the same
command is given again. `--fast` is the test suite's smaller variant (fewer facts, steps and
tokens): the same code, for checking the direction of each effect in minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from experiments import remasking, reversal, sampling_steps, scaling
from experiments.stack import ExperimentError

CLAIMS = {"reversal": reversal, "remasking": remasking, "scaling": scaling, "sampling_steps": sampling_steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("claim", choices=[*CLAIMS, "all"])
    parser.add_argument("--out", required=True, type=Path, help="directory for tables, pictures, models and logs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="training seeds (at least 2 for a spread)")
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once (default 2: one per core)")
    parser.add_argument("--fast", action="store_true", help="the test suite's smaller variant")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    names = list(CLAIMS) if args.claim == "all" else [args.claim]
    begin = time.perf_counter()
    for name in names:
        start = time.perf_counter()
        try:
            results = CLAIMS[name].run(args.out, args.seeds, fast=args.fast, workers=args.workers)
        except ExperimentError as err:
            print(f"paper_claims error: {name}: {err}", file=sys.stderr)
            return 1
        (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"{name}: {time.perf_counter() - start:.0f} s -> {args.out / (name + '.md')}, "
              f"{args.out / (name + '.png')}", flush=True)
        print((args.out / f"{name}.md").read_text(), flush=True)
    if args.claim == "all":
        total = time.perf_counter() - begin
        (args.out / "README.md").write_text(
            f"# The LLaDA paper's claims at small scale\n\n`python -m experiments.paper_claims all --out {args.out} "
            f"--seeds {' '.join(map(str, args.seeds))}{' --fast' if args.fast else ''}`: {total / 60:.1f} min.\n\n"
            + "\n".join((args.out / f"{name}.md").read_text() for name in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a LLaDA model on benchmark files: `python -m pretrain.evaluate --model DIR --tasks TASKS.yaml`.

`--preset NAME --data FILE.jsonl` instead of `--tasks` runs one task under an official protocol
(`pretrain/evaluation/presets.py`: the settings of a row of the official evaluation table).

DIR is a training checkpoint or a released-format directory (as for `pretrain.generate`); TASKS.yaml
lists multiple-choice and generation tasks over JSONL files (schema and scoring rules:
`pretrain/evaluation/tasks.py`; an annotated example: `recipes/eval_tasks.yaml`). The task file and every
data row are validated before the model loads.

Multiple choice scores every choice with Algorithm 3 (`pretrain.diffusion.likelihood`, the official
`get_log_likelihood`) on lm-eval's context/continuation split and predicts the argmax: `acc`, and
`acc_norm` (score per character of the choice, as lm-eval). Each (example, choice) draws its
masks from its own CPU generator keyed by (seed, task, example, choice), so a score does not
depend on the layout, the device or how examples are split over ranks. Generation runs the
reverse process (`pretrain.diffusion.sampling`) on left-padded batches of prompts (optionally wrapped in
the chat template), cuts at EOS (and EoT with chat) and at stop strings, extracts the answer and
reports `exact_match`; each batch has its own generator (keyed by its first example), so at
temperature > 0 answers depend on the batching, at temperature 0 they do not.

A causal checkpoint (the AR baseline, train.objective arm) is scored exactly on the same task files
(`pretrain/evaluation/autoregressive.py`): a choice's score is its log-likelihood from one forward, and
generation decodes greedily for gen_length forwards per prompt (a task asking for temperature > 0,
random remasking, cfg_scale or a threshold is refused before any task runs).

Under a launcher (`torchrun --nproc_per_node N -m pretrain.evaluate ...`, or `deepspeed`) the model
is sharded (ZeRO-3 by default, `--tensor-parallel`) and every forward is a collective: the
(example, choice) pairs and the prompts are split over data-parallel ranks with
`data_pipeline.eval_sampler` (a short rank scores a dummy whose result is dropped), so every
rank runs the same number of forwards (Algorithm 3 makes mc_num // batch_size per pair; the
sampler's early stop is agreed by an all-reduce), and the results are gathered in example order.
Rank 0 prints a table (task, type, n, metric, value) and writes `--out` JSON: per task the
metrics, the settings, the forwards each rank ran, and one record per example. A bad flag, path,
task file or data row is one line on stderr and exit code 2 (the README's exit-code table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from parallel import engine as ds
from pretrain.evaluation.autoregressive import check_greedy_settings
from pretrain.evaluation.presets import get_preset, task_entry
from pretrain.evaluation.scoring import format_table, run_task
from pretrain.evaluation.tasks import TaskFileError, load_tasks, parse_tasks, read_examples
from pretrain.inference.flags import add_model_flags, open_model, run_sampling_command
from pretrain.runtime.exit_codes import UsageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tasks", help="YAML list of tasks (see recipes/eval_tasks.yaml)")
    source.add_argument("--preset", help="an official protocol by name (pretrain/evaluation/presets.py) "
                                         "over the task's data (--data)")
    parser.add_argument("--data", help="with --preset: the task's JSONL (prompts hold the preset's few-shot examples)")
    parser.add_argument("--stop", action="append", help="with --preset, a generation task: a stop string (repeatable)")
    parser.add_argument("--extract", help="with --preset, a generation task: 'number', or a regex whose group 1 "
                                          "is the answer")
    parser.add_argument("--limit", type=int, help="score only the first N examples of each task")
    parser.add_argument("--out", help="write metrics, settings and per-example records here (JSON)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the Monte Carlo masks and the sampler")
    add_model_flags(parser)
    args = parser.parse_args(argv)
    return run_sampling_command("evaluate", lambda: evaluate(args), usage_errors=(TaskFileError,))


def evaluate(args: argparse.Namespace) -> int:
    """Score every task, print the table and write --out (rank 0)."""
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit}: give a positive number of examples")
    tasks = load_tasks(args.tasks) if args.tasks else preset_tasks(args)
    data = {task.name: read_examples(task, args.limit) for task in tasks}
    model = open_model(args)
    if model.config.causal:
        for task in tasks:
            check_greedy_settings(task)
    rank0 = ds.rank() == 0
    results = {}
    for task in tasks:
        results[task.name] = run_task(model, task, data[task.name], args.seed)
        if rank0:
            r = results[task.name]
            print(f"evaluate: {task.name}: {r['n']} examples, {r['forwards_per_rank'][0]} forwards per rank, "
                  f"{r['seconds']:.1f} s", file=sys.stderr, flush=True)
    if rank0:
        print(format_table(results), flush=True)
        if args.out:
            report = {"model": str(args.model), "tasks_file": args.tasks, "preset": args.preset, "limit": args.limit,
                      "seed": args.seed, "world_size": ds.world_size(), "dp_size": model.dp_size, "tasks": results}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if model.distributed:
        ds.exit_together(0)
    return 0


def preset_tasks(args: argparse.Namespace) -> list:
    """The one task `--preset NAME --data FILE` stands for."""
    if not args.data:
        raise UsageError(f"--preset {args.preset}: give the task's JSONL with --data FILE")
    data_settings = {key: value for key, value in (("stop", args.stop), ("extract", args.extract)) if value}
    entry = task_entry(get_preset(args.preset), str(Path(args.data).resolve()), **data_settings)
    return parse_tasks([entry], Path.cwd() / f"--preset {args.preset}")


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a LLaDA model on benchmark files: `python -m pretrain.evaluate --model DIR --tasks TASKS.yaml`.

DIR is a training checkpoint or a released-layout directory (as for `pretrain.generate`); TASKS.yaml
lists multiple-choice and generation tasks over JSONL files (schema and scoring rules:
`pretrain/eval_tasks.py`; an annotated example: `recipes/eval_tasks.yaml`). The task file and every
data row are validated before the model loads.

Multiple choice scores every choice with Algorithm 3 (`pretrain.likelihood`, the official
`get_log_likelihood`) on lm-eval's context/continuation split and predicts the argmax: `acc`, and
`acc_norm` (score per character of the choice, as lm-eval). Each (example, choice) draws its
masks from its own CPU generator keyed by (seed, task, example, choice), so a score does not
depend on the layout, the device or how examples are split over ranks. Generation runs the
reverse process (`pretrain.sampling`) on left-padded batches of prompts (optionally wrapped in
the chat template), cuts at EOS (and EoT with chat) and at stop strings, extracts the answer and
reports `exact_match`; each batch has its own generator (keyed by its first example), so at
temperature > 0 answers depend on the batching, at temperature 0 they do not.

Under a launcher (`torchrun --nproc_per_node N -m pretrain.evaluate ...`, or `deepspeed`) the model
is sharded (ZeRO-3 by default, `--tensor-parallel`) and every forward is a collective: the
(example, choice) pairs and the prompts are split over data-parallel ranks with
`data_pipeline.eval_sampler` (a short rank scores a dummy whose result is dropped), so every
rank runs the same number of forwards (Algorithm 3 makes mc_num // batch_size per pair; the
sampler's early stop is agreed by an all-reduce), and the results are gathered in example order.
Rank 0 prints a table (task, type, n, metric, value) and writes `--out` JSON: per task the
metrics, the settings, the forwards each rank ran, and one record per example.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from data_pipeline.eval_sampler import gather_in_order, shard_examples
from data_pipeline.seeding import keyed_generator
from data_pipeline.sft import ChatTemplate
from parallel import engine as ds
from pretrain.eval_tasks import (ChoiceExample, GenerationExample, Task, TaskFileError, encode_pair,
                                 generation_record, load_tasks, read_examples)
from pretrain.generate import add_model_flags, open_model, sample_prompts
from pretrain.likelihood import conditional_log_likelihood


class CountingModel:
    """The model, counting its forwards (every rank must run as many); its other attributes are
    the model's."""

    def __init__(self, model):
        self.model = model
        self.forwards = 0

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **cache) -> torch.Tensor:
        self.forwards += 1
        return self.model(ids, attention_mask=attention_mask, **cache)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def _encoded_choices(tok, task: Task, examples: list[ChoiceExample]) -> list[list[tuple[list[int], list[int]]]]:
    encoded = []
    for example in examples:
        pairs = [encode_pair(tok, example.context, choice) for choice in example.choices]
        for number, (_, answer) in enumerate(pairs):
            if not answer:
                raise TaskFileError(f"{task.path}:{example.line}: choice {number} encodes to no tokens after "
                                    f"the context; give every choice some text")
            if tok.mask_id in answer:
                raise TaskFileError(f"{task.path}:{example.line}: choice {number} contains the mask token")
        encoded.append(pairs)
    return encoded


def score_multiple_choice(model, task: Task, examples: list[ChoiceExample],
                          seed: int) -> tuple[dict, list[dict]]:
    """(metrics, records): every choice scored once over all ranks, in lockstep.

    The (example, choice) pairs are what is split over ranks: each costs the same number of
    forwards whatever its length, so uneven choice counts cannot desynchronise the ranks."""
    tok, s = model.tokenizer, task.settings
    encoded = _encoded_choices(tok, task, examples)
    pairs = [(i, c) for i, example in enumerate(examples) for c in range(len(example.choices))]
    share = shard_examples(pairs, model.dp_rank, model.dp_size)
    scores = []
    for _, (i, c) in share:
        prompt, answer = (torch.tensor(ids, dtype=torch.long, device=model.device) for ids in encoded[i][c])
        generator = keyed_generator(seed, "eval", task.name, i, c)
        scores.append(conditional_log_likelihood(model, prompt, answer, mask_id=tok.mask_id, mc_num=s["mc_num"],
                                                 batch_size=s["batch_size"], cfg_scale=s["cfg_scale"],
                                                 generator=generator))
    flat = gather_in_order(scores, [index for index, _ in share], group=model.dp_group)
    records, correct, correct_norm, start = [], 0, 0, 0
    for i, example in enumerate(examples):
        own = flat[start:start + len(example.choices)]
        start += len(example.choices)
        prediction = max(range(len(own)), key=own.__getitem__)
        normed = [score / len(choice) for score, choice in zip(own, example.choices)]
        prediction_norm = max(range(len(own)), key=normed.__getitem__)
        correct += prediction == example.answer
        correct_norm += prediction_norm == example.answer
        records.append({"index": i, "line": example.line, "prediction": prediction, "target": example.answer,
                        "correct": prediction == example.answer, "prediction_norm": prediction_norm,
                        "scores": own})
    return {"acc": correct / len(examples), "acc_norm": correct_norm / len(examples)}, records


def _prompt_ids(tok, task: Task, examples: list[GenerationExample]) -> list[list[int]]:
    if task.settings["chat"]:
        chat = ChatTemplate(tok)
        return [chat.prompt([{"role": "user", "content": e.prompt}])
                for e in examples]
    prompts = [tok.encode(e.prompt) for e in examples]
    for example, prompt in zip(examples, prompts):
        if not prompt:
            raise TaskFileError(f"{task.path}:{example.line}: the prompt encodes to no tokens")
    return prompts


def score_generation(model, task: Task, examples: list[GenerationExample],
                     seed: int) -> tuple[dict, list[dict]]:
    """(metrics, records): every prompt answered once over all ranks; equal shares, so every rank
    runs the same number of batches, and each batch's early stop is agreed."""
    tok, s = model.tokenizer, task.settings
    prompts = _prompt_ids(tok, task, examples)
    answers = sample_prompts(model, prompts, task.sampler, s["batch_size"], key=(seed, "eval", task.name),
                             cut_at_eot=s["chat"])
    records = []
    for i, (example, answer) in enumerate(zip(examples, answers)):
        text = tok.decode(answer["ids"], skip_special_tokens=True)
        records.append({"index": i, "line": example.line, **generation_record(text, example.answer, s),
                        "steps_run": answer["steps_run"]})
    return {"exact_match": sum(r["correct"] for r in records) / len(records)}, records


def _forwards_per_rank(count: int, distributed: bool) -> list[int]:
    if not distributed:
        return [count]
    counts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(counts, count)
    return counts


def run_task(model, task: Task, examples: list, seed: int) -> dict:
    counting = CountingModel(model)
    begin = time.perf_counter()
    score = score_multiple_choice if task.type == "multiple_choice" else score_generation
    metrics, records = score(counting, task, examples, seed)
    forwards = _forwards_per_rank(counting.forwards, model.distributed)
    return {"type": task.type, "path": str(task.path), "n": len(examples), "metrics": metrics,
            "settings": task.settings, "forwards_per_rank": forwards,
            "seconds": round(time.perf_counter() - begin, 3), "examples": records}


def format_table(results: dict[str, dict]) -> str:
    rows = [(name, r["type"], str(r["n"]), metric, f"{value:.4f}")
            for name, r in results.items() for metric, value in r["metrics"].items()]
    header = ("task", "type", "n", "metric", "value")
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(w) if k < 2 or k == 3 else cell.rjust(w)
                                 for k, (cell, w) in enumerate(zip(row, widths)))
    return "\n".join([line(header), *(line(row) for row in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", required=True, help="YAML list of tasks (see recipes/eval_tasks.yaml)")
    parser.add_argument("--limit", type=int, help="score only the first N examples of each task")
    parser.add_argument("--out", help="write metrics, settings and per-example records here (JSON)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the Monte Carlo masks and the sampler")
    add_model_flags(parser)
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise SystemExit("evaluate: --limit must be a positive number of examples")
    try:
        tasks = load_tasks(args.tasks)
        data = {task.name: read_examples(task, args.limit) for task in tasks}
    except TaskFileError as error:
        raise SystemExit(f"evaluate: {error}") from None
    model = open_model(args)
    rank0 = not model.distributed or torch.distributed.get_rank() == 0
    results = {}
    for task in tasks:
        try:
            results[task.name] = run_task(model, task, data[task.name], args.seed)
        except TaskFileError as error:
            raise SystemExit(f"evaluate: {error}") from None
        if rank0:
            r = results[task.name]
            print(f"evaluate: {task.name}: {r['n']} examples, {r['forwards_per_rank'][0]} forwards per rank, "
                  f"{r['seconds']:.1f} s", file=sys.stderr, flush=True)
    if rank0:
        print(format_table(results), flush=True)
        if args.out:
            world = torch.distributed.get_world_size() if model.distributed else 1
            report = {"model": str(args.model), "tasks_file": str(args.tasks), "limit": args.limit,
                      "seed": args.seed, "world_size": world, "dp_size": model.dp_size, "tasks": results}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if model.distributed:
        ds.exit_together(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scoring a task's examples on a model, every rank in lockstep.

Multiple choice: every (example, choice) pair scored by Algorithm 3 (`pretrain.diffusion.likelihood`)
with masks from a CPU generator keyed by (seed, task, example, choice), the pairs split over the
data-parallel ranks (each pair costs the same forwards, so uneven choice counts cannot
desynchronise them), `acc` and `acc_norm` from the gathered scores. Generation: the prompts
through `pretrain.inference.batched.sample_prompts`, answers cut at stop strings and extracted,
`exact_match`. `run_task` also counts each rank's forwards (they must be equal).

A causal checkpoint (the AR baseline, train.objective arm) is scored exactly
(`pretrain.evaluation.autoregressive`): each choice by its log-likelihood from one forward, each
prompt decoded greedily for gen_length forwards; the records and metrics are the same.
"""

from __future__ import annotations

import time

import torch

from data_pipeline.eval_sampler import gather_in_order, shard_examples
from data_pipeline.seeding import keyed_generator
from data_pipeline.sft import ChatTemplate
from pretrain.diffusion.likelihood import conditional_log_likelihood
from pretrain.evaluation.autoregressive import causal_log_likelihood, greedy_answers
from pretrain.evaluation.tasks import (
    ChoiceExample,
    GenerationExample,
    Task,
    TaskFileError,
    encode_pair,
    generation_record,
)
from pretrain.inference.batched import sample_prompts


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


def _encoded_choices(tok, task: Task, examples: list[ChoiceExample],
                     causal: bool) -> list[list[tuple[list[int], list[int]]]]:
    encoded = []
    for example in examples:
        pairs = [encode_pair(tok.encode, example.context, choice) for choice in example.choices]
        for number, (context, answer) in enumerate(pairs):
            if causal and not context:
                raise TaskFileError(f"{task.path}:{example.line}: the context encodes to no tokens, and a causal "
                                    f"model (the AR baseline) predicts a choice's first token from the context; "
                                    f"give every example a context")
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
    forwards whatever its length, so uneven choice counts cannot desynchronise the ranks. A causal
    model scores each pair exactly, in one forward."""
    tok, s, causal = model.tokenizer, task.settings, model.config.causal
    encoded = _encoded_choices(tok, task, examples, causal)
    pairs = [(i, c) for i, example in enumerate(examples) for c in range(len(example.choices))]
    share = shard_examples(pairs, model.dp_rank, model.dp_size)
    scores = []
    for _, (i, c) in share:
        prompt, answer = (torch.tensor(ids, dtype=torch.long, device=model.device) for ids in encoded[i][c])
        if causal:
            scores.append(causal_log_likelihood(model, prompt, answer))
            continue
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


def prompt_ids(tok, task: Task, examples: list[GenerationExample]) -> list[list[int]]:
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
    runs the same number of batches, and each batch's early stop is agreed. A causal model decodes
    each prompt greedily."""
    tok, s = model.tokenizer, task.settings
    prompts = prompt_ids(tok, task, examples)
    if model.config.causal:
        answers = greedy_answers(model, prompts, gen_length=s["gen_length"], cut_at_eot=s["chat"])
    else:
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

"""Claim 1, the reversal curse (paper Table 3): a masked diffusion model narrows the gap between
forward and reversed questions that an autoregressive model shows.

The classic protocol at small scale: facts "X's parent is Y." about one set of made-up people
stated in that direction only, facts about another set stated both ways ("Y's child is X." too)
so the question format is learnt; then, on the first set, the forward question "X's parent is"
and the reversed one "Y's child is", answered greedily and scored by exact match of the name.
The MDM and the AR baseline share the architecture, data, token budget, schedule and seeds
(`configs/reversal.yaml`); the AR model decodes left to right, the MDM with the paper's sampler
(low-confidence remasking over a short canvas).
"""

from __future__ import annotations

from pathlib import Path

from experiments import charts, stack
from experiments.synthetic import reversal_choices, reversal_questions, write_reversal_corpus

CONFIG = Path(__file__).parent / "configs" / "reversal.yaml"
KINDS = {"MDM": ["train.objective=mdm"], "ARM": ["train.objective=arm", "model.causal=true"]}
QUESTION_SETS = ("one_way_forward", "one_way_reversed", "both_ways_forward", "both_ways_reversed")
CHOICE_SETS = ("one_way_forward_choice", "one_way_reversed_choice")
# Every name is one token, so one Monte Carlo sample makes Algorithm 3 exact.
CHOICE = {"mc_num": 1, "batch_size": 1}
# The canvas: the name (one to three tokens), its full stop and EOS.
ANSWER = {"gen_length": 6, "steps": 6, "block_length": 6, "temperature": 0.0, "stop": ["."],
          "extract": "(\\w+)", "batch_size": 32}
FULL = {"one_way": 32, "both_ways": 96, "steps": 800}
FAST = {"one_way": 16, "both_ways": 48, "steps": 500}
PAPER = ("LLaDA 8B Instruct 51.8 forward / 45.6 reversal; Qwen2.5-7B Instruct 75.9 / 38.0; GPT-4o 82.7 / 34.3 "
         "(poem completion, 496 pairs, v3 Table 4; v1/v2 Table 3 has LLaDA at 48.8 / 42.4)")


def _job(job: dict) -> dict:
    run_dir, seed = Path(job["run_dir"]), job["seed"]
    checkpoints = stack.train(run_dir, CONFIG, [*KINDS[job["kind"]], f"data.paths=[{job['data']}]",
                                                f"train.seed={seed}", f"train.steps={job['steps']}",
                                                f"schedule.total_steps={job['steps']}"])
    report = stack.evaluate(checkpoints, Path(job["tasks"]), run_dir / "evaluation.json", seed=seed)
    return {**{name: report[name]["metrics"]["exact_match"] for name in QUESTION_SETS},
            **{name: report[name]["metrics"]["acc"] for name in CHOICE_SETS}}


def run(out: Path, seeds: list[int], *, fast: bool = False, workers: int = 2) -> dict:
    """Train both kinds for every seed, score the question sets, write reversal.md/.png;
    returns {kind: {question set: [accuracy per seed]}}."""
    size = FAST if fast else FULL
    work = out / "reversal"
    data = write_reversal_corpus(work / "data", one_way=size["one_way"], both_ways=size["both_ways"])
    sets = [("generation", ANSWER, reversal_questions(data)), ("multiple_choice", CHOICE, reversal_choices(data))]
    tasks = stack.write_tasks(work / "tasks.yaml", [
        {"name": name, "type": kind, "path": str(stack.write_jsonl(work / f"{name}.jsonl", rows)), **settings}
        for kind, settings, questions in sets for name, rows in questions.items()])
    jobs = [{"kind": kind, "seed": seed, "run_dir": str(work / f"{kind.lower()}_seed{seed}"), "steps": size["steps"],
             "data": str(work / "data"), "tasks": str(tasks)} for kind in KINDS for seed in seeds]
    scores = stack.run_parallel(_job, jobs, out=out, workers=workers)
    results = {kind: {name: [s[name] for job, s in zip(jobs, scores) if job["kind"] == kind]
                      for name in QUESTION_SETS + CHOICE_SETS} for kind in KINDS}
    rows = [[kind, *(stack.spread(results[kind][name]) for name in QUESTION_SETS + CHOICE_SETS)] for kind in KINDS]
    table = stack.markdown_table(["model", "forward (one-way)", "reversed (one-way)", "forward (both-ways)",
                                  "reversed (both-ways)", "forward, 4 choices (one-way)",
                                  "reversed, 4 choices (one-way)"], rows)
    (out / "reversal.md").write_text(
        f"## Reversal (paper Table 3)\n\nAccuracy over seeds {seeds} (mean ± sd), {size['one_way']} one-way and "
        f"{size['both_ways']} both-ways pairs, {size['steps']} steps of 32 x 32 tokens per model; generation: greedy "
        f"answer, exact match; 4 choices: the right name against three of the same role, scored by exact "
        f"log-likelihood (chance 0.25).\n\n{table}\n"
        f"Paper: {PAPER}.\n")
    charts.bars(out / "reversal.png", "Reversal: accuracy on facts stated one way only (mean ± sd over seeds)",
                ["forward", "reversed", "forward, 4 choices", "reversed, 4 choices"],
                [charts.Series(kind, {group: stack.mean_sd(results[kind][name]) for group, name in zip(
                    ["forward", "reversed", "forward, 4 choices", "reversed, 4 choices"],
                    ("one_way_forward", "one_way_reversed") + CHOICE_SETS)}) for kind in KINDS], "accuracy")
    return results

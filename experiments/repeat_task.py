"""The SFT models the remasking and sampling-steps experiments decode, and their scoring.

One model per seed, fine-tuned with the stack's SFT objective (Algorithm 2: prompt kept, answer
masked, EOS padding to the micro-batch's longest row trained) from fresh weights on the repeat
task ("Repeat: c a f" -> "c a f", 1 to 12 letters; `configs/repeat_sft.yaml`), with a byte-level
BPE trained on the task's text. Both experiments decode the same models with different sampler
settings, through `pretrain.evaluate` task files (chat template, exact match, and the reveal
count of every answer), so running one after the other trains once.
"""

from __future__ import annotations

from pathlib import Path

from data_pipeline.tokenizer import train_bpe
from experiments import stack
from experiments.synthetic import write_repeat_task

CONFIG = Path(__file__).parent / "configs" / "repeat_sft.yaml"
FULL = {"conversations": 2000, "heldout": 64, "epochs": 6}
FAST = {"conversations": 1000, "heldout": 32, "epochs": 10}
MAX_LETTERS = 12


def prepare(out: Path, fast: bool) -> Path:
    """The task's files and tokenizer under <out>/repeat_task (written once)."""
    size = FAST if fast else FULL
    work = out / "repeat_task" / ("fast" if fast else "full")
    if not (work / "tokenizer.json").is_file():
        write_repeat_task(work, conversations=size["conversations"], heldout=size["heldout"], max_letters=MAX_LETTERS)
        train_bpe([work / "corpus.txt"], 300, work / "tokenizer.json")
    return work


def _job(job: dict) -> dict:
    work, run_dir, seed = Path(job["work"]), Path(job["run_dir"]), job["seed"]
    checkpoints = stack.train(run_dir, CONFIG, [
        f"data.paths=[{work / 'train.jsonl'}]", f"data.tokenizer={work / 'tokenizer.json'}",
        f"train.epochs={job['epochs']}", f"train.seed={seed}"])
    tasks = stack.write_tasks(run_dir / f"{job['name']}_tasks.yaml", [
        {"name": name, "type": "generation", "path": str(work / "questions.jsonl"), "chat": True, "batch_size": 32,
         **settings} for name, settings in job["settings"].items()])
    report = stack.evaluate(checkpoints, tasks, run_dir / f"{job['name']}.json", seed=seed)
    return {name: _summary(task["examples"]) for name, task in report.items()}


def _summary(examples: list[dict]) -> dict:
    """Exact match, mean answer length over mean target length (in letters), forwards per answer."""
    letters = sum(len(e["prediction"].split()) for e in examples)
    wanted = sum(len(e["target"].split()) for e in examples)
    return {"exact_match": sum(e["correct"] for e in examples) / len(examples), "length_ratio": letters / wanted,
            "forwards": sum(e["steps_run"] for e in examples) / len(examples)}


def decode(out: Path, seeds: list[int], name: str, settings: dict[str, dict], *, fast: bool,
           workers: int) -> dict[str, dict[str, list[float]]]:
    """Every seed's model decoding the held-out prompts under each of `settings` (sampler
    fields per row name): {row: {"exact_match" | "length_ratio" | "forwards": [per seed]}}."""
    work = prepare(out, fast)
    size = FAST if fast else FULL
    jobs = [{"work": str(work), "run_dir": str(work / f"sft_seed{seed}"), "seed": seed, "epochs": size["epochs"],
             "name": name, "settings": settings} for seed in seeds]
    per_seed = stack.run_parallel(_job, jobs, out=out, workers=workers)
    return {row: {key: [s[row][key] for s in per_seed] for key in ("exact_match", "length_ratio", "forwards")}
            for row in settings}

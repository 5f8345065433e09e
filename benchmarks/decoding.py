"""Fast decoding against the exact reverse process: tokens/s, forwards, agreement and accuracy.

    python benchmarks/decoding.py [--model DIR] [--out runs/decoding_bench] [--prompts 32] [--repeats 3]

Without `--model` it first trains a tiny LLaDA (4 layers, d_model 128, about 0.8M parameters)
for 300 SFT steps (Algorithm 2) on a synthetic copy task: "copy: w1 ... wn - - =" (8 word
slots, "-" filling the empty ones) answered by " w1 ... wn;" and EOS padding. It saves the
model in the trainer's checkpoint layout under `--out`, with the task file `copy_task.yaml`
and its held-out prompts, so later runs and `pretrain.generate` (e.g. `--denoising-png`) can
load it. Then every mode decodes the same held-out prompts through
`pretrain.generate.sample_prompts` (batches of one, greedy, no early stop, so every mode
produces the same `gen_length` positions per prompt) and one Markdown table is printed:
tokens/s (generated positions over the best wall time of `--repeats` passes, the modes
interleaved so that other load on the machine moves them alike), speed-up against exact
decoding, forwards per prompt (NFE), the share of answer tokens identical to exact decoding's
(answers cut at the first EOS, the rest counted as EOS), and the task's exact-match accuracy
(`pretrain.evaluation.tasks` scoring). A second table shows what a step costs: one forward over
the whole sequence against one over a window through the cache, at a few sequence lengths,
with the block's projections separate and fused (`load_model(..., fuse_projections=True)`).
On CPU it runs on `--threads` threads (1 by default).
Figures and the commands that produced them: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from data_pipeline.tokenizer import TokenizerInfo, train_bpe
from parallel.attention import KVCache
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from pretrain.diffusion.objectives import sft_loss, sft_noise
from pretrain.evaluation.scoring import CountingModel
from pretrain.evaluation.tasks import generation_record, load_tasks, read_examples
from pretrain.inference.batched import sample_prompts
from pretrain.inference.loading import load_model

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rain",
         "snow", "wind", "fire", "stone", "milk", "bread", "salt", "gold", "iron", "sand", "leaf", "rose"]
MODEL = ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden_size=344, vocab_size=384,
                    max_sequence_length=128)
GEN_LENGTH, BLOCK_LENGTH, SLOTS = 64, 8, 8
MODES = {  # name: the fast-decoding fields of SamplerConfig
    "exact": {},
    "threshold 0.9": dict(threshold=0.9),
    "prefix cache": dict(cache="prefix"),
    "dual cache": dict(cache="dual"),
    "threshold 0.9 + dual cache": dict(threshold=0.9, cache="dual"),
    "threshold 1.0 + dual, refreshed every step": dict(threshold=1.0, cache="dual", cache_refresh_every=1),
}


def copy_example(rng: random.Random, min_words: int = 3, max_words: int = SLOTS) -> tuple[str, str]:
    """(prompt, answer) of the copy task: the prompt holds the words in SLOTS slots, "-" filling the
    empty ones (so answer token i always sits a fixed distance from prompt slot i)."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
    return "copy: " + " ".join(words + ["-"] * (SLOTS - len(words))) + " =", " " + " ".join(words) + ";"


def copy_tokenizer(path: Path) -> TokenizerInfo:
    """A byte-level BPE (384 tokens) trained on copy-task text, so each word is one token."""
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "copy.txt")
        corpus.write_text("\n".join("".join(copy_example(rng)) for _ in range(4000)))
        return train_bpe([corpus], MODEL.vocab_size, path)


def copy_batch(tok: TokenizerInfo, rng: random.Random, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [rows, length]: prompt, answer, EOS padding to `length`; prompt lengths [rows])."""
    ids = torch.full((rows, length), tok.eos_id)
    prompt_lengths = []
    for row in range(rows):
        prompt, answer = (tok.encode(text) for text in copy_example(rng))
        ids[row, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        prompt_lengths.append(len(prompt))
    return ids, torch.tensor(prompt_lengths)


def train_copy_model(tok: TokenizerInfo, config: ModelConfig = MODEL, steps: int = 300, rows: int = 32,
                     gen_length: int = GEN_LENGTH, lr: float = 3e-3, seed: int = 0) -> LLaDAModel:
    """SFT (prompt never masked, EOS padding trained) of a fresh model on the copy task; the
    learning rate decays linearly to zero."""
    model = LLaDAModel(config, init_seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    length = len(tok.encode(copy_example(random.Random(0))[0])) + gen_length
    for _ in range(steps):
        ids, prompt_lengths = copy_batch(tok, rng, rows, length)
        noised = sft_noise(ids, prompt_lengths, tok.mask_id, generator=generator)
        loss = sft_loss(model(noised.noisy), ids, prompt_lengths, noised)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def save_checkpoint(directory: Path, model: LLaDAModel, tokenizer: Path) -> Path:
    """The weights, config and tokenizer as the trainer publishes them (loadable by --model)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(directory / "model.safetensors"))
    (directory / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(model.config)}))
    (directory / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return directory


def write_task(directory: Path, count: int, seed: int = 1234) -> Path:
    """A generation task file over `count` held-out copy prompts (a seed training never uses)."""
    rng = random.Random(seed)
    rows = [{"prompt": prompt, "answer": answer.rstrip(";")}  # the stop string ";" ends the prediction
            for prompt, answer in (copy_example(rng) for _ in range(count))]
    (directory / "copy_task.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = [{"name": "copy", "type": "generation", "path": "copy_task.jsonl", "gen_length": GEN_LENGTH,
             "steps": GEN_LENGTH, "block_length": BLOCK_LENGTH, "stop": [";"], "stop_at_eos": False,
             "batch_size": 1}]
    path = directory / "copy_task.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


def prepare(out: Path, train_steps: int) -> Path:
    """Train and save the benchmark's model and task file under `out` (once)."""
    checkpoint = out / "ckpt"
    if (checkpoint / "model.safetensors").is_file():
        return checkpoint
    out.mkdir(parents=True, exist_ok=True)
    tok = copy_tokenizer(out / "tokenizer.json")
    begin = time.perf_counter()
    model = train_copy_model(tok, steps=train_steps)
    print(f"trained the copy-task model for {train_steps} steps in {time.perf_counter() - begin:.0f} s",
          file=sys.stderr)
    write_task(checkpoint.parent, 32)
    return save_checkpoint(checkpoint, model, out / "tokenizer.json")


def identical_share(answer: list[int], reference: list[int], length: int, eos_id: int) -> tuple[int, int]:
    """(positions equal, positions) over `length` generated positions of two EOS-cut answers."""
    pad = lambda ids: ids + [eos_id] * (length - len(ids))  # noqa: E731
    return sum(a == b for a, b in zip(pad(answer), pad(reference))), length


def run(model_dir: Path, task_file: Path, prompts: int, repeats: int, device_note: str) -> None:
    model = load_model(model_dir)
    tok = model.tokenizer
    task = load_tasks(task_file)[0]
    examples = read_examples(task, limit=prompts)
    prompt_ids = [tok.encode(e.prompt) for e in examples]
    configs = {name: dataclasses.replace(task.sampler, **fields) for name, fields in MODES.items()}
    seconds = {name: [] for name in MODES}
    answers, forwards = {}, {}
    for name, config in configs.items():  # warm-up
        sample_prompts(model, prompt_ids[:1], config, 1, key=(0, "warm-up"))
    for _ in range(repeats):  # modes interleaved, best time kept: other load on the machine moves them alike
        for name, config in configs.items():
            counting = CountingModel(model)
            begin = time.perf_counter()
            results = sample_prompts(counting, prompt_ids, config, 1, key=(0, "bench"))
            seconds[name].append(time.perf_counter() - begin)
            answers[name], forwards[name] = [r["ids"] for r in results], counting.forwards
    base = task.sampler
    print(f"{len(examples)} held-out copy-task prompts, gen_length {base.gen_length} in blocks of "
          f"{base.block_length}, exact decoding {base.steps} steps (one token each), greedy, no early stop, "
          f"batch 1; best of {repeats}; {device_note}")
    print("| mode | tokens/s | speed-up | NFE per prompt | identical tokens | accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    exact_rate = None
    for name in MODES:
        rate = len(examples) * base.gen_length / min(seconds[name])
        exact_rate = exact_rate or rate
        same = [identical_share(a, r, base.gen_length, tok.eos_id) for a, r in zip(answers[name], answers["exact"])]
        correct = [generation_record(tok.decode(a, skip_special_tokens=True), e.answer, task.settings)["correct"]
                   for a, e in zip(answers[name], examples)]
        print(f"| {name} | {rate:.0f} | {rate / exact_rate:.2f}x | {forwards[name] / len(examples):.1f} | "
              f"{100 * sum(s for s, _ in same) / sum(n for _, n in same):.1f}% | "
              f"{sum(correct) / len(correct):.2f} |", flush=True)


@torch.no_grad()
def forward_times(model_dir: Path, window: int = BLOCK_LENGTH, lengths=(75, 139, 267), calls: int = 20) -> None:
    """What one step costs: a forward over the whole sequence against one over a window of it
    through a cache, with separate and with fused projections (best of `calls`, milliseconds)."""
    models = {"": load_model(model_dir), ", fused": load_model(model_dir, fuse_projections=True)}
    columns = [f"{kind} (ms){fused}" for fused in models for kind in ("whole forward", f"{window}-position window")]
    print(f"\n| sequence | {' | '.join(columns)} | whole / window |")
    print("|---:|" + "---:|" * (len(columns) + 1))
    device = models[""].device
    for length in lengths:
        ids = torch.randint(0, models[""].config.vocab_size, (1, length), device=device)
        positions = torch.arange(length - window, length, device=device)
        best = []
        for model in models.values():
            cache = KVCache()
            model(ids, past_key_values=cache)
            whole, part = [], []
            for _ in range(calls):
                begin = time.perf_counter()
                model(ids)
                whole.append(time.perf_counter() - begin)
                begin = time.perf_counter()
                model(ids[:, -window:], past_key_values=cache, cache_position=positions)
                part.append(time.perf_counter() - begin)
            best += [min(whole), min(part)]
        print(f"| {length} | " + " | ".join(f"{1000 * t:.2f}" for t in best) + f" | {best[0] / best[1]:.1f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a checkpoint directory with copy_task.yaml beside it "
                                                   "(default: train one under --out)")
    parser.add_argument("--out", type=Path, default=Path("runs/decoding_bench"))
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: steadier figures on a shared machine, and faster at this size)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = args.model or prepare(args.out, args.train_steps)
    device = f"CUDA ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else \
        f"CPU, {torch.get_num_threads()} thread(s)"
    run(model_dir, model_dir.parent / "copy_task.yaml", args.prompts, args.repeats, device)
    forward_times(model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Supervised fine-tuning end to end, as a user runs it: a base model in the released format ->
`bash recipes/tiny_sft.sh` (import, Algorithm 2 on conversations under the deepspeed launcher,
export) -> the exported chat model answers held-out prompts through `pretrain.generate --chat`
and `pretrain.chat`, and stops (EoT, then EOS to the end).

The conversations are a synthetic task the tiny model learns in a few hundred steps:
"Repeat: x y z" -> "x y z" over letter triples, a third of the dialogues two turns long (so a
pair is drawn per dialogue), with held-out triples never seen in training. The base is the
demo model's shape with fresh weights; what is tested is the path, not pretraining.

Also here: Algorithm 2 through the training loss path (chunked head) leaves the prompt out of
the objective exactly and trains the EOS padding; SFT on 2 data-parallel ranks follows one
process over the same global batches; an SFT run resumes bit for bit."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from support.ports import free_port
from support.tiny_checkpoints import write_checkpoint

from data_pipeline.sft import ChatTemplate, collate_sft, load_sft_pairs
from data_pipeline.tokenizer import train_bpe
from parallel.model import LLaDAModel
from parallel.model_config import preset
from pretrain.checkpoint.hf_export import export
from pretrain.diffusion.objectives import sft_loss
from pretrain.diffusion.sampling import SamplerConfig, generate
from pretrain.inference.loading import load_model
from pretrain.training.config import load_config
from pretrain.training.objective import MaskedDiffusion, objective_for
from pretrain.training.step_loss import draw_noise

REPO = Path(__file__).resolve().parents[1]
LETTERS = "abcdefgh"
GEN = ["--gen-length", "16", "--steps", "16", "--block-length", "16"]


def repeat_turn(triple: str) -> list[dict]:
    return [{"role": "user", "content": f"Repeat: {triple}"}, {"role": "assistant", "content": triple}]


def write_conversations(root: Path) -> list[str]:
    """train.jsonl and heldout.jsonl; returns the held-out triples."""
    rng = random.Random(0)
    triples = sorted({" ".join(rng.choice(LETTERS) for _ in range(3)) for _ in range(3000)})
    rng.shuffle(triples)
    heldout, train = triples[:16], triples[16:]
    with open(root / "train.jsonl", "w") as f:
        for i, triple in enumerate(train):
            messages = repeat_turn(triple) if i % 3 else repeat_turn(rng.choice(train)) + repeat_turn(triple)
            f.write(json.dumps({"messages": messages}) + "\n")
    (root / "heldout.jsonl").write_text("".join(json.dumps({"messages": repeat_turn(t)}) + "\n" for t in heldout))
    return heldout


def write_base(root: Path) -> Path:
    """A released-format base at the demo model's shape (fresh weights, a BPE of the json package)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
    train_bpe(files, 1024, root / "tokenizer.json")
    model = preset("tiny")
    weights = {n: p.detach().clone() for n, p in LLaDAModel(model, init_seed=3).named_parameters()}
    export(write_checkpoint(root / "base_checkpoint", weights, model, root / "tokenizer.json"), root / "base_hf",
           log=lambda *_: None)
    return root / "base_hf"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("sft")
    heldout = write_conversations(root)
    base = write_base(root)
    out = root / "run"
    proc = subprocess.run(["bash", str(REPO / "recipes" / "tiny_sft.sh"), "--base", str(base),
                           "--data", "train.jsonl", "--heldout", "heldout.jsonl", "--out", str(out),
                           "logging.progress_bar=false"],
                          cwd=root, env={**subprocess_env, "MASTER_PORT": str(free_port())},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"root": root, "out": out, "heldout": heldout, "log": proc.stdout + proc.stderr}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_recipe_imports_fine_tunes_with_the_sft_schedule_and_exports(sft_run):
    out, log = sft_run["out"], sft_run["log"]
    assert json.loads((out / "base" / "imported.json").read_text())
    assert f"initialised from the weights in {out / 'base'}" in log
    assert "16 epoch(s) of 31 micro-batches per rank: 496 optimizer steps" in log
    steps = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 497))
    lrs = {r["step"]: r["lr"] for r in steps if "lr" in r}
    assert lrs[20] == pytest.approx(1e-3) and lrs[440] == pytest.approx(1e-3)  # warm-up done, hold
    assert lrs[496] == pytest.approx(1e-4)  # linear decay over the last 10% to final_lr
    bounds = [r["val/elbo_nll"] for r in records(out) if "val/elbo_nll" in r]
    assert len(bounds) == 6 and bounds[0] > 5 and bounds[-1] < 0.2  # steps 0, 100, ..., 400, 496
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LLaDAModelLM"] and (out / "hf" / "modeling_llada.py").is_file()


def test_exported_model_answers_held_out_prompts_then_stops_at_eos(sft_run):
    """The sampler on the exported directory: each held-out answer, then EoT, then EOS at every
    remaining position of the 16 generated."""
    model = load_model(sft_run["out"] / "hf", dtype="fp32")
    tok = model.tokenizer
    chat = ChatTemplate(tok)
    for triple in sft_run["heldout"]:
        prompt = torch.tensor([chat.prompt(repeat_turn(triple)[:1])])
        sample = generate(model, prompt, mask_id=tok.mask_id, eos_id=tok.eos_id, eot_id=chat.eot_id,
                          config=SamplerConfig(steps=16, gen_length=16, block_length=16))
        answer = chat.response(repeat_turn(triple)[1])  # the answer's tokens, then EoT
        generated = sample.ids[0, prompt.shape[1]:].tolist()
        assert generated == answer + [tok.eos_id] * (16 - len(answer)), (triple, tok.decode(generated))


def test_generate_and_chat_clis_answer_held_out_prompts(sft_run, subprocess_env):
    hf, heldout = sft_run["out"] / "hf", sft_run["heldout"]
    prompts = sft_run["root"] / "prompts.txt"
    prompts.write_text("".join(f"Repeat: {t}\n" for t in heldout))
    proc = subprocess.run([sys.executable, "-m", "pretrain.generate", "--model", str(hf), "--chat",
                           "--prompts-file", str(prompts), "--json", *GEN],
                          capture_output=True, text=True, env=subprocess_env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["text"] for line in proc.stdout.splitlines()] == heldout

    # dialogues of two turns, as in training: the second answer sees the first exchange
    a, b, c, d = heldout[:4]
    proc = subprocess.run([sys.executable, "-m", "pretrain.chat", "--model", str(hf), *GEN],
                          input=f"Repeat: {a}\nRepeat: {b}\n/reset\nRepeat: {c}\nRepeat: {d}\n/quit\n",
                          capture_output=True, text=True, env=subprocess_env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [f"llada> {a}", f"llada> {b}", "(dialogue reset)",
                                        f"llada> {c}", f"llada> {d}"]


def test_prompt_positions_never_enter_the_objective_and_padding_eos_does(tmp_path):
    """Algorithm 2 through the training path (noise keyed as in training, the chunked head's
    cross-entropy): the loss equals the whole-logits reference, and its gradient with respect to
    the head's input is exactly zero at every prompt position (the head maps each position on
    its own, so this is the gradient at the prompt's logits) and non-zero at masked EOS padding."""
    tok_path = tmp_path / "tokenizer.json"
    tok = train_bpe(sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py")), 1024, tok_path)
    write_conversations(tmp_path)
    pairs = [dialogue[-1] for dialogue in load_sft_pairs(tmp_path / "train.jsonl", tok)[:8]]  # 1 and 2 turns
    batch = collate_sft(pairs, tok.eos_id)
    cfg = load_config(None, ["train.objective=sft", "data.source=sft", f"data.paths=[{tmp_path / 'train.jsonl'}]",
                             f"data.tokenizer={tok_path}", "validation.every=0"])
    model = LLaDAModel(preset("tiny"), init_seed=0, loss_chunk_tokens=40)
    head_input = []

    def keep_head_input(module, inputs, output):
        output.retain_grad()
        head_input.append(output)
    model.model.transformer.ln_f.register_forward_hook(keep_head_input)
    loss = objective_for(cfg).micro_batch_loss(model, batch, tok.mask_id, step=7, first_row=0)
    loss.backward()
    grad = head_input[0].grad.abs().sum(-1)

    nb = draw_noise(batch.input_ids, tok.mask_id, cfg.train.seed, 7, 0, batch.prompt_lengths)
    reference = sft_loss(model(nb.noisy).detach(), batch.input_ids, batch.prompt_lengths, nb)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    positions = torch.arange(batch.input_ids.shape[1])[None, :]
    in_prompt = positions < batch.prompt_lengths[:, None]
    lengths = torch.tensor([len(p.prompt) + len(p.response) for p in pairs])
    padding = positions >= lengths[:, None]
    assert padding.any() and nb.masked[padding].any()
    assert torch.equal(grad[in_prompt], torch.zeros_like(grad[in_prompt]))  # exactly zero
    assert (grad[padding & nb.masked] > 0).all()
    assert not nb.masked[in_prompt].any() and torch.equal(nb.noisy[in_prompt], batch.input_ids[in_prompt])
    # control: the pretraining noise (no prompt lengths) masks prompt tokens, and they get gradient
    head_input.clear()
    pretraining = MaskedDiffusion(cfg.train.seed)
    pretraining.micro_batch_loss(model, batch.input_ids, tok.mask_id, step=7, first_row=0).backward()
    unprotected = draw_noise(batch.input_ids, tok.mask_id, cfg.train.seed, 7, 0)
    assert unprotected.masked[in_prompt].any()
    assert (head_input[0].grad.abs().sum(-1)[in_prompt & unprotected.masked] > 0).all()


def sft_command(ranks: int, root: Path, out: Path, *args: str) -> list[str]:
    train = ["-m", "pretrain.train", "--config", str(REPO / "recipes" / "tiny_sft.yaml"),
             "data.paths=[train.jsonl]", f"data.tokenizer={root / 'tokenizer.json'}", "validation.elbo_every=0",
             "train.epochs=0", "schedule.total_steps=8", "train.micro_batch_size=8", "model.n_layers=2",
             "logging.every=1", "logging.progress_bar=false", "checkpoint.every=4", "checkpoint.keep_last=0",
             f"train.out_dir={out}", *args]
    if ranks == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *train]


def losses(out: Path, since_resume: bool = False) -> dict[int, float]:
    rows = records(out)
    marks = [i for i, r in enumerate(rows) if "resumed_from" in r]
    start = marks[-1] + 1 if since_resume and marks else 0
    return {r["step"]: r["loss"] for r in rows[start:] if "loss" in r}


def test_sft_on_two_ranks_follows_one_process_and_resumes_bit_for_bit(tmp_path, subprocess_env):
    """Global batches of 16 pairs: 2 ranks x 8 against 1 process x 8 x 2 accumulated (the same
    pairs, padding and noise per row); then 4 steps + `--resume auto` to 8 against the
    uninterrupted 2-rank run, bit for bit (the SFT data position is restored with the rest), and
    the step-4 checkpoint continued by one process within float tolerance (elastic resume)."""
    write_conversations(tmp_path)
    train_bpe(sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py")), 1024, tmp_path / "tokenizer.json")

    def run(ranks: int, out: str, *args: str) -> Path:
        proc = subprocess.run(sft_command(ranks, tmp_path, tmp_path / out, *args), cwd=tmp_path,
                              env=subprocess_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return tmp_path / out

    whole = losses(run(2, "two_ranks", "train.steps=8", "train.global_batch_size=16"))
    single = losses(run(1, "one_rank", "train.steps=8", "train.global_batch_size=16"))
    assert sorted(whole) == list(range(1, 9))
    assert all(single[s] == pytest.approx(whole[s], rel=1e-5) for s in whole)
    assert whole[8] < whole[1]
    other_seed = losses(run(1, "other_seed", "train.steps=2", "train.global_batch_size=16", "train.seed=5"))
    assert other_seed[1] != pytest.approx(whole[1], rel=1e-3)  # control: other pairs and noise

    run(2, "resumed", "train.steps=4", "train.global_batch_size=16")
    resumed = losses(run(2, "resumed", "train.steps=8", "train.global_batch_size=16", "--resume", "auto"),
                     since_resume=True)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert resumed == {s: whole[s] for s in resumed}  # bit for bit
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step_00000008" / "data_state.json").read_text())
    assert state["saved_layout"] == {"dp_size": 2, "batch_size": 8, "grad_accum": 1}
    # elastic: the 2-rank step-4 checkpoint continued by one process (8 x 2 accumulated)
    shutil.copytree(tmp_path / "resumed" / "checkpoints" / "step_00000004",
                    tmp_path / "elastic" / "checkpoints" / "step_00000004")
    elastic = losses(run(1, "elastic", "train.steps=8", "train.global_batch_size=16", "--resume", "auto"),
                     since_resume=True)
    assert sorted(elastic) == [5, 6, 7, 8]
    assert all(elastic[s] == pytest.approx(whole[s], rel=1e-5) for s in elastic)


def test_export_if_finished_skips_an_unfinished_run(sft_run, subprocess_env, tmp_path):
    step_200 = sft_run["out"] / "checkpoints" / "step_00000200"
    proc = subprocess.run([sys.executable, "-m", "pretrain.export_hf", "--checkpoint", str(step_200),
                           "--out", str(tmp_path / "hf"), "--if-finished"],
                          capture_output=True, text=True, env=subprocess_env, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "step 200 of 496" in proc.stdout and not (tmp_path / "hf").exists()

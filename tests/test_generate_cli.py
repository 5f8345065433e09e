"""`python -m pretrain.generate` and `python -m pretrain.chat` on real checkpoints.

- The same answers (ids, reveal steps) from a training checkpoint and from its export in the
  released format, from 2 ranks under ZeRO-3 (the model partitioned, prompts split over
  ranks with a dummy, batches that finish at different steps on different ranks: the early
  stop is agreed, nobody hangs) and from 2 tensor-parallel ranks as from one process.
- Prompt sources (--prompt, --prompts-file, .jsonl, --prompt-ids, --chat) and their errors.
- chat keeps earlier turns, renders them through the chat template, and strips EOS/EoT
  between turns.
- Fast decoding flags: `--threshold`, `--cache`, `--cache-refresh-every` give what the sampler
  gives with those settings (threshold decoding with fewer forwards; the block-start cache other
  tokens than exact decoding; a cache refreshed every step exact decoding's tokens, also with
  `--fuse-projections`), and 4 ranks (tensor parallel 2 x data parallel 2 under ZeRO-3, fused
  projections: per-rank heads in the cache, batches whose blocks end at different steps) give
  the single process's answers. `--denoising-html` /
  `--denoising-png` draw the first prompt's answer with its reveal steps.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.ports import free_port
from support.tiny_checkpoints import eos_ending_checkpoint

from data_pipeline.tokenizer import load_tokenizer
from pretrain import chat
from pretrain import generate as generate_cli
from pretrain.checkpoint.hf_export import export
from pretrain.diffusion.sampling import SamplerConfig, generate
from pretrain.inference.denoising_view import DenoisingView, to_html
from pretrain.inference.loading import load_model

PROMPTS = ["def load(s):", "import json", "class Decoder:", "return value", "x = 1"]
SAMPLER = ["--steps", "16", "--gen-length", "16", "--block-length", "8", "--batch-size", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return eos_ending_checkpoint(root)


def run_generate(args: list[str], env: dict, launcher: list[str] | None = None) -> list[dict]:
    command = (launcher or [sys.executable]) + ["-m", "pretrain.generate", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_checkpoint_export_and_two_zero3_ranks_give_the_same_answers(checkpoint, subprocess_env, tmp_path):
    args = ["--prompts-file", str(checkpoint.parent / "prompts.txt"), *SAMPLER, "--json", "--reveal-steps"]
    single = run_generate(["--model", str(checkpoint), *args], subprocess_env)
    assert [r["prompt_ids"] for r in single] == [load_tokenizer(checkpoint / "tokenizer.json").encode(p)
                                                 for p in PROMPTS]
    # premise: answers end at different steps, and one never ends early (all 16 steps)
    steps = [r["steps_run"] for r in single]
    assert len(set(steps)) >= 3 and 16 in steps and min(steps) < 8, steps
    # rank 0 gets prompts 0, 2, 4 and rank 1 gets 1, 3 and a dummy: their batches end apart
    assert steps[0] != steps[1] and steps[4] != steps[0]

    export(checkpoint, tmp_path / "hf", dtype=torch.float32, log=lambda *a: None)
    assert run_generate(["--model", str(tmp_path / "hf"), *args], subprocess_env) == single

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())]
    two = run_generate(["--model", str(checkpoint), "--zero-stage", "3", *args], subprocess_env, launcher)
    without_steps = lambda records: [{k: v for k, v in r.items() if k != "steps_run"} for r in records]
    assert without_steps(two) == without_steps(single)
    # a batch runs until the other rank's batch is final too: the stop is agreed
    # (batches in lockstep: prompts 0 | 1, 2 | 3, 4 | the dummy, a copy of prompt 0)
    paired = [max(steps[0], steps[1])] * 2 + [max(steps[2], steps[3])] * 2 + [max(steps[4], steps[0])]
    assert [r["steps_run"] for r in two] == paired

    # TP=2: both ranks hold every prompt (one data-parallel replica), results gathered once
    tp = run_generate(["--model", str(checkpoint), "--tensor-parallel", "2", "--zero-stage", "0", *args],
                      subprocess_env, launcher[:-1] + [str(free_port())])
    assert tp == single


def test_prompt_sources_and_their_errors(checkpoint, capsys):
    tok = load_tokenizer(checkpoint / "tokenizer.json")
    jsonl = checkpoint.parent / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "import json"}) + "\n")
    assert generate_cli.main(["--model", str(checkpoint), "--prompt", "def load(s):", "--prompts-file",
                              str(jsonl), "--prompt-ids", "5,6,7", "--chat", *SAMPLER, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    bos, start, end, eot = (tok.special_ids[k] for k in ("bos", "start_header", "end_header", "eot"))
    assert [r["prompt_ids"][0] for r in records[:2]] == [bos, bos]  # --chat wraps text prompts
    assert records[0]["prompt_ids"][1] == start and eot in records[0]["prompt_ids"]
    assert records[2]["prompt_ids"] == [5, 6, 7]  # ids are taken as they are
    jsonl.write_text('{"text": "no prompt field"}\n')
    assert generate_cli.main(["--model", str(checkpoint), "--prompts-file", str(jsonl)]) == 2
    assert "prompts.jsonl:1: expected an object with a string field 'prompt'" in capsys.readouterr().err
    assert generate_cli.main(["--model", str(checkpoint), "--prompt", "x", "--gen-length", "16",
                              "--block-length", "5"]) == 2
    assert capsys.readouterr().err == "generate error: block_length 5 must divide gen_length 16\n"


def test_chat_keeps_the_dialogue_and_strips_eos_between_turns(checkpoint, monkeypatch, capsys):
    tok = load_tokenizer(checkpoint / "tokenizer.json")
    prompts = []
    real_generate = chat.generate

    def recording(model, prompt, **kwargs):
        prompts.append(prompt[0].tolist())
        return real_generate(model, prompt, **kwargs)

    monkeypatch.setattr(chat, "generate", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nand again\n/reset\nfresh start\n"))
    assert chat.main(["--model", str(checkpoint), "--system", "Be brief.", "--steps", "8",
                      "--gen-length", "8", "--block-length", "8"]) == 0
    replies = [line for line in capsys.readouterr().out.splitlines() if line.startswith("llada> ")]
    assert len(replies) == 3 and len(prompts) == 3
    first, second, after_reset = prompts
    assert second[:len(first)] == first  # the second turn extends the first dialogue
    eot = tok.special_ids["eot"]
    assert second.count(eot) == first.count(eot) + 2  # the first answer and the second question
    assert tok.eos_id not in second  # no EOS inside the dialogue
    assert after_reset.count(eot) == first.count(eot) == 2  # back to the system message and one question


def test_fast_decoding_flags_and_denoising_pictures(checkpoint, capsys, tmp_path):
    prompts = ["x = 1", "class Decoder:"]
    base = ["--model", str(checkpoint), "--prompt", prompts[0], "--prompt", prompts[1], "--steps", "16",
            "--gen-length", "16", "--block-length", "8", "--batch-size", "1", "--no-stop-at-eos", "--json",
            "--reveal-steps"]

    def answers(*flags):
        assert generate_cli.main(base + list(flags)) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    exact = answers()
    assert answers("--cache", "dual", "--cache-refresh-every", "1") == exact
    assert answers("--fuse-projections", "--cache", "dual", "--cache-refresh-every", "1") == exact
    fast = answers("--threshold", "0.05", "--cache", "prefix", "--denoising-html", str(tmp_path / "d.html"),
                   "--denoising-png", str(tmp_path / "d.png"))
    assert fast[1]["steps_run"] < exact[1]["steps_run"] == 16  # several tokens per step
    model = load_model(checkpoint)
    tok = model.tokenizer
    config = SamplerConfig(steps=16, gen_length=16, block_length=8, stop_at_eos=False, cache="dual")
    direct = generate(model, torch.tensor([tok.encode(prompts[0])]), mask_id=tok.mask_id, eos_id=tok.eos_id,
                      eot_id=tok.special_ids["eot"], config=config)
    assert answers("--cache", "dual")[0]["ids"] == direct.answers(tok.eos_id)[0] != exact[0]["ids"]
    page = (tmp_path / "d.html").read_text(encoding="utf-8")
    view = DenoisingView.of(tok, tok.encode(prompts[0]), fast[0]["ids"], fast[0]["reveal_steps"], 16)
    assert page == to_html(view) and len(view.pieces) > 0  # prompt 0's answer, its reveal steps
    assert f'title="step {fast[0]["reveal_steps"][0]}"' in page and "x = 1" in page
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert generate_cli.main(base + ["--cache-refresh-every", "2"]) == 2
    assert "cache_refresh_every needs a cache" in capsys.readouterr().err


def test_fast_decoding_on_tensor_and_zero3_data_parallel_ranks(checkpoint, subprocess_env):
    args = ["--model", str(checkpoint), "--prompts-file", str(checkpoint.parent / "prompts.txt"), *SAMPLER,
            "--threshold", "0.05", "--cache", "dual", "--json", "--reveal-steps"]
    single = run_generate(args, subprocess_env)
    steps = [r["steps_run"] for r in single]
    assert len(set(steps)) >= 3, steps  # premise: batches (and their blocks) end at different steps
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())]
    four = run_generate(args + ["--tensor-parallel", "2", "--zero-stage", "3", "--fuse-projections"],
                        subprocess_env, launcher)
    without_steps = lambda records: [{k: v for k, v in r.items() if k != "steps_run"} for r in records]  # noqa: E731
    assert without_steps(four) == without_steps(single)

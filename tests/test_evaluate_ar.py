"""The AR baseline (a causal checkpoint) scored by `python -m pretrain.evaluate` on the diffusion model's
task files: exact log-likelihoods and greedy decoding (`pretrain.evaluation.autoregressive`).

A random tiny causal model, its LM-head rows of EOS and EoT set to scaled copies of tokens it often
predicts, so greedy answers end at different steps (or run the whole gen_length):
- `causal_log_likelihood` equals the log-softmax summed by hand over a full forward and over one
  forward per prefix; reading the logits one position late (token i from position i) gives another value.
- `greedy_answers` equals a literal argmax loop, cut at EOS (and EoT when asked), with its records.
- `pretrain.evaluate.main` on the checkpoint: choice scores and generated outputs are those above,
  one forward per choice and gen_length per prompt; settings the baseline cannot honour (temperature,
  guidance) and an empty context are one-line usage errors naming the task or the data line.
"""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from support.tiny_checkpoints import TINY, stdlib_tokenizer, write_checkpoint

from parallel.model import LLaDAModel
from pretrain import evaluate
from pretrain.evaluation.autoregressive import causal_log_likelihood, greedy_answers
from pretrain.inference.loading import load_model

CAUSAL = dataclasses.replace(TINY, causal=True)
PROMPTS = ["def dumps(obj):", "import json", "return value", "class JSONDecoder", "if x is None:",
           "for key in items"]
GEN_LENGTH = 8
# Tokens this model (init_seed 3) often predicts; EOS and EoT copy their head rows (x 1.05).
EOS_LIKE, EOT_LIKE = 115, 123


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate_ar")
    tok = stdlib_tokenizer(root / "tokenizer.json")
    weights = {n: p.detach().clone() for n, p in LLaDAModel(CAUSAL, init_seed=3).named_parameters()}
    head = weights["model.transformer.ff_out.weight"]
    head[tok.eos_id] = head[EOS_LIKE] * 1.05
    head[tok.special_ids["eot"]] = head[EOT_LIKE] * 1.05
    ckpt = write_checkpoint(root / "ckpt", weights, CAUSAL, root / "tokenizer.json")
    yield {"ckpt": ckpt, "tok": tok, "model": load_model(ckpt, dtype="fp32")}
    torch.set_num_threads(threads)


def literal_greedy(model, prompt: list[int], stops: list[int]) -> list[int]:
    ids, answer = list(prompt), []
    for _ in range(GEN_LENGTH):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(token)
        answer.append(token)
    for stop in stops:
        answer = answer[:answer.index(stop)] if stop in answer else answer
    return answer


def test_log_likelihood_is_the_next_token_sum(causal):
    model, tok = causal["model"], causal["tok"]
    prompt, answer = tok.encode("def dumps(obj):"), tok.encode(" return json.dumps(obj)")
    score = causal_log_likelihood(model, torch.tensor(prompt), torch.tensor(answer))
    logits = model(torch.tensor([prompt + answer]))[0].float()
    by_hand, off_by_one, by_prefix = 0.0, 0.0, 0.0
    for j, token in enumerate(answer):
        position = len(prompt) + j
        by_hand += torch.log_softmax(logits[position - 1], dim=-1)[token].item()
        off_by_one += torch.log_softmax(logits[position], dim=-1)[token].item()
        prefix_logits = model(torch.tensor([prompt + answer[:j]]))[0, -1].float()
        by_prefix += torch.log_softmax(prefix_logits, dim=-1)[token].item()
    assert score == pytest.approx(by_hand, abs=1e-4)
    assert score == pytest.approx(by_prefix, abs=1e-3)  # causal: a position sees only its prefix
    assert abs(score - off_by_one) > 0.1, (score, off_by_one)
    with pytest.raises(ValueError, match="prompt is empty"):
        causal_log_likelihood(model, torch.tensor([], dtype=torch.long), torch.tensor(answer))


@pytest.mark.parametrize("cut_at_eot", [False, True], ids=["eos", "eos_and_eot"])
def test_greedy_answers_are_the_argmax_loop(causal, cut_at_eot):
    model, tok = causal["model"], causal["tok"]
    prompts = [tok.encode(p) for p in PROMPTS]
    stops = [tok.eos_id, tok.special_ids["eot"]] if cut_at_eot else [tok.eos_id]
    expected = [literal_greedy(model, p, stops) for p in prompts]
    lengths = [len(answer) for answer in expected]
    assert min(lengths) < GEN_LENGTH and max(lengths) == GEN_LENGTH, lengths  # some cut, some not
    answers = greedy_answers(model, prompts, gen_length=GEN_LENGTH, cut_at_eot=cut_at_eot)
    assert [a["ids"] for a in answers] == expected
    assert [a["reveal_steps"] for a in answers] == [list(range(1, n + 1)) for n in lengths]
    assert {a["steps_run"] for a in answers} == {GEN_LENGTH}


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_evaluate_scores_the_causal_checkpoint(causal, tmp_path, capsys):
    model, tok = causal["model"], causal["tok"]
    mc_rows = [{"context": "def dumps(obj):", "choices": [" return obj", " import json", " pass"], "answer": 0},
               {"context": "import ", "choices": ["json", "sys"], "answer": 1}]
    write(tmp_path / "mc.jsonl", mc_rows)
    write(tmp_path / "gen.jsonl", [{"prompt": p, "answer": "x"} for p in PROMPTS[:3]])
    tasks = [{"name": "mc", "type": "multiple_choice", "path": "mc.jsonl", "mc_num": 4, "batch_size": 2},
             {"name": "gen", "type": "generation", "path": "gen.jsonl", "gen_length": GEN_LENGTH, "steps": 4,
              "block_length": 4}]
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(tasks))
    args = ["--model", str(causal["ckpt"]), "--tasks", str(tmp_path / "tasks.yaml")]
    assert evaluate.main([*args, "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())["tasks"]
    mc, gen = report["mc"], report["gen"]
    assert set(mc["metrics"]) == {"acc", "acc_norm"} and set(gen["metrics"]) == {"exact_match"}
    assert mc["forwards_per_rank"] == [5]  # one forward per choice; mc_num and batch_size unused
    assert gen["forwards_per_rank"] == [3 * GEN_LENGTH]  # steps and block_length unused
    for record, row in zip(mc["examples"], mc_rows, strict=True):
        context = row["context"].rstrip()
        exact = [causal_log_likelihood(model, torch.tensor(tok.encode(context)),
                                       torch.tensor(tok.encode(context + row["context"][len(context):] + choice)
                                                    [len(tok.encode(context)):]))
                 for choice in row["choices"]]
        assert record["scores"] == pytest.approx(exact, abs=1e-5)
        assert record["prediction"] == max(range(len(exact)), key=exact.__getitem__)
    outputs = [tok.decode(literal_greedy(model, tok.encode(p), [tok.eos_id]), skip_special_tokens=True)
               for p in PROMPTS[:3]]
    assert [r["output"] for r in gen["examples"]] == outputs
    assert {r["steps_run"] for r in gen["examples"]} == {GEN_LENGTH}
    assert "acc_norm" in capsys.readouterr().out


@pytest.mark.parametrize("task, message", [
    ({"name": "sampled", "type": "generation", "path": "gen.jsonl", "temperature": 1.0},
     r"task 'sampled': temperature 1.0 on a causal model: the AR baseline is .*decoded greedily"),
    ({"name": "guided", "type": "multiple_choice", "path": "mc.jsonl", "cfg_scale": 0.5},
     r"task 'guided': cfg_scale 0.5 on a causal model"),
    ({"name": "no_context", "type": "multiple_choice", "path": "empty.jsonl"},
     r"empty.jsonl:1: the context encodes to no tokens"),
], ids=["temperature", "cfg_scale", "empty_context"])
def test_settings_the_baseline_cannot_honour_are_usage_errors(causal, tmp_path, capsys, task, message):
    write(tmp_path / "gen.jsonl", [{"prompt": "import json", "answer": "x"}])
    write(tmp_path / "mc.jsonl", [{"context": "import", "choices": [" json"], "answer": 0}])
    write(tmp_path / "empty.jsonl", [{"context": "", "choices": ["json"], "answer": 0}])
    # a task the baseline can score comes first: settings are refused before any task runs (the
    # empty context is found when its task is scored, as the diffusion model's empty choice is)
    first = {"name": "fine", "type": "multiple_choice", "path": "mc.jsonl", "mc_num": 1}
    tasks = [task] if task["name"] == "no_context" else [first, task]
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(tasks))
    assert evaluate.main(["--model", str(causal["ckpt"]), "--tasks", str(tmp_path / "tasks.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("evaluate error: ") and captured.err.count("\n") == 1, captured.err
    assert re.search(message, captured.err) and captured.out == "", captured

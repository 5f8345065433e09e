"""`llada_stack` in lm-eval (pretrain/lm_eval_adapter.py) on a tiny checkpoint, offline.

- loglikelihood is Algorithm 3 on the official context/continuation split with a generator keyed
  by the request; check_greedy matches the sampler's one-token-per-step greedy answer.
- generate_until is the sampler on left-padded batches, capped by max_gen_toks in whole blocks and
  cut at the request's stop strings; loglikelihood_rolling refuses with a message.
- End to end on local task YAMLs (tests/support/lm_eval_tasks): simple_evaluate in this process, and
  lm-eval's CLI (`python -m pretrain.lm_eval_adapter`) on 2 ZeRO-3 ranks, which get different
  numbers of requests and forwards (nothing hangs) and give the same per-document results.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from support.ports import free_port
from support.tiny_checkpoints import eos_ending_checkpoint

from data_pipeline.seeding import keyed_generator
from pretrain.diffusion.likelihood import conditional_log_likelihood
from pretrain.diffusion.sampling import SamplerConfig, generate
from pretrain.evaluation.lm_eval_model import LLaDAStackLM
from pretrain.evaluation.tasks import encode_pair

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "support" / "lm_eval_tasks"
LIKELIHOOD = {"mc_num": 4, "mc_batch_size": 2, "check_greedy": True}
SAMPLER = {"steps": 16, "gen_length": 32, "block_length": 8}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return eos_ending_checkpoint(tmp_path_factory.mktemp("lm_eval"))


@pytest.fixture
def offline(tmp_path, monkeypatch, subprocess_env) -> dict[str, str]:
    """No download, no global cache: an empty HF_HOME for this process and its subprocesses."""
    import datasets.config

    env = {"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(env["HF_DATASETS_CACHE"]))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data relative to the repository root
    return {**subprocess_env, **env}


def request(kind: str, args: tuple, doc_id: int, idx: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx, metadata=("toy", doc_id, 1))


def test_loglikelihood_is_algorithm_3_on_the_official_split(checkpoint):
    lm = LLaDAStackLM(model=str(checkpoint), seed=3, **LIKELIHOOD)
    tok = lm.tok
    context, answer = encode_pair(tok, "def load(s): ", "return s")
    assert context == tok.encode("def load(s):")  # the trailing space moved to the continuation
    assert answer == tok.encode("def load(s): return s")[len(context):]
    scores = lm.loglikelihood([request("loglikelihood", ("def load(s): ", "return s"), 7, 1),
                               request("loglikelihood", ("x", ""), 8)])
    expected = conditional_log_likelihood(lm.model, torch.tensor(context), torch.tensor(answer),
                                          mask_id=tok.mask_id, mc_num=4, batch_size=2,
                                          generator=keyed_generator(3, "lm_eval", "toy", 7, 1))
    assert scores[0][0] == pytest.approx(expected, rel=1e-6) and scores[1] == (0.0, True)

    # is_greedy: the answer the sampler reveals one most-confident token per step
    prompt = tok.encode("import json")
    greedy = generate(lm.model, torch.tensor([prompt]), mask_id=tok.mask_id, eos_id=tok.eos_id,
                      eot_id=tok.special_ids["eot"],
                      config=SamplerConfig(steps=3, gen_length=3, block_length=3, stop_at_eos=False))
    greedy_ids = greedy.ids[0, len(prompt):].tolist()
    text = tok.decode(greedy_ids)
    assert encode_pair(tok, "import json", text)[1] == greedy_ids  # premise: the text round-trips
    other = tok.decode(greedy_ids[:2] + [tok.encode(" x")[0]])
    flags = [g for _, g in lm.loglikelihood([request("loglikelihood", ("import json", t), 0) for t in (text, other)])]
    assert flags == [True, False]


def test_generate_until_is_the_sampler_capped_and_cut(checkpoint):
    lm = LLaDAStackLM(model=str(checkpoint), batch_size=2, logits_eos_inf=True, **SAMPLER)
    tok = lm.tok
    prompts = ["x = 1", "import json", "class Decoder:"]

    def alone(prompt: str, gen_length: int) -> list[int]:
        config = SamplerConfig(steps=gen_length // 2, gen_length=gen_length, block_length=8,
                               logits_eos_inf=True)
        sample = generate(lm.model, torch.tensor([tok.encode(prompt)]), mask_id=tok.mask_id,
                          eos_id=tok.eos_id, eot_id=tok.special_ids["eot"], config=config)
        return sample.answers(tok.eos_id)[0]

    raw = [tok.decode(alone(p, 16), skip_special_tokens=True) for p in prompts]
    stop = raw[0][len(raw[0]) // 2:][:2]
    assert stop.strip(), raw  # premise: a stop string inside the first answer
    out = lm.generate_until([request("generate_until", (prompts[0], {"until": [stop], "max_gen_toks": 16}), 0),
                             request("generate_until", (prompts[1], {"until": "\n\n\n\n", "max_gen_toks": 10}), 1),
                             request("generate_until", (prompts[2], {"until": []}), 2)])
    assert out[0] == raw[0].split(stop)[0] and len(out[0]) < len(raw[0])
    assert out[1] == tok.decode(alone(prompts[1], 16)[:10], skip_special_tokens=True).split("\n\n\n\n")[0]
    assert out[2] == tok.decode(alone(prompts[2], 32), skip_special_tokens=True)  # no cap: gen_length

    with pytest.raises(NotImplementedError, match="no left-to-right factorisation"):
        lm.loglikelihood_rolling([request("loglikelihood_rolling", ("text",), 0)])
    with pytest.raises(ValueError, match="block_length 5 must divide gen_length 32"):
        LLaDAStackLM(model=str(checkpoint), gen_length=32, block_length=5)
    with pytest.raises(ValueError, match="unknown model_args max_length"):
        LLaDAStackLM(model=str(checkpoint), max_length=64)


def per_document(samples: list[dict]) -> dict[int, list]:
    """doc id -> its filtered responses: texts, or (log-likelihood, is_greedy) pairs, which the
    samples file writes as strings."""
    return {s["doc_id"]: [r if isinstance(r, str) else (float(r[0]), str(r[1])) for r in s["filtered_resps"]]
            for s in samples}


def metrics(results: dict) -> dict[str, float]:
    return {f"{task}/{key}": value for task, entries in results["results"].items()
            for key, value in entries.items() if "," in key}


def test_tasks_end_to_end_on_one_and_two_zero3_ranks(checkpoint, offline, tmp_path):
    """Two generation tasks with different max_gen_toks: lm-eval pads a short rank with copies of
    its last request (of the last task), so ranks hold different numbers of batches of each
    sampler shape and run dummy batches; likelihood ranks run dummy forwards."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = ["llada_toy_mc", "llada_toy_gen", "llada_toy_gen_short"]
    args = {"model": str(checkpoint), **LIKELIHOOD, **SAMPLER}
    single = lm_eval.simple_evaluate(model="llada_stack", model_args=args, batch_size=2, tasks=tasks,
                                     log_samples=True,
                                     task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    assert {"llada_toy_mc/acc,none", "llada_toy_mc/acc_stderr,none", "llada_toy_gen/exact_match,none",
            "llada_toy_gen_short/exact_match,none"} <= set(metrics(single))
    generated = [s["filtered_resps"][0] for s in single["samples"]["llada_toy_gen"]]
    assert len(generated) == 5 and len(set(generated)) >= 3, generated
    assert not (tmp_path / "hf" / "hub").exists()  # nothing fetched from the Hub

    model_args = ",".join(f"{k}={v}" for k, v in {**args, "zero_stage": 3}.items())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "pretrain.lm_eval_adapter",
               "--model", "llada_stack", "--model_args", model_args, "--tasks", ",".join(tasks),
               "--include_path", "tests/support/lm_eval_tasks", "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=offline, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    assert metrics(json.loads(results_file.read_text())) == pytest.approx(metrics(single))
    for task in tasks:
        samples_file = results_file.with_name(f"samples_{task}_{results_file.stem.removeprefix('results_')}.jsonl")
        samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
        assert per_document(samples) == per_document(single["samples"][task])

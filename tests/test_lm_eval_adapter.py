"""`llada_stack` in lm-eval (pretrain/lm_eval_adapter.py) on a tiny checkpoint, offline.

- loglikelihood is Algorithm 3 on the official context/continuation split with a generator keyed
  by the request; check_greedy matches the sampler's one-token-per-step greedy answer.
- generate_until is the official eval_llada.py's: the sampler on a canvas of gen_length masks
  whatever max_gen_toks says, its whole canvas decoded with special tokens, cut at the stop
  strings, then stripped of special tokens (tests/support/official_eval_postprocess.py, through
  the Hugging Face tokenizer); text goes in as the official `tokenizer(text)` gives it, BOS
  included when the tokenizer.json's post-processor adds one. The stack's options
  (`cut_at_eos_eot`, `shrink_to_max_gen_toks`) give the old cut and capped canvas;
  loglikelihood_rolling refuses with a message.
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
from support.official_eval_postprocess import harness_ids, harness_tokenizer, official_answer
from support.ports import free_port
from support.tiny_checkpoints import eos_ending_checkpoint
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from data_pipeline.seeding import keyed_generator
from data_pipeline.sft import ChatTemplate
from data_pipeline.tokenizer import load_tokenizer
from pretrain.checkpoint.hf_export import CHAT_TEMPLATE
from pretrain.diffusion.likelihood import conditional_log_likelihood
from pretrain.diffusion.sampling import SamplerConfig, generate, strip_at_eos
from pretrain.evaluation.lm_eval_model import LLaDAStackLM, answer_text, harness_encode
from pretrain.evaluation.tasks import cut_at_stops, encode_pair

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
    context, answer = encode_pair(tok.encode, "def load(s): ", "return s")
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
    assert encode_pair(tok.encode, "import json", text)[1] == greedy_ids  # premise: the text round-trips
    other = tok.decode(greedy_ids[:2] + [tok.encode(" x")[0]])
    flags = [g for _, g in lm.loglikelihood([request("loglikelihood", ("import json", t), 0) for t in (text, other)])]
    assert flags == [True, False]


def old_answer(tok, canvas: list[int], gen_kwargs: dict) -> str:
    """The adapter's former post-processing: ids cut at EOS, then EoT, then at max_gen_toks,
    decoded without special tokens, cut at the earliest stop string."""
    ids = strip_at_eos(strip_at_eos(canvas, tok.eos_id), tok.special_ids["eot"])
    ids = ids[:gen_kwargs.get("max_gen_toks", len(ids))]
    until = gen_kwargs.get("until") or []
    return cut_at_stops(tok.decode(ids, skip_special_tokens=True), [until] if isinstance(until, str) else until)


def test_answer_text_is_the_official_post_processing(checkpoint):
    tok = load_tokenizer(checkpoint / "tokenizer.json")
    hf = harness_tokenizer(checkpoint / "tokenizer.json")
    eos, eot, header = tok.eos_id, tok.special_ids["eot"], tok.special_ids["start_header"]
    enc = tok.encode
    cases = [  # (canvas, gen_kwargs)
        (enc("x = 1") + [eos] + enc("\ny = 2") + [eos, eos], {"until": ["\n\n"], "max_gen_toks": 2}),
        (enc("x = 1") + [eot] + enc(" if y:\n  z") + [header] + enc("w"), {"until": ["\n"]}),
        (enc("abXcd efg"), {"until": ["Xc", "bX"]}),  # the stop strings cut in turn
        (enc("return s;\nQuestion: y") + [eos], {"until": "Question:", "max_gen_toks": 3}),
        ([eos, eos] + enc("tail"), {"until": []}),
        (enc("def f():"), {}),
    ]
    for canvas, kwargs in cases:
        until = kwargs.get("until") or []
        expected = official_answer(hf, canvas, [until] if isinstance(until, str) else until)
        assert answer_text(tok, canvas, kwargs) == expected, (canvas, kwargs)
    # controls: the former post-processing loses what follows an EOS / EoT, caps at
    # max_gen_toks and cuts at the earliest of the stop strings; the options give it back
    official = [answer_text(tok, canvas, kwargs) for canvas, kwargs in cases]
    old = [old_answer(tok, canvas, kwargs) for canvas, kwargs in cases]
    assert official[0] == "x = 1\ny = 2" and old[0] == "x ="
    assert official[1] == "x = 1 if y:" and old[1] == "x = 1"
    assert official[2] == "ab" and old[2] == "a"
    assert official[4] == "tail" and old[4] == ""
    options = [answer_text(tok, canvas, kwargs, cut_at_eos_eot=True, cap_at_max_gen_toks=True)
               for canvas, kwargs in cases]
    assert [o for i, o in enumerate(options) if i != 2] == [o for i, o in enumerate(old) if i != 2]


def test_text_goes_in_as_the_official_tokenizer_call_gives_it(checkpoint, tmp_path):
    """With the tokenizers this stack trains (no post-processor) a prompt has no BOS; a
    tokenizer.json whose post-processor adds one gets it, as `tokenizer(text)` does."""
    tok = load_tokenizer(checkpoint / "tokenizer.json")
    with_bos = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    with_bos.post_processor = TemplateProcessing(single="<|startoftext|> $A", pair="<|startoftext|> $A $B",
                                                 special_tokens=[("<|startoftext|>", tok.bos_id)])
    with_bos.save(str(tmp_path / "tokenizer.json"))
    bos_tok = load_tokenizer(tmp_path / "tokenizer.json")
    text = "import json<|endoftext|>x"
    for info, path in ((tok, checkpoint / "tokenizer.json"), (bos_tok, tmp_path / "tokenizer.json")):
        assert harness_encode(info, text) == harness_ids(harness_tokenizer(path), text)
    assert harness_encode(tok, text) == tok.encode(text) and tok.bos_id not in harness_encode(tok, text)
    assert harness_encode(bos_tok, text) == [tok.bos_id, *tok.encode(text)]
    canvas = tok.encode("x = 1") + [tok.eos_id] + tok.encode(" y")
    assert answer_text(bos_tok, canvas, {}) == official_answer(harness_tokenizer(tmp_path / "tokenizer.json"),
                                                               canvas, []) == "x = 1 y"


def test_apply_chat_template_is_the_released_chat_format(checkpoint):
    """lm-eval's --apply_chat_template: the text Hugging Face renders from the exported template,
    which encodes to the ids the SFT data and `pretrain.chat` give the dialogue."""
    lm = LLaDAStackLM(model=str(checkpoint))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"), bos_token="<|startoftext|>",
                                 chat_template=CHAT_TEMPLATE)
    dialogue = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 2+2? "},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    for add in (True, False):
        assert lm.apply_chat_template(dialogue, add) == hf.apply_chat_template(dialogue, tokenize=False,
                                                                               add_generation_prompt=add)
    assert harness_encode(lm.tok, lm.apply_chat_template(dialogue)) == ChatTemplate(lm.tok).prompt(dialogue)
    assert lm.tokenizer_name.startswith("llada_stack-")


def record_canvas_lengths(lm: LLaDAStackLM) -> list[int]:
    """The sequence lengths the adapter's sampler forwards, recorded by a logits callable."""
    lengths, logits = [], lm._logits

    def recording(ids, attention_mask=None, **cache):
        lengths.append(ids.shape[1])
        return logits(ids, attention_mask=attention_mask, **cache)

    lm._logits = recording
    return lengths


def test_generate_until_is_the_official_canvas_and_answer(checkpoint):
    lm = LLaDAStackLM(model=str(checkpoint), **SAMPLER)
    tok, hf = lm.tok, harness_tokenizer(checkpoint / "tokenizer.json")
    prompts = ["x = 1", "import json", "for i in range(3):"]

    def canvas(prompt: str, gen_length: int, **flags) -> list[int]:
        config = SamplerConfig(steps=gen_length // 2, gen_length=gen_length, block_length=8, **flags)
        sample = generate(lm.model, torch.tensor([harness_ids(hf, prompt)]), mask_id=tok.mask_id,
                          eos_id=tok.eos_id, eot_id=tok.special_ids["eot"], config=config)
        return sample.ids[0, sample.prompt_length:].tolist()

    full = [canvas(p, 32, stop_at_eos=False) for p in prompts]
    eos_inside = full[1]
    assert tok.eos_id in eos_inside and "\n" in tok.decode(eos_inside[eos_inside.index(tok.eos_id):])  # premise
    kwargs = [{"until": ["\n"], "max_gen_toks": 3}, {"until": ["\n"], "max_gen_toks": 10}, {"until": []}]
    lengths = record_canvas_lengths(lm)
    out = lm.generate_until([request("generate_until", (p, k), i) for i, (p, k) in enumerate(zip(prompts, kwargs))])
    assert out == [official_answer(hf, c, k["until"]) for c, k in zip(full, kwargs)]
    assert sorted(set(lengths)) == sorted({len(tok.encode(p)) + 32 for p in prompts})  # gen_length, always
    assert len(lengths) == 3 * 16  # no early stop
    assert out[1] != old_answer(tok, full[1], kwargs[1])  # control: the former cut at EOS

    # the stack's options: the canvas shrinks to whole blocks holding max_gen_toks, the sampler
    # stops once an EOS ends every answer, the answer is cut at EOS / EoT and max_gen_toks
    lm = LLaDAStackLM(model=str(checkpoint), cut_at_eos_eot=True, shrink_to_max_gen_toks=True, **SAMPLER)
    lengths = record_canvas_lengths(lm)
    out = lm.generate_until([request("generate_until", (p, k), i) for i, (p, k) in enumerate(zip(prompts, kwargs))])
    short = [canvas(p, n) for p, n in zip(prompts, (8, 16, 32))]
    assert out == [old_answer(tok, c, k) for c, k in zip(short, kwargs)]
    assert set(lengths) == {len(tok.encode(p)) + n for p, n in zip(prompts, (8, 16, 32))}

    with pytest.raises(ValueError, match="stop_at_eos needs cut_at_eos_eot"):
        LLaDAStackLM(model=str(checkpoint), stop_at_eos=True)
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

"""`python -m pretrain.evaluate` on a tiny model trained here on a synthetic task.

The task: a context of filler words ending in "<key> =" is answered by " <value>;", where each
of 8 keys has a fixed value. A few seconds of SFT-style training (prompt never masked) learn it.
- Multiple choice over 4 values scores far above chance, and a control file whose answers
  point at random choices scores near chance (0.25); generation with a stop string and a regex
  extraction answers exactly.
- 2 ranks under ZeRO-3 (and 2 tensor-parallel ranks), an odd number of examples of unequal
  lengths and choice counts: every example is scored once, the ranks run the same number of
  forwards, and scores (to 1e-5), predictions and generated answers (temperature 0) equal the
  single-process run's.
- Task-file errors name the task / file:line / field; the example recipe validates; stop-string
  cutting, extraction and the context/continuation split on literal strings.
"""

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from support.ports import free_port
from support.tiny_checkpoints import stdlib_tokenizer, write_checkpoint

from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from pretrain import evaluate
from pretrain.diffusion.objectives import sft_loss, sft_noise
from pretrain.evaluation import scoring
from pretrain.evaluation.tasks import (
    cut_at_stops,
    encode_pair,
    extract_answer,
    generation_record,
    load_tasks,
    read_examples,
)

REPO = Path(__file__).resolve().parents[1]
KEYS = ["self", "data", "name", "value", "key", "obj", "items", "text"]
VALUES = ["int", "str", "list", "dict", "None", "True", "False", "float"]
FILLER = ["the", "if", "for", "in", "return", "def", "class", "import"]
TRAIN_STEPS = 160
GENERATION = {"gen_length": 8, "steps": 8, "block_length": 4, "stop": [";"], "extract": "(\\w+)"}


def context(rng: random.Random, key: int) -> str:
    return " ".join([*(rng.choice(FILLER) for _ in range(rng.randrange(5))), KEYS[key], "="])


def train(tok, rng: random.Random) -> LLaDAModel:
    config = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=128, vocab_size=320,
                         max_sequence_length=64)
    model = LLaDAModel(config, init_seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        rows, prompt_lengths = [], []
        for _ in range(32):
            key = rng.randrange(len(KEYS))
            prompt = tok.encode(context(rng, key))
            rows.append(prompt + tok.encode(f" {VALUES[key]};"))
            prompt_lengths.append(len(prompt))
        ids = torch.full((32, max(map(len, rows)) + 2), tok.eos_id)  # EOS padding is trained: the model stops
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        lengths = torch.tensor(prompt_lengths)
        noised = sft_noise(ids, lengths, tok.mask_id, generator=generator)
        loss = sft_loss(model(noised.noisy), ids, lengths, noised)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def choice_rows(rng: random.Random, n: int, choice_counts=(4,)) -> list[dict]:
    rows = []
    for i in range(n):
        key = rng.randrange(len(KEYS))
        count = choice_counts[i % len(choice_counts)]
        options = [key, *rng.sample([k for k in range(len(KEYS)) if k != key], count - 1)]
        rng.shuffle(options)
        text = context(rng, key)
        # half the contexts end in a space: it moves to the front of the continuation
        row_context, sep = (text + " ", "") if i % 2 else (text, " ")
        rows.append({"context": row_context, "choices": [f"{sep}{VALUES[k]};" for k in options],
                     "answer": options.index(key)})
    return rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and much faster on a busy machine (the ranks that
    torchrun starts get OMP_NUM_THREADS=1 too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("evaluate")
    tok = stdlib_tokenizer(root / "tokenizer.json")
    begin = time.perf_counter()
    model = train(tok, random.Random(0))
    seconds = time.perf_counter() - begin
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    ckpt = write_checkpoint(root / "ckpt", weights, model.config, root / "tokenizer.json")
    return {"root": root, "ckpt": ckpt, "tok": tok, "train_seconds": seconds}


def write_tasks(path: Path, tasks: list[dict]) -> Path:
    path.write_text(yaml.safe_dump(tasks))
    return path


def test_trained_model_beats_chance_and_control_does_not(trained, tmp_path, capsys):
    rng = random.Random(7)
    rows = choice_rows(rng, 32)
    control = [{**row, "answer": rng.randrange(len(row["choices"]))} for row in rows]
    prompts = [{"prompt": context(rng, key), "answer": VALUES[key]} for key in range(len(KEYS))]
    tasks = write_tasks(tmp_path / "tasks.yaml", [
        {"name": "mapping", "type": "multiple_choice", "path": "mc.jsonl", "mc_num": 8, "batch_size": 4},
        {"name": "control", "type": "multiple_choice", "path": "control.jsonl", "mc_num": 8, "batch_size": 4},
        {"name": "recall", "type": "generation", "path": "gen.jsonl", "batch_size": 4, **GENERATION}])
    write_jsonl(tmp_path / "mc.jsonl", rows)
    write_jsonl(tmp_path / "control.jsonl", control)
    write_jsonl(tmp_path / "gen.jsonl", prompts)
    begin = time.perf_counter()
    args = ["--model", str(trained["ckpt"]), "--tasks", str(tasks), "--out", str(tmp_path / "r.json")]
    assert evaluate.main(args) == 0
    seconds = time.perf_counter() - begin
    report = json.loads((tmp_path / "r.json").read_text())["tasks"]
    accuracy, chance = report["mapping"]["metrics"]["acc"], report["control"]["metrics"]["acc"]
    exact = report["recall"]["metrics"]["exact_match"]
    with capsys.disabled():
        print(f"\ntraining {trained['train_seconds']:.1f} s ({TRAIN_STEPS} steps); accuracy {accuracy:.3f}, "
              f"control {chance:.3f}, generation exact match {exact:.3f}; evaluation {seconds:.1f} s")
    assert accuracy > 0.7 and abs(chance - 0.25) < 0.2, (accuracy, chance)
    assert [r["prediction"] for r in report["mapping"]["examples"]] == \
        [r["prediction"] for r in report["control"]["examples"]]  # same predictions, other targets
    assert exact > 0.7, report["recall"]["examples"]
    record = report["recall"]["examples"][0]
    assert ";" not in record["output"] and record["prediction"] == record["target"] == VALUES[0]
    assert report["mapping"]["forwards_per_rank"] == [32 * 4 * 2]  # every choice, mc_num / batch_size
    table = capsys.readouterr().out
    assert "mapping" in table and "acc_norm" in table and "exact_match" in table


@pytest.mark.parametrize("layout, dp_size, mc_forwards", [
    (["--zero-stage", "3"], 2, [20, 20]),  # 20 choices, 10 per rank, 2 forwards each (mc_num / batch_size)
    (["--tensor-parallel", "2"], 1, [40, 40]),  # both tensor-parallel ranks score every choice
], ids=["zero3_dp2", "tp2"])
def test_two_ranks_match_one_process(trained, tmp_path, subprocess_env, layout, dp_size, mc_forwards):
    rng = random.Random(11)
    write_jsonl(tmp_path / "mc.jsonl", choice_rows(rng, 7, choice_counts=(2, 4, 3)))
    write_jsonl(tmp_path / "gen.jsonl",
                [{"prompt": context(rng, k), "answer": VALUES[k]} for k in (1, 4, 6, 2, 7)])
    tasks = write_tasks(tmp_path / "tasks.yaml", [
        {"name": "mc", "type": "multiple_choice", "path": "mc.jsonl", "mc_num": 8, "batch_size": 4},
        {"name": "gen", "type": "generation", "path": "gen.jsonl", "batch_size": 2, **GENERATION}])
    args = ["--model", str(trained["ckpt"]), "--tasks", str(tasks)]
    assert evaluate.main([*args, "--out", str(tmp_path / "one.json")]) == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())]
    proc = subprocess.run([*launcher, "-m", "pretrain.evaluate", *args, *layout,
                           "--out", str(tmp_path / "two.json")],
                          capture_output=True, text=True, timeout=240, env=subprocess_env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one = json.loads((tmp_path / "one.json").read_text())["tasks"]
    report = json.loads((tmp_path / "two.json").read_text())
    assert (report["world_size"], report["dp_size"]) == (2, dp_size)
    two = report["tasks"]
    # every example once, in order (gather_in_order refuses a missing or twice-scored one)
    assert [r["index"] for r in two["mc"]["examples"]] == list(range(7))
    assert [len(r["scores"]) for r in two["mc"]["examples"]] == [2, 4, 3, 2, 4, 3, 2]
    for a, b in zip(one["mc"]["examples"], two["mc"]["examples"], strict=True):
        assert a["prediction"] == b["prediction"]
        assert b["scores"] == pytest.approx(a["scores"], abs=1e-5)
    assert two["mc"]["forwards_per_rank"] == mc_forwards
    # generation: with dp 2, 3 prompts per rank (one a dummy) in 2 batches whose early stops are agreed
    gen_forwards = two["gen"]["forwards_per_rank"]
    assert gen_forwards[0] == gen_forwards[1]
    strip = lambda records: [{k: v for k, v in r.items() if k != "steps_run"} for r in records]
    assert strip(two["gen"]["examples"]) == strip(one["gen"]["examples"])
    assert "mc" in proc.stdout and "exact_match" in proc.stdout


def test_task_file_errors_name_the_task_file_and_field(tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [{"context": "a", "choices": [" b", " c"], "answer": 1}])

    def refused(argv: list[str], match: str):
        assert evaluate.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("evaluate error: ") and err.count("\n") == 1 and re.search(match, err), err

    def fails(task: dict, match: str):
        tasks = write_tasks(tmp_path / "tasks.yaml", [{"name": "arc", "type": "multiple_choice",
                                                       "path": data.name, **task}])
        refused(["--model", str(tmp_path / "unused"), "--tasks", str(tasks)], match)

    fails({"mc_nmu": 8}, r"task 'arc': unknown field 'mc_nmu'; did you mean 'mc_num'\?")
    fails({"mc_num": 10, "batch_size": 4},
          r"task 'arc': field 'mc_num' \(10\) is not a multiple of field 'batch_size' \(4\)")
    fails({"cfg_scale": -1}, r"task 'arc': field 'cfg_scale' is -1; set it to a number >= 0")
    fails({"type": "cloze"},
          r"task 'arc': field 'type' is 'cloze'; set it to one of multiple_choice, generation")
    fails({"path": "missing.jsonl"}, r"task 'arc': data file .*missing.jsonl does not exist")
    data.write_text('{"context": "a", "choices": [" b"], "answer": 0}\n\n{"context": "a", "choices": [" b"], '
                    '"answer": 3}\n')
    fails({}, r"data.jsonl:3: field 'answer' must be the index of the right choice, 0..0, got 3")
    data.write_text('{"context": "a", "choices": [" b"], "answer": 0\n')
    fails({}, r"data.jsonl:1: not valid JSON")
    tasks = write_tasks(tmp_path / "gen.yaml", [{"name": "gsm", "type": "generation", "path": data.name,
                                                 "gen_length": 16, "block_length": 5}])
    refused(["--model", str(tmp_path), "--tasks", str(tasks)],
            r"task 'gsm': sampler settings: block_length 5 must divide gen_length 16")
    write_tasks(tmp_path / "gen.yaml", [{"name": "gsm", "type": "generation", "path": data.name,
                                         "extract": "answer is \\d+"}])
    refused(["--model", str(tmp_path), "--tasks", str(tasks)],
            r"task 'gsm': field 'extract' .* a group around the answer")


def test_example_recipe_validates():
    tasks = load_tasks(REPO / "recipes" / "eval_tasks.yaml")
    assert {t.type for t in tasks} == {"multiple_choice", "generation"}
    mmlu = next(t for t in tasks if t.name.startswith("mmlu"))
    assert mmlu.settings["mc_num"] == 1 and mmlu.path == REPO / "recipes" / "data" / "mmlu_5shot.jsonl"
    with pytest.raises(ValueError, match="mmlu_5shot.jsonl does not exist"):
        read_examples(mmlu)


def test_stops_extraction_the_continuation_split_chat_and_limit(trained, tmp_path):
    assert cut_at_stops("x = 1;\nQuestion: y", ["Question:", ";"]) == "x = 1"
    assert cut_at_stops("no stop here", ["\n\n"]) == "no stop here"
    assert extract_answer("so 3 + 4 = 7, then 1,234.50 apples", "number") == "1234.5"
    assert extract_answer("The answer is 12. The answer is 13.", r"answer is (\d+)") == "13"
    assert extract_answer("nothing", r"answer is (\d+)") == ""
    assert extract_answer("  free text \n", None) == "free text"
    settings = {"stop": ["\n\n"], "extract": "number"}
    assert generation_record("She has 72 left.\n\nQuestion: 5", "#### 72", settings) == \
        {"output": "She has 72 left.", "prediction": "72", "target": "72", "correct": True}
    tok = trained["tok"]
    context_ids, continuation = encode_pair(tok.encode, "key = ", "int;")  # the space moves to the continuation
    assert context_ids == tok.encode("key =")
    assert continuation == tok.encode("key = int;")[len(context_ids):]
    assert tok.decode(continuation) == " int;"

    write_jsonl(tmp_path / "q.jsonl", [{"prompt": "key =", "answer": 7}, {"prompt": "data =", "answer": "x"}])
    (task,) = load_tasks(write_tasks(tmp_path / "chat.yaml", [{"name": "q", "type": "generation",
                                                               "path": "q.jsonl", "chat": True}]))
    examples = read_examples(task, limit=1)
    assert len(examples) == 1 and examples[0].answer == "7"  # a numeric answer is read as text
    (prompt,) = scoring.prompt_ids(tok, task, examples)
    special = tok.special_ids
    assert prompt[:2] == [special["bos"], special["start_header"]] and special["eot"] in prompt


def test_preset_runs_the_official_protocol(trained, tmp_path):
    """`--preset mmlu-base --data FILE` is the task file the preset stands for (mc_num 1 in
    batches of 1, no guidance): the same settings and predictions as that task written out."""
    rows = choice_rows(random.Random(3), 4)
    write_jsonl(tmp_path / "mc.jsonl", rows)
    tasks = write_tasks(tmp_path / "tasks.yaml", [
        {"name": "mmlu-base", "type": "multiple_choice", "path": "mc.jsonl", "mc_num": 1, "batch_size": 1,
         "cfg_scale": 0.0}])
    model = ["--model", str(trained["ckpt"])]
    assert evaluate.main([*model, "--preset", "mmlu-base", "--data", str(tmp_path / "mc.jsonl"),
                          "--out", str(tmp_path / "preset.json")]) == 0
    assert evaluate.main([*model, "--tasks", str(tasks), "--out", str(tmp_path / "file.json")]) == 0
    preset, written = (json.loads((tmp_path / f"{name}.json").read_text())["tasks"]["mmlu-base"]
                       for name in ("preset", "file"))
    assert preset["settings"] == written["settings"]
    assert [r["prediction"] for r in preset["examples"]] == [r["prediction"] for r in written["examples"]]
    assert preset["forwards_per_rank"] == [sum(len(r["choices"]) for r in rows)]  # one forward per choice
    # control: another preset is another protocol (mc_num 128 in batches of 8, cfg 0.5)
    arc = evaluate.preset_tasks(evaluate.argparse.Namespace(preset="arc_c-base", data=str(tmp_path / "mc.jsonl"),
                                                            stop=None, extract=None))
    assert arc[0].settings["mc_num"] == 128 and arc[0].settings != preset["settings"]

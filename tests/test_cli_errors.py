"""Every command's predictable failures: one line on stderr and the documented exit code.

One table of cases over the commands (generate, chat, evaluate, export_hf, import_hf, profile,
lm_eval_adapter, plot, train): a bad path, file or flag value, the exit code the README's table gives
it, and what the line must name. Each case runs the command's `main` in this process (torch and
deepspeed are imported once for the whole table) and checks the exit code, that stderr is one
line `<command> error: ...` naming the bad path, and that no traceback is printed. The same case
with LLADA_TRACEBACK=1 must raise instead, which shows the failure went through
`pretrain.runtime.exit_codes.run_command` as an expected exception type (not a SystemExit and
not swallowed). Two real subprocesses, `python -m pretrain.generate` with and without
LLADA_TRACEBACK=1, show the same at the process level: without it, exit 2 and one line; with it,
the traceback (so the "no traceback" check can fail).
"""

import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.tiny_checkpoints import TINY, write_checkpoint

from parallel.model import LLaDAModel

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL_TASKS = ROOT / "tests" / "support" / "lm_eval_tasks"
ACCEPTED_DIRECTORIES = ("give a step_XXXXXXXX checkpoint, a checkpoints directory (its newest step) or a "
                        "released-format directory (config.json + *.safetensors)")


@dataclass(frozen=True)
class Case:
    command: str  # the module under pretrain/
    argv: list[str]
    code: int
    names: str  # what the error line must contain (the bad path, file:line or flag value)
    prefix: str = ""  # the line's start; default `<command> error: `
    control: bool = True  # also run it with LLADA_TRACEBACK=1


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> Path:
    """Bad inputs of every kind, side by side."""
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "empty").mkdir()
    (root / "broken_release").mkdir()
    (root / "broken_release" / "config.json").write_text("{not json")
    (root / "tokenizer.json").write_text("{}")
    weights = {n: p.detach() for n, p in LLaDAModel(TINY, init_seed=0).named_parameters()}
    write_checkpoint(root / "no_tokenizer", weights, TINY, root / "tokenizer.json")
    (root / "no_tokenizer" / "tokenizer.json").unlink()
    (root / "prompts.jsonl").write_text('{"prompt": "fine"}\n\n{"prompt": \n')
    (root / "data.jsonl").write_text('{"context": "a", "choices": [" b", " c"], "answer": 1}\n')
    (root / "tasks.yaml").write_text("- {name: arc, type: multiple_choice, path: data.jsonl}\n")
    (root / "taken").mkdir()
    (root / "taken" / "keep.txt").write_text("mine")
    (root / "a_file").write_text("mine")
    (root / "corpus").mkdir()
    (root / "corpus" / "notes.txt").write_text("text")
    (root / "corpus" / "a_weights.bin").write_bytes(b"\xff\xfe\x00binary")
    return root


def cases(r: Path) -> dict[str, Case]:
    missing, prompt = str(r / "missing"), ["--prompt", "hi"]
    return {
        "generate-missing-model": Case("generate", ["--model", missing, *prompt], 2,
                                       f"{missing} does not exist; {ACCEPTED_DIRECTORIES}"),
        "generate-empty-directory": Case("generate", ["--model", str(r / "empty"), *prompt], 2,
                                         f"{r / 'empty'} holds no weights"),
        "generate-broken-config-json": Case("generate", ["--model", str(r / "broken_release"), *prompt], 2,
                                            f"{r / 'broken_release' / 'config.json'}: not valid JSON"),
        "generate-checkpoint-without-tokenizer": Case("generate", ["--model", str(r / "no_tokenizer"), *prompt], 2,
                                                      str(r / "no_tokenizer" / "tokenizer.json")),
        "generate-missing-prompts-file": Case("generate", ["--model", missing, "--prompts-file",
                                                           str(r / "prompts.txt")], 2,
                                              f"--prompts-file {r / 'prompts.txt'} does not exist"),
        "generate-malformed-jsonl-line": Case("generate", ["--model", missing, "--prompts-file",
                                                           str(r / "prompts.jsonl")], 2,
                                              f"{r / 'prompts.jsonl'}:3: not valid JSON"),
        "generate-bad-sampler-flag": Case("generate", ["--model", missing, *prompt, "--gen-length", "16",
                                                       "--block-length", "5"], 2, "block_length 5"),
        "chat-missing-model": Case("chat", ["--model", missing], 2, f"{missing} does not exist"),
        "evaluate-missing-task-file": Case("evaluate", ["--model", missing, "--tasks", str(r / "tasks.yml")], 2,
                                           str(r / "tasks.yml")),
        "evaluate-missing-model": Case("evaluate", ["--model", missing, "--tasks", str(r / "tasks.yaml")], 2,
                                       f"{missing} does not exist"),
        "evaluate-bad-limit": Case("evaluate", ["--model", missing, "--tasks", str(r / "tasks.yaml"),
                                                "--limit", "0"], 2, "--limit 0"),
        "export_hf-missing-checkpoint": Case("export_hf", ["--checkpoint", missing, "--out", str(r / "out")], 2,
                                             f"{missing} does not exist"),
        "export_hf-occupied-out": Case("export_hf", ["--checkpoint", missing, "--out", str(r / "taken")], 2,
                                       f"--out {r / 'taken'}: exists and is not empty"),
        "export_hf-bad-shard-size": Case("export_hf", ["--checkpoint", missing, "--out", str(r / "out"),
                                                       "--max-shard-size", "5XB"], 2, "--max-shard-size: size '5XB'"),
        "import_hf-missing-release": Case("import_hf", ["--hf", missing, "--out", str(r / "out")], 2,
                                          f"--hf {missing}"),
        "import_hf-out-is-a-file": Case("import_hf", ["--hf", missing, "--out", str(r / "a_file")], 2,
                                        f"--out {r / 'a_file'}: exists and is a file"),
        "profile-missing-config": Case("profile", ["--config", str(r / "run.yaml")], 2, str(r / "run.yaml")),
        "lm_eval_adapter-missing-model": Case("lm_eval_adapter", [
            "--model", "llada_stack", "--model_args", f"model={missing}", "--tasks", "llada_toy_mc",
            "--include_path", str(LM_EVAL_TASKS)], 2, f"{missing} does not exist",
            control=False),  # lm-eval indexes all its task files on every call (~20 s)
        "plot-missing-run": Case("plot", [missing], 2, f"{missing} does not exist"),
        "plot-directory-without-metrics": Case("plot", [str(r / "empty")], 2,
                                               f"{r / 'empty'} holds no metrics.jsonl"),
        "train-missing-config": Case("train", ["--config", str(r / "run.yaml")], 2, str(r / "run.yaml"),
                                     prefix="config error: "),
        "train-binary-file-in-data-paths": Case("train", [
            "data.source=files", f"data.paths=[{r / 'corpus'}]", "data.heldout_fraction=0.5", "train.steps=1",
            f"train.out_dir={r / 'binary_run'}", "logging.progress_bar=false"], 2,
            f"{r / 'corpus' / 'a_weights.bin'}: not valid UTF-8", prefix="config error: data.paths (files): "),
    }


CASE_IDS = list(cases(Path("/")))


def run_in_process(case: Case, monkeypatch) -> int:
    main = importlib.import_module(f"pretrain.{case.command}").main
    if case.command == "lm_eval_adapter":  # lm-eval parses sys.argv (restored after the test) and stays offline
        monkeypatch.setattr(sys, "argv", [sys.argv[0]])
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            monkeypatch.setenv(name, "1")
    return main(case.argv)


def error_line(stderr: str, case: Case) -> str:
    """The one line of stderr; lm-eval logs its own progress lines first, so there the last line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    if case.command != "lm_eval_adapter":
        assert len(lines) == 1, stderr
    return lines[-1]


@pytest.mark.parametrize("name", CASE_IDS)
def test_failure_is_one_line_with_its_exit_code(name, places, capsys, monkeypatch):
    case = cases(places)[name]
    monkeypatch.delenv("LLADA_TRACEBACK", raising=False)
    assert run_in_process(case, monkeypatch) == case.code
    out, err = capsys.readouterr()
    line = error_line(err, case)
    assert line.startswith(case.prefix or f"{case.command} error: "), line
    assert case.names in line, line
    assert "Traceback" not in out + err
    if not case.control:
        return
    # control: with LLADA_TRACEBACK=1 the same failure is raised (an expected exception, not an exit)
    monkeypatch.setenv("LLADA_TRACEBACK", "1")
    with pytest.raises(Exception) as raised:
        run_in_process(case, monkeypatch)
    assert case.names in str(raised.value)


def test_real_process_prints_one_line_and_the_control_a_traceback(places, subprocess_env):
    case = cases(places)["generate-missing-model"]
    command = [sys.executable, "-m", "pretrain.generate", *case.argv]
    plain = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env={k: v for k, v in subprocess_env.items() if k != "LLADA_TRACEBACK"})
    traced = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**subprocess_env, "LLADA_TRACEBACK": "1"})
    out, err = plain.communicate(timeout=120)
    assert plain.returncode == 2, err
    assert error_line(err, case) == f"generate error: {case.names}"
    assert "Traceback" not in out + err
    _, traced_err = traced.communicate(timeout=120)
    assert traced.returncode == 1 and "Traceback" in traced_err, traced_err
    assert f"CheckpointError: {case.names}" in traced_err


def test_every_command_is_in_the_table():
    commands = {p.stem for p in (ROOT / "pretrain").glob("*.py") if "__main__" in p.read_text()}
    assert commands == {case.command for case in cases(Path("/")).values()}

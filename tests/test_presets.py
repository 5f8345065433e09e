"""The official evaluation table as presets (pretrain/evaluation/presets.py).

- Every preset turns into arguments the real consumers accept: the `llada_stack` lm-eval model
  (built on a tiny checkpoint from the model_args string lm-eval itself parses) and
  `pretrain.evaluate`'s task-file schema (`load_tasks`), each giving back the preset's protocol;
  every lm-eval task a preset names exists in the installed lm-eval.
- Names are unique, an unknown name is an error listing the names, `--preset` on lm-eval's
  command line expands as documented.
- Rows checked literally against the official sources (EVAL.md and eval_llada_lm_eval.sh).
Controls: a repeated name, a bad argument, a changed protocol and a made-up task are refused.
"""

import dataclasses
import re
from pathlib import Path

import lm_eval
import pytest
import yaml
from lm_eval.utils import simple_parse_args_string
from support.tiny_checkpoints import eos_ending_checkpoint

from pretrain.diffusion.sampling import SamplerConfig
from pretrain.evaluation.lm_eval_model import LLaDAStackLM
from pretrain.evaluation.presets import (
    INSTRUCT,
    LLADA_15,
    PRESETS,
    SAMPLER_FIELDS,
    Likelihood,
    PresetError,
    by_name,
    get_preset,
    lm_eval_argv,
    lm_eval_model_args,
    task_entry,
)
from pretrain.evaluation.tasks import TaskFileError, load_tasks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return eos_ending_checkpoint(tmp_path_factory.mktemp("presets"))


def parsed_model_args(name: str, model: str) -> dict:
    argv = lm_eval_argv(["--preset", name, "--model_args", f"model={model}", "--tasks", "given"])
    return simple_parse_args_string(argv[argv.index("--model_args") + 1])


def fields(sampler: SamplerConfig) -> dict:
    """The sampler settings a preset fixes (the adapter chooses the rest, e.g. the early stop)."""
    return {name: getattr(sampler, name) for name in SAMPLER_FIELDS}


def test_every_preset_builds_the_lm_eval_model_with_its_protocol(checkpoint):
    for preset in PRESETS.values():
        args = parsed_model_args(preset.name, str(checkpoint))
        assert args == {"model": str(checkpoint), **lm_eval_model_args(preset)}, preset.name
        lm = LLaDAStackLM(**args)
        if isinstance(preset.protocol, Likelihood):
            p = preset.protocol
            assert (lm.mc_num, lm.mc_batch_size, lm.cfg_scale, lm.check_greedy) == (
                p.mc_num, p.batch_size, p.cfg_scale, False), preset.name
        else:
            assert preset.protocol.problems() == [], preset.name
            assert fields(lm.sampler) == fields(preset.protocol), preset.name
    # control: the model refuses what a wrong table would hand it
    with pytest.raises(ValueError, match="multiple of mc_batch_size"):
        LLaDAStackLM(**{**parsed_model_args("arc_c-base", str(checkpoint)), "mc_batch_size": 3})
    with pytest.raises(ValueError, match="block_length 3 must divide"):
        LLaDAStackLM(**{**parsed_model_args("gsm8k-base", str(checkpoint)), "block_length": 3})


def test_every_preset_is_a_valid_evaluate_task(tmp_path):
    entries = [task_entry(p, "data.jsonl") for p in PRESETS.values()]
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(entries))
    tasks = load_tasks(tmp_path / "tasks.yaml")
    assert [t.name for t in tasks] == list(PRESETS)
    for task in tasks:
        preset = PRESETS[task.name]
        assert task.type == preset.kind
        if isinstance(preset.protocol, Likelihood):
            assert dataclasses.astuple(preset.protocol) == (
                task.settings["mc_num"], task.settings["batch_size"], task.settings["cfg_scale"])
        else:
            assert task.sampler == preset.protocol and task.settings["chat"] == preset.chat
    # data settings pass through; protocol settings belong to the preset
    extra = task_entry(PRESETS["gsm8k-base"], "data.jsonl", stop=["Question:"], extract="number")
    assert extra["stop"] == ["Question:"] and extra["gen_length"] == 1024
    with pytest.raises(PresetError, match="sets gen_length"):
        task_entry(PRESETS["gsm8k-base"], "data.jsonl", gen_length=256)
    # control: the schema check is real (a protocol the sampler refuses does not load)
    broken = {**entries[list(PRESETS).index("gsm8k-base")], "block_length": 3}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump([broken]))
    with pytest.raises(TaskFileError, match="must divide"):
        load_tasks(tmp_path / "broken.yaml")



def lm_eval_task_names() -> set[str]:
    """Every `task:` and `group:` name of the installed lm-eval's task YAMLs."""
    found = set()
    for path in Path(lm_eval.__file__).parent.joinpath("tasks").rglob("*yaml"):
        found |= set(re.findall(r"^(?:task|group): *([\w\-.]+) *$", path.read_text(errors="replace"), re.M))
    return found


def test_every_named_lm_eval_task_exists():
    known = lm_eval_task_names()
    named = {p.lm_eval_task for p in PRESETS.values() if p.lm_eval_task}
    assert named and named <= known, named - known
    assert "gsm8k_made_up" not in known  # control


def test_names_are_unique_and_unknown_names_list_the_choices():
    assert len(PRESETS) == 46  # 14 likelihood (6 with a no-guidance twin), 15 Base generation, 11 Instruct, 6 LLaDA 1.5
    with pytest.raises(PresetError, match="'gsm8k-base' is used twice"):
        by_name([PRESETS["gsm8k-base"], PRESETS["arc_c-base"], PRESETS["gsm8k-base"]])
    with pytest.raises(PresetError) as error:
        get_preset("gsm8k-bas")
    assert "did you mean 'gsm8k-base'?" in str(error.value)
    assert all(name in str(error.value) for name in PRESETS)
    with pytest.raises(PresetError, match="unknown preset 'nope'"):
        lm_eval_argv(["--preset=nope", "--model_args", "model=D"])


def test_lm_eval_command_line_expansion():
    plain = ["--model", "hf", "--tasks", "gsm8k"]
    assert lm_eval_argv(plain) == plain  # no --preset: untouched
    argv = lm_eval_argv(["--preset", "arc_c-base", "--model_args", "model=D,mc_num=16,mc_batch_size=4",
                         "--output_path", "out"])
    assert argv == ["--model", "llada_stack", "--model_args",
                    "model=D,mc_num=16,mc_batch_size=4,cfg_scale=0.5,check_greedy=False",
                    "--tasks", "arc_challenge", "--output_path", "out", "--num_fewshot", "0"]
    argv = lm_eval_argv(["--preset", "gsm8k-instruct", "--model_args", "model=D", "--tasks", "gsm8k",
                         "--num_fewshot=4"])
    assert argv[-1] == "--apply_chat_template" and argv.count("--num_fewshot=4") == 1
    with pytest.raises(PresetError, match=r"OpenCompass \(gsm8k_gen\).*give --tasks"):
        lm_eval_argv(["--preset", "gsm8k-instruct", "--model_args", "model=D"])
    with pytest.raises(PresetError, match="model=DIR"):
        lm_eval_argv(["--preset", "gsm8k-base", "--model_args", "mc_num=4"])
    with pytest.raises(PresetError, match="--model is 'hf'"):
        lm_eval_argv(["--preset", "gsm8k-base", "--model", "hf", "--model_args", "model=D"])


# Transcribed from eval_llada_lm_eval.sh and EVAL.md (see SOURCES in the module):
# name -> (model, lm-eval task, num_fewshot, protocol, scores)
OFFICIAL_ROWS = {
    "arc_c-base": ("GSAI-ML/LLaDA-8B-Base", "arc_challenge", 0, Likelihood(128, 8, 0.5), (47.9,)),
    "arc_c-base-nocfg": ("GSAI-ML/LLaDA-8B-Base", "arc_challenge", 0, Likelihood(128, 8, 0.0), (45.9,)),
    "truthfulqa-base": ("GSAI-ML/LLaDA-8B-Base", "truthfulqa_mc2", 0, Likelihood(128, 8, 2.0), (46.4,)),
    "mmlu-base": ("GSAI-ML/LLaDA-8B-Base", "mmlu", 5, Likelihood(1, 1, 0.0), (65.9,)),
    "gsm8k-base": ("GSAI-ML/LLaDA-8B-Base", "gsm8k", None,
                   SamplerConfig(steps=1024, gen_length=1024, block_length=1024), (70.3, 70.7)),
    "bbh-base-256": ("GSAI-ML/LLaDA-8B-Base", "bbh", None,
                     SamplerConfig(steps=256, gen_length=256, block_length=256), (45.0, 47.3)),
    "gsm8k-instruct": ("GSAI-ML/LLaDA-8B-Instruct", None, None,
                       SamplerConfig(steps=512, gen_length=512, block_length=512, confidence_eos_eot="official"),
                       (68.8, 69.4)),
    "humaneval-instruct": ("GSAI-ML/LLaDA-8B-Instruct", None, None,
                           SamplerConfig(steps=512, gen_length=512, block_length=512, logits_eos_inf=True),
                           (47.0, 49.4)),
    "gsm8k-instruct-block8": ("GSAI-ML/LLaDA-8B-Instruct", None, None,
                              SamplerConfig(steps=256, gen_length=256, block_length=8), (78.9, 78.6)),
}


def row(preset) -> tuple:
    return (preset.model, preset.lm_eval_task, preset.num_fewshot, preset.protocol,
            tuple(s.value for s in preset.scores))


def test_rows_match_the_official_values():
    for name, official in OFFICIAL_ROWS.items():
        assert row(PRESETS[name]) == official, name
    assert all(p.chat == (p.model in (INSTRUCT, LLADA_15)) for p in PRESETS.values())
    # control: the comparison sees a single changed setting
    preset = PRESETS["gsm8k-instruct"]
    changed = dataclasses.replace(preset, protocol=dataclasses.replace(preset.protocol, confidence_eos_eot="both"))
    assert row(changed) != OFFICIAL_ROWS["gsm8k-instruct"]

"""The official LLaDA evaluation table as named presets: one name gives the official protocol.

Every row of the official evaluation page (ML-GSAI/LLaDA `EVAL.md`) and of the commands it points
to (`eval_llada_lm_eval.sh`: LLaDA-8B-Base through lm-eval; `eval_llada_opencompass.sh` and its
`opencompass/examples` configs: LLaDA-8B-Instruct and LLaDA 1.5 through OpenCompass) is one
`Preset`: the benchmark, the lm-eval task and few-shot count, the protocol (`Likelihood`: Algorithm 3's
mc_num, Monte Carlo batch and guidance; or the sampler's settings as a `SamplerConfig`), whether
prompts go through the chat template, and the scores the page reports for the released weights,
each with its source (`SOURCES`). `lm_eval_argv` turns `--preset NAME` on lm-eval's command line
into the `llada_stack` adapter's arguments; `task_entry` is a task of `pretrain.evaluate`'s task file.

What the sources fix, and what they leave open:
- Base, likelihood: task, num_fewshot, cfg, mc_num and the Monte Carlo batch (the official
  adapter's `batch_size`: rows per forward, which also sets the stratification of the masked
  counts) are the script's; `is_check_greedy` is False. EVAL.md reports each task with and
  without guidance and says the paper's Table 1 has the numbers without, so every task the script
  runs with guidance also has a `-nocfg` preset (guidance 0, the script otherwise).
- Base, generation: the script passes no --num_fewshot, so lm-eval's task default applies
  (`shots` records it as lm-eval 0.4.13 sets it; the official pins lm-eval 0.4.8). Temperature
  0, low-confidence remasking, no guidance and no EOS flag are the official adapter's fixed
  choices. The script runs gen_length = steps = block_length = 1024; EVAL.md's 512 and 256
  ablation rows are the `-512` and `-256` presets.
- Instruct and LLaDA 1.5: EVAL.md lists OpenCompass only (no lm-eval protocol), through the chat
  template. gen_length, block_length and the two EOS flags are EVAL.md's; steps equal gen_length
  in every official config that could be read (`note` says which) and are taken so for the
  others. Prompts and shots are those of OpenCompass dataset configs (`opencompass_config` where
  read), so `lm_eval_task` is None and `shots` is None where the config was not read.
- The official `confidence_eos_eot_inf` flag is `confidence_eos_eot="official"`; `logits_eos_inf`
  keeps its name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from pretrain.diffusion.sampling import SamplerConfig
from pretrain.runtime.exit_codes import UsageError

SOURCES = {
    "EVAL.md": "ML-GSAI/LLaDA EVAL.md, the version with lm-eval and OpenCompass results (Oct 2025; its "
               "official commit is not known here; the same text is at huggingface.co/spaces/Aryankvgd/LLaDA, EVAL.md)",
    "EVAL.md (early)": "ML-GSAI/LLaDA EVAL.md, the earlier version comparing the internal toolkit with lm-eval "
                       "(copy in the fork zhhangBian/LLaDA@b7725884b0ef7f0dc45015ab9866e648691a34fa)",
    "lm-eval script": "ML-GSAI/LLaDA eval_llada_lm_eval.sh and eval_llada.py (copy in the fork "
                      "taiqihe/LLaDA@0c4ec177c8c8e94ce7b4c54df602998c28f6285d)",
    "OpenCompass script": "ML-GSAI/LLaDA eval_llada_opencompass.sh and opencompass/examples/*.py (copy in the "
                          "fork taiqihe/LLaDA@0c4ec177c8c8e94ce7b4c54df602998c28f6285d)",
}
BASE, INSTRUCT, LLADA_15 = "GSAI-ML/LLaDA-8B-Base", "GSAI-ML/LLaDA-8B-Instruct", "GSAI-ML/LLaDA-1.5"
# The sampler fields a preset fixes (the others keep SamplerConfig's defaults: exact schedule, no cache).
SAMPLER_FIELDS = ("steps", "gen_length", "block_length", "temperature", "cfg_scale", "remasking",
                  "logits_eos_inf", "confidence_eos_eot")


class PresetError(UsageError):
    """An unknown preset name, or a command line a preset cannot complete; the message says the fix
    (a usage error: the commands print it as one line and exit 2)."""


@dataclass(frozen=True)
class Score:
    value: float
    harness: str        # "lm-eval", "OpenCompass" or "internal toolkit" (the paper's tables)
    source: str         # a key of SOURCES


@dataclass(frozen=True)
class Likelihood:
    """Algorithm 3 as the official lm-eval adapter runs it on every choice."""
    mc_num: int
    batch_size: int     # Monte Carlo rows per forward (the official adapter's batch_size)
    cfg_scale: float


@dataclass(frozen=True)
class Preset:
    name: str
    model: str                          # the released weights the scores are of
    benchmark: str                      # as EVAL.md names it
    protocol: Likelihood | SamplerConfig
    lm_eval_task: str | None            # None: the official harness is OpenCompass
    num_fewshot: int | None             # as the official command passes it (None: not passed)
    shots: int | None                   # examples in each prompt (None: an OpenCompass config not read)
    chat: bool                          # prompts through the chat template
    scores: tuple[Score, ...]           # the first is what this very protocol scored in its harness
    opencompass_config: str | None = None
    note: str = ""

    @property
    def kind(self) -> str:
        """The task type of `pretrain.evaluate`: multiple_choice (Algorithm 3) or generation."""
        return "multiple_choice" if isinstance(self.protocol, Likelihood) else "generation"


# ---- the table ------------------------------------------------------------------------------------

def _base_likelihood() -> list[Preset]:
    # key, benchmark, lm-eval task, num_fewshot, mc_num, batch, script's cfg, EVAL.md w/o CFG, w/ CFG
    rows = [("arc_c", "ARC-C", "arc_challenge", 0, 128, 8, 0.5, 45.9, 47.9),
            ("hellaswag", "Hellaswag", "hellaswag", 0, 128, 8, 0.5, 70.5, 72.5),
            ("truthfulqa", "TruthfulQA", "truthfulqa_mc2", 0, 128, 8, 2.0, 46.1, 46.4),
            ("winogrande", "WinoGrande", "winogrande", 5, 128, 8, 0.0, 74.8, 74.8),
            ("gpqa", "GPQA", "gpqa_main_n_shot", 5, 128, 8, 0.5, 25.2, 26.1),
            ("piqa", "PIQA", "piqa", 0, 128, 8, 0.5, 73.6, 74.4),
            ("mmlu", "MMLU", "mmlu", 5, 1, 1, 0.0, 65.9, None),
            ("cmmlu", "CMMLU", "cmmlu", 5, 1, 1, 0.0, 69.9, None),
            ("ceval", "C-Eval", "ceval-valid", 5, 1, 1, 0.0, 70.5, None)]
    out = []
    for key, benchmark, task, shots, mc_num, batch, cfg, without, with_cfg in rows:
        def preset(name, cfg_scale, score, note):
            return Preset(name, BASE, benchmark, Likelihood(mc_num, batch, cfg_scale), task, shots, shots, False,
                          (Score(score, "lm-eval", "EVAL.md"),), note=note)
        if cfg:
            out.append(preset(f"{key}-base", cfg, with_cfg, "the script's guidance (EVAL.md: w/ CFG)"))
            out.append(preset(f"{key}-base-nocfg", 0.0, without,
                              "no guidance: the paper's Table 1 setting (EVAL.md: w/o CFG)"))
        else:
            out.append(preset(f"{key}-base", 0.0, without, "no guidance in the script (EVAL.md: w/o CFG)"))
    return out


def _base_generation() -> list[Preset]:
    # key, benchmark, lm-eval task, lm-eval's default shots, EVAL.md lm-eval at 1024 / 512 / 256,
    # early EVAL.md internal toolkit, EVAL.md OpenCompass at 256
    rows = [("bbh", "BBH", "bbh", 3, (49.7, 50.4, 45.0), 49.8, 47.3),
            ("gsm8k", "GSM8K", "gsm8k", 5, (70.3, 70.8, 70.0), 70.7, 71.9),
            ("math", "Math", "minerva_math", 4, (31.4, 30.9, 30.3), 27.3, 30.7),
            ("humaneval", "HumanEval", "humaneval", 0, (35.4, 32.9, 32.9), 33.5, 34.1),
            ("mbpp", "MBPP", "mbpp", 3, (40.0, 39.2, 40.2), 38.4, 38.8)]
    out = []
    for key, benchmark, task, shots, by_length, internal, opencompass in rows:
        for length, score in zip((1024, 512, 256), by_length):
            scores = [Score(score, "lm-eval", "EVAL.md")]
            if length == 1024:
                scores.append(Score(internal, "internal toolkit", "EVAL.md (early)"))
            if length == 256:
                scores.append(Score(opencompass, "OpenCompass", "EVAL.md"))
            out.append(Preset(f"{key}-base" + ("" if length == 1024 else f"-{length}"), BASE, benchmark,
                              SamplerConfig(steps=length, gen_length=length, block_length=length), task, None,
                              shots, False, tuple(scores),
                              note="the script's setting" if length == 1024 else "an EVAL.md ablation row"))
    return out


STEPS_READ = "steps = gen_length read in the official config"
STEPS_TAKEN = "steps = gen_length taken from the other official configs (this one was not read)"


def _opencompass(model: str, rows) -> list[Preset]:
    # name, benchmark, gen_length, block_length, logits_eos_inf, confidence_eos_eot_inf,
    # EVAL.md internal toolkit, EVAL.md OpenCompass, OpenCompass dataset config (None: not read),
    # whether the official config's steps were read
    out = []
    for name, benchmark, length, block, logits_eos, confidence, internal, opencompass, config, read in rows:
        sampler = SamplerConfig(steps=length, gen_length=length, block_length=block, logits_eos_inf=logits_eos,
                                confidence_eos_eot="official" if confidence else "off")
        shots = 0 if config is not None and "0shot" in config else None
        out.append(Preset(name, model, benchmark, sampler, None, None, shots, True,
                          (Score(opencompass, "OpenCompass", "EVAL.md"),
                           Score(internal, "internal toolkit", "EVAL.md")),
                          opencompass_config=config, note=STEPS_READ if read else STEPS_TAKEN))
    return out


def _instruct() -> list[Preset]:
    return _opencompass(INSTRUCT, [
        ("mmlu-instruct", "MMLU", 3, 3, False, False, 65.5, 65.4, "mmlu_gen_a484b3", True),
        ("mmlu_pro-instruct", "MMLU-pro", 256, 256, False, False, 37.0, 36.6, None, False),
        ("hellaswag-instruct", "Hellaswag", 3, 3, False, False, 74.6, 75.3, "hellaswag_gen_6faab5", True),
        ("arc_c-instruct", "ARC-C", 512, 512, False, False, 88.5, 89.2, None, False),
        ("gsm8k-instruct", "GSM8K", 512, 512, False, True, 69.4, 68.8, "gsm8k_gen", True),
        ("math-instruct", "Math", 512, 512, False, True, 31.9, 29.6, "math_0shot_gen_11c4b5", True),
        ("gpqa-instruct", "GPQA", 64, 64, False, True, 33.3, 32.3, None, False),
        ("humaneval-instruct", "HumanEval", 512, 512, True, False, 49.4, 47.0, None, False),
        ("mbpp-instruct", "MBPP", 256, 256, False, True, 41.0, 39.6, None, False),
        # block diffusion (semi-autoregressive) against the Instruct model's excess EOS
        ("gsm8k-instruct-block8", "GSM8K", 256, 8, False, False, 78.6, 78.9, "gsm8k_gen", True),
        ("math-instruct-block64", "Math", 512, 64, False, False, 42.2, 42.7, None, False)])


def _llada_15() -> list[Preset]:
    return _opencompass(LLADA_15, [
        ("gsm8k-1.5", "GSM8K", 256, 16, False, True, 83.8, 83.6, None, False),
        ("math-1.5", "Math", 1024, 128, False, True, 42.6, 42.3, None, False),
        ("gpqa-1.5", "GPQA", 256, 16, False, False, 36.9, 34.8, "gpqa_fewshot_gen", True),
        ("humaneval-1.5", "HumanEval", 512, 32, False, True, 52.4, 51.2, None, False),
        ("mbpp-1.5", "MBPP", 512, 32, False, True, 42.8, 42.6, None, False),
        ("ifeval-1.5", "IFEval", 256, 16, False, True, 66.2, 65.2, None, False)])


def by_name(presets: list[Preset]) -> dict[str, Preset]:
    """name -> preset; a name used twice is an error."""
    table: dict[str, Preset] = {}
    for preset in presets:
        if preset.name in table:
            raise PresetError(f"preset name {preset.name!r} is used twice")
        table[preset.name] = preset
    return table


PRESETS = by_name(_base_likelihood() + _base_generation() + _instruct() + _llada_15())


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is an error listing every name."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise PresetError(f"unknown preset {name!r}; {hint}the presets are {', '.join(PRESETS)}")


def summary(preset: Preset) -> str:
    """The protocol in a few words, e.g. 'Algorithm 3, mc_num 128 in batches of 8, cfg 0.5'."""
    p = preset.protocol
    if isinstance(p, Likelihood):
        return f"Algorithm 3, mc_num {p.mc_num} in batches of {p.batch_size}, cfg {p.cfg_scale:g}"
    flags = [name for name, on in (("logits_eos_inf", p.logits_eos_inf),
                                   ("confidence_eos_eot official", p.confidence_eos_eot == "official")) if on]
    return (f"gen_length {p.gen_length}, steps {p.steps}, block_length {p.block_length}, "
            f"{'chat, ' if preset.chat else ''}{', '.join(flags) or 'no EOS flag'}")


# ---- the lm-eval adapter ---------------------------------------------------------------------------

def lm_eval_model_args(preset: Preset) -> dict[str, object]:
    """The `llada_stack` model_args of the preset's protocol (without `model`, the directory)."""
    p = preset.protocol
    if isinstance(p, Likelihood):
        return {"mc_num": p.mc_num, "mc_batch_size": p.batch_size, "cfg_scale": p.cfg_scale, "check_greedy": False}
    return {name: getattr(p, name) for name in SAMPLER_FIELDS}


def _option(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """(value of `flag` given as `flag V` or `flag=V`, or None; argv without it)."""
    for i, arg in enumerate(argv):
        if arg == flag:
            if i + 1 == len(argv):
                raise PresetError(f"{flag} needs a value")
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:], argv[:i] + argv[i + 1:]
    return None, argv


def _given(argv: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def lm_eval_argv(argv: list[str]) -> list[str]:
    """lm-eval's command line (without the program name) with `--preset NAME` replaced by the preset:
    its model_args under the user's `--model_args` (the user's keys win, `model=DIR` is the user's),
    `--model llada_stack`, `--tasks` and `--num_fewshot` unless given, `--apply_chat_template` for a
    chat preset. Without `--preset` the command line is returned unchanged."""
    name, argv = _option(argv, "--preset")
    if name is None:
        return argv
    preset = get_preset(name)
    user_args, argv = _option(argv, "--model_args")
    pairs = [pair.split("=", 1) for pair in (user_args or "").split(",") if pair]
    if any(len(pair) != 2 for pair in pairs) or "model" not in dict(pairs):
        raise PresetError(f"preset {name!r}: give the model as --model_args model=DIR[,key=value...]")
    model_args = {"model": dict(pairs)["model"], **lm_eval_model_args(preset), **dict(pairs)}
    model, argv = _option(argv, "--model")
    if model not in (None, "llada_stack"):
        raise PresetError(f"preset {name!r} sets the llada_stack model's arguments; --model is {model!r}")
    tasks, argv = _option(argv, "--tasks")
    tasks = tasks or preset.lm_eval_task
    if tasks is None:
        raise PresetError(f"preset {name!r} was scored with OpenCompass ({preset.opencompass_config or 'its config'}), "
                          f"which has no lm-eval task of its own; give --tasks (the preset still sets the sampler)")
    out = ["--model", "llada_stack", "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
           "--tasks", tasks, *argv]
    if preset.num_fewshot is not None and not _given(argv, "--num_fewshot"):
        out += ["--num_fewshot", str(preset.num_fewshot)]
    if preset.chat and not _given(argv, "--apply_chat_template"):
        out.append("--apply_chat_template")
    return out


# ---- pretrain.evaluate -----------------------------------------------------------------------------

def evaluate_settings(preset: Preset) -> dict[str, object]:
    """The settings of a `pretrain.evaluate` task of the preset's type (`pretrain/evaluation/tasks.py`)."""
    p = preset.protocol
    if isinstance(p, Likelihood):
        return {"mc_num": p.mc_num, "batch_size": p.batch_size, "cfg_scale": p.cfg_scale}
    return {**{name: getattr(p, name) for name in SAMPLER_FIELDS}, "chat": preset.chat}


def task_entry(preset: Preset, path: str, **data_settings: object) -> dict[str, object]:
    """One task of `pretrain.evaluate`'s task file: the preset's protocol over the JSONL at `path`,
    whose prompts hold `preset.shots` examples. `data_settings` are what belongs to the data
    (stop, extract, a generation batch_size); a protocol setting there is an error."""
    settings = evaluate_settings(preset)
    clash = sorted(set(data_settings) & set(settings))
    if clash:
        raise PresetError(f"preset {preset.name!r} sets {', '.join(clash)}; leave them to the preset")
    return {"name": preset.name, "type": preset.kind, "path": str(path), **settings, **data_settings}

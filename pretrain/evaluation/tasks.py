"""Evaluation task files: the YAML list of tasks, their JSONL data, and how answers are scored.

`pretrain.evaluate` runs what this module describes; it lives apart so the task schema can be
validated (and unit-tested) without a model: every problem is found before the model loads, with
a message naming the task, the field and the fix, or the data file and line.

A task file is a YAML list; each task is a mapping
    name: a unique label                     type: multiple_choice | generation
    path: a JSONL file (relative paths resolve against the YAML file's directory)
plus the settings of its type (every one optional):
    multiple_choice  rows {"context": str, "choices": [str, ...], "answer": int}
        mc_num (128), batch_size (min(16, mc_num); must divide mc_num), cfg_scale (0.0)
    generation       rows {"prompt": str, "answer": str}
        the sampler's fields (`pretrain.diffusion.sampling.SamplerConfig`: steps, gen_length, block_length,
        temperature, cfg_scale, remasking, logits_eos_inf, confidence_eos_eot, stop_at_eos,
        threshold, cache, cache_refresh_every),
        chat (false), stop ([]), extract (null | "number" | a regex with a group), batch_size (8)

Multiple choice splits context and continuation as lm-eval's `_encode_pair` (which the official
`eval_llada.py` uses): trailing whitespace of the context moves to the front of the
continuation, the context is encoded alone and the continuation is what encoding the whole adds.
Generation answers are cut at the first stop string, then `extract` picks the answer: the last
match's group 1 of a regex (no match: an empty, wrong prediction), "number" the last number
(commas dropped, "7.0" read as "7"; the target is read the same way), none the whole cut text;
exact match compares stripped strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from pretrain.diffusion.sampling import (
    CACHE_MODES,
    CONFIDENCE_DTYPES,
    CONFIDENCE_EOS_EOT,
    LOGITS_AT,
    REMASKING,
    SamplerConfig,
)

TASK_TYPES = ("multiple_choice", "generation")
COMMON_FIELDS = ("name", "type", "path")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class TaskFileError(ValueError):
    """A task-file or data-file problem; the message names where and the fix."""


@dataclass
class Task:
    name: str
    type: str
    path: Path
    settings: dict[str, Any]            # every setting of the type, defaults filled in

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(**{f.name: self.settings[f.name] for f in dataclasses.fields(SamplerConfig)})


@dataclass
class ChoiceExample:
    context: str
    choices: list[str]
    answer: int
    line: int


@dataclass
class GenerationExample:
    prompt: str
    answer: str
    line: int


# ---- settings ------------------------------------------------------------------------------------
# name -> (kind, default); kinds: "posint", "nonneg" (float >= 0), "bool", "stop", "extract",
# or a tuple of allowed strings. A default of None for batch_size means min(16, mc_num).

def _sampler_fields() -> dict[str, tuple[Any, Any]]:
    kinds = {"steps": "posint", "gen_length": "posint", "block_length": "posint", "temperature": "nonneg",
             "cfg_scale": "nonneg", "remasking": REMASKING, "logits_eos_inf": "bool",
             "confidence_eos_eot": CONFIDENCE_EOS_EOT, "confidence_dtype": CONFIDENCE_DTYPES,
             "logits_at": LOGITS_AT, "stop_at_eos": "bool", "threshold": "nonneg",
             "cache": CACHE_MODES, "cache_refresh_every": "posint"}
    return {f.name: (kinds[f.name], f.default) for f in dataclasses.fields(SamplerConfig)}


SETTINGS = {
    "multiple_choice": {"mc_num": ("posint", 128), "batch_size": ("posint", None),
                        "cfg_scale": ("nonneg", 0.0)},
    "generation": {**_sampler_fields(), "chat": ("bool", False), "stop": ("stop", []),
                   "extract": ("extract", None), "batch_size": ("posint", 8)},
}


def _check_value(kind, value) -> str | None:
    """None if `value` fits `kind`, else what is expected."""
    if kind == "posint":
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        return None if ok else "a positive integer"
    if kind == "nonneg":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        return None if ok else "a number >= 0"
    if kind == "bool":
        return None if isinstance(value, bool) else "true or false"
    if kind == "stop":
        ok = isinstance(value, list) and all(isinstance(s, str) and s for s in value)
        return None if ok else "a list of non-empty strings, e.g. [\"\\n\\n\", \"Question:\"]"
    if kind == "extract":
        if value is None or value == "number":
            return None
        if not isinstance(value, str):
            return "null, \"number\" or a regular expression with a group"
        try:
            groups = re.compile(value).groups
        except re.error as error:
            return f"a valid regular expression ({error})"
        if groups < 1:
            return "a regular expression with a group around the answer, e.g. 'answer is (\\S+)'"
        return None
    return None if value in kind else f"one of {', '.join(kind)}"


def _task(raw: Any, position: int, where: Path, seen: set[str]) -> Task:
    label = f"{where}: task #{position + 1}"
    if not isinstance(raw, dict):
        raise TaskFileError(f"{label}: expected a mapping with name, type and path, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise TaskFileError(f"{label}: field 'name' is missing or not a string; give each task a unique name")
    label = f"{where}: task {name!r}"
    if name in seen:
        raise TaskFileError(f"{label}: the name is used twice; give each task a unique name")
    seen.add(name)
    kind = raw.get("type")
    if kind not in TASK_TYPES:
        raise TaskFileError(f"{label}: field 'type' is {kind!r}; set it to one of {', '.join(TASK_TYPES)}")
    path = raw.get("path")
    if not isinstance(path, str) or not path:
        raise TaskFileError(f"{label}: field 'path' is missing; set it to the task's JSONL file")
    known = SETTINGS[kind]
    for key in raw:
        if key not in COMMON_FIELDS and key not in known:
            close = difflib.get_close_matches(str(key), [*COMMON_FIELDS, *known], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TaskFileError(f"{label}: unknown field {key!r}; {hint}the fields of a {kind} task are "
                                f"{', '.join([*COMMON_FIELDS, *known])}")
    settings = {}
    for key, (value_kind, default) in known.items():
        value = raw.get(key, default)
        expected = None if value is None and default is None else _check_value(value_kind, value)
        if expected:
            raise TaskFileError(f"{label}: field {key!r} is {value!r}; set it to {expected}")
        settings[key] = float(value) if value_kind == "nonneg" and value is not None else value
    if kind == "multiple_choice":
        if settings["batch_size"] is None:
            settings["batch_size"] = min(16, settings["mc_num"])
        if settings["mc_num"] % settings["batch_size"]:
            raise TaskFileError(f"{label}: field 'mc_num' ({settings['mc_num']}) is not a multiple of "
                                f"field 'batch_size' ({settings['batch_size']}); make mc_num a multiple "
                                f"of batch_size")
    task = Task(name, kind, (where.parent / path), settings)
    if kind == "generation":
        problems = task.sampler.problems()
        if problems:
            raise TaskFileError(f"{label}: sampler settings: " + "; ".join(problems))
    return task


def load_tasks(path: str | Path) -> list[Task]:
    """The validated tasks of a YAML task file (data files are not read here)."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such task file; give a YAML list of tasks (see recipes/eval_tasks.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TaskFileError(f"{path}: not valid YAML: {error}") from None
    return parse_tasks(raw, path)


def parse_tasks(raw: Any, where: Path) -> list[Task]:
    """The validated tasks of a task list already read (a task file's YAML, or a preset's entry);
    relative data paths resolve against `where`'s directory."""
    if not isinstance(raw, list) or not raw:
        raise TaskFileError(f"{where}: expected a non-empty YAML list of tasks "
                            f"(- name: ..., type: ..., path: ...)")
    seen: set[str] = set()
    return [_task(item, i, where, seen) for i, item in enumerate(raw)]


# ---- data ----------------------------------------------------------------------------------------

def _row(task: Task, record: Any, where: str):
    if not isinstance(record, dict):
        raise TaskFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if task.type == "multiple_choice":
        context, choices, answer = record.get("context"), record.get("choices"), record.get("answer")
        if not isinstance(context, str):
            raise TaskFileError(f"{where}: field 'context' must be a string")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise TaskFileError(f"{where}: field 'choices' must be a non-empty list of non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise TaskFileError(f"{where}: field 'answer' must be the index of the right choice, "
                                f"0..{len(choices) - 1}, got {answer!r}")
        return ChoiceExample(context, choices, answer, 0)
    prompt, answer = record.get("prompt"), record.get("answer")
    if not isinstance(prompt, str) or not prompt:
        raise TaskFileError(f"{where}: field 'prompt' must be a non-empty string")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise TaskFileError(f"{where}: field 'answer' must be a non-empty string (or a number)")
    return GenerationExample(prompt, answer, 0)


def read_examples(task: Task, limit: int | None = None) -> list:
    """The task's rows (the first `limit` of them), validated; errors name file:line."""
    if not task.path.is_file():
        raise TaskFileError(f"task {task.name!r}: data file {task.path} does not exist; set 'path' "
                            f"(a relative path resolves against the task file's directory)")
    examples = []
    with task.path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{task.path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskFileError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            example = _row(task, record, where)
            example.line = number
            examples.append(example)
    if not examples:
        raise TaskFileError(f"task {task.name!r}: {task.path} holds no examples")
    return examples


# ---- encoding and answers ------------------------------------------------------------------------

def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: (context ids, continuation ids), trailing whitespace of the
    context moved to the continuation, the continuation being what encoding the whole adds."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode(context)
    whole = encode(context + continuation)
    return context_ids, whole[len(context_ids):]


def cut_at_stops(text: str, stop: list[str]) -> str:
    """`text` up to the earliest occurrence of any (non-empty) stop string."""
    end = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:end]


def _number(text: str) -> str | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def extract_answer(text: str, extract: str | None) -> str:
    """The answer in a cut generation: see the module docstring."""
    if extract is None:
        return text.strip()
    if extract == "number":
        return _number(text) or ""
    matches = list(re.finditer(extract, text))
    return (matches[-1].group(1) or "").strip() if matches else ""


def normalise_target(answer: str, extract: str | None) -> str:
    if extract == "number":
        return _number(answer) or answer.strip()
    return answer.strip()


def generation_record(text: str, target: str, settings: dict) -> dict:
    """One generation's record: the cut output, the extracted prediction, the target, correct."""
    output = cut_at_stops(text, settings["stop"])
    prediction = extract_answer(output, settings["extract"])
    target = normalise_target(target, settings["extract"])
    return {"output": output, "prediction": prediction, "target": target, "correct": prediction == target}

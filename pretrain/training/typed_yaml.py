"""YAML mappings into typed dataclasses: every value checked against its field's annotation,
unknown keys refused with the known ones named, `section.field=value` overrides parsed as YAML.

The run config (`pretrain.training.config`) is made of dataclass sections; this is the generic
half of loading it, apart from what the sections mean.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the field and the fix."""




def coerce(value, annotation, where: str):
    """Check `value` against a field's annotation (str, int, float, bool, lists, tuples, Optional)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where)
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of fields")
        item = annotation()
        apply_mapping(item, value, f"{where}.")
        return item
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        if origin is tuple and len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        items = [coerce(v, args[i] if origin is tuple else args[0], f"{where}[{i}]")
                 for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {annotation}")


def apply_mapping(section, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    names = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; known keys of '{prefix.rstrip('.') or 'config'}'"
                              f" are {', '.join(sorted(names))}")
        setattr(section, key, coerce(value, hints[key], f"{prefix}{key}"))


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.steps=20' -> (['train', 'steps'], 20); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.field=value, e.g. train.steps=20")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""

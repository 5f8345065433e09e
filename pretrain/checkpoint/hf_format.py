"""The released LLaDA Hugging Face format, described once for export and import.

The released checkpoints (GSAI-ML/LLaDA-8B-Base, -Instruct) carry a `config.json` whose class
defaults are not LLaDA's, so every field is written explicitly; tensor names are the training
model's own (`model.transformer.blocks.{i}.q_proj.weight`, ...), so the only translation is of
the config. The tensors a config implies are read off the training model built on the meta
device, so the expected list can never drift from the model.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

import torch

from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig

ARCHITECTURE = "LLaDAModelLM"
MODELING_FILES = ("configuration_llada.py", "modeling_llada.py")

# Every field of the released LLaDA-8B config.json, with its released value. Fields the
# training config describes are overwritten from it on export (`released_config`).
RELEASED_FIELDS: dict = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": [ARCHITECTURE], "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081,
    "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 32,
    "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3",
    "use_cache": False, "vocab_size": 126464, "weight_tying": False,
}

# Released fields that select an architecture this stack does not implement: the supported value.
SUPPORTED_VALUES = {
    "alibi": False, "rope": True, "block_type": "llama", "layer_norm_type": "rms",
    "include_bias": False, "include_qkv_bias": False, "scale_logits": False,
    "attention_layer_norm": False, "input_emb_norm": False, "bias_for_layer_norm": False,
    "layer_norm_with_affine": True,
}
_ACTIVATIONS = ("silu", "swiglu")
_COPIED = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "max_sequence_length",
           "rope_theta", "rms_norm_eps", "weight_tying")


class FormatError(ValueError):
    """A directory or checkpoint that does not fit the released format; the message lists why."""


def released_config(model: ModelConfig, special_ids: dict[str, int]) -> dict:
    """config.json for `model`: every released field, explicitly, sorted as the release writes it."""
    if model.causal:
        raise FormatError("model.causal is true (the autoregressive baseline): the released LLaDA "
                          "format describes the bidirectional masked diffusion model only")
    out = dict(RELEASED_FIELDS)
    out.update({name: getattr(model, name) for name in _COPIED})
    out.update(vocab_size=model.vocab_size, embedding_size=model.vocab_size,
               init_cutoff_factor=model.init_cutoff_factor,
               mask_token_id=special_ids["mask"], eos_token_id=special_ids["eos"],
               pad_token_id=special_ids["eos"])
    try:
        out["transformers_version"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        pass
    return dict(sorted(out.items()))


def model_config_from_released(config: dict, where: str) -> ModelConfig:
    """The training model's config for a released-format config.json (`where` names the file)."""
    problems = []
    if config.get("model_type") != "llada":
        problems.append(f"model_type is {config.get('model_type')!r}, expected 'llada'")
    for field, supported in SUPPORTED_VALUES.items():
        if field in config and config[field] != supported:
            problems.append(f"{field} is {config[field]!r}; only {supported!r} is supported")
    if config.get("activation_type", "silu") not in _ACTIVATIONS:
        problems.append(f"activation_type is {config['activation_type']!r}; only silu/swiglu is supported")
    missing = [f for f in ("d_model", "n_layers", "n_heads") if f not in config]
    if missing:
        problems.append(f"missing field(s) {', '.join(missing)}")
    if problems:
        raise FormatError(f"{where}: " + "; ".join(problems))
    d_model = config["d_model"]
    n_kv_heads = config.get("n_kv_heads") or (1 if config.get("multi_query_attention") else config["n_heads"])
    defaults = ModelConfig()
    model = ModelConfig(
        d_model=d_model, n_layers=config["n_layers"], n_heads=config["n_heads"], n_kv_heads=n_kv_heads,
        mlp_hidden_size=config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * d_model,
        vocab_size=config.get("embedding_size") or config["vocab_size"],
        max_sequence_length=config.get("max_sequence_length", defaults.max_sequence_length),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        weight_tying=bool(config.get("weight_tying", False)),
        init_cutoff_factor=float(config.get("init_cutoff_factor") or defaults.init_cutoff_factor))
    problems = model.problems()
    if problems:
        raise FormatError(f"{where}: " + "; ".join(problems))
    return model


def expected_tensors(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a model with this config, in the training model's order."""
    with torch.device("meta"):
        meta = LLaDAModel(dataclasses.replace(model), init_seed=None)
    return {name: tuple(p.shape) for name, p in meta.named_parameters()}


def tensor_problems(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Missing, unexpected and wrongly shaped tensors, one line per kind (empty when they match)."""
    out = []
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    shapes = [f"{n} is {list(found[n])}, expected {list(expected[n])}"
              for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if names:
            shown = "; ".join(names[:12]) + (f"; ... ({len(names)} in all)" if len(names) > 12 else "")
            out.append(f"{label}: {shown}")
    return out


def require_tensors(found: dict, expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise FormatError listing every missing, unexpected and wrongly shaped tensor; `found` maps
    names to objects with a `shape` (safetensors entries); `where` opens the message."""
    problems = tensor_problems({name: entry.shape for name, entry in found.items()}, expected)
    if problems:
        raise FormatError(f"{where}:\n  " + "\n  ".join(problems))

"""Small weights checkpoints for the tests of the tools that read them (export, generate,
evaluate, lm-eval), written directly in the layout the trainer publishes (`model.safetensors`,
`config.yaml` with the model section, `tokenizer.json`) without a training run."""

import sysconfig
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from data_pipeline.tokenizer import TokenizerInfo, train_bpe
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig

TINY = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=96,
                   vocab_size=320, max_sequence_length=128)


def stdlib_tokenizer(path: Path) -> TokenizerInfo:
    """A 320-token byte-level BPE trained on the standard library's json package (about 1 s)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
    return train_bpe(files, 320, path)


def write_checkpoint(directory: Path, weights: dict[str, torch.Tensor], model: ModelConfig,
                     tokenizer: Path) -> Path:
    directory.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in weights.items()}, str(directory / "model.safetensors"))
    (directory / "config.yaml").write_text(yaml.safe_dump({"model": model.__dict__}))
    (directory / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return directory


def eos_ending_checkpoint(root: Path) -> Path:
    """A random tiny model whose EOS head row copies (x 1.05) the row of a token it often
    predicts, so answers end at different steps for different prompts."""
    tok = stdlib_tokenizer(root / "tokenizer.json")
    weights = {n: p.detach().clone() for n, p in LLaDAModel(TINY, init_seed=5).named_parameters()}
    head = weights["model.transformer.ff_out.weight"]
    head[tok.eos_id] = head[160] * 1.05
    return write_checkpoint(root / "ckpt", weights, TINY, root / "tokenizer.json")

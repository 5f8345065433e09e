"""Export of whole weights to the released LLaDA Hugging Face format (`python -m pretrain.export_hf`).

Every checkpoint, whatever its layout (one process, ZeRO-3 partitions, tensor-parallel shards),
publishes the whole weights as `model.safetensors` (ZeRO partitions gathered, TP shards
concatenated along each weight's partition dimension at save time), beside `config.yaml` and
`tokenizer.json`; export reads those (or a released-format directory, as every loader does).
The output is what `AutoModel.from_pretrained(out, trust_remote_code=True)` and the downstream
tools expect: `config.json` with every released field, the stand-alone
`configuration_llada.py` / `modeling_llada.py`, safetensors shards with
`model.safetensors.index.json` under the released tensor names, tokenizer files and
`generation_config.json`. Tensors stream one at a time (host memory stays near a few times the
largest tensor), and the directory appears under its name only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml

from data_pipeline.tokenizer import SPECIAL_TOKENS, TokenizerInfo, check_fits_model, load_tokenizer
from pretrain.checkpoint.hf_format import MODELING_FILES, expected_tensors, released_config, require_tensors
from pretrain.checkpoint.safetensors_stream import PlannedTensor, read_tensor, write_sharded
from pretrain.checkpoint.store import read_trainer_state
from pretrain.checkpoint.weights import new_directory, weights_checkpoint, weights_source

# The stand-alone modeling code an export carries (`hf_modeling/`, beside this module).
MODELING_SOURCE = Path(__file__).resolve().parent / "hf_modeling"

# The released Instruct model's chat format (Llama-3 style), as `data_pipeline.sft` renders it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def tokenizer_files(tok: TokenizerInfo, model_max_length: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for `PreTrainedTokenizerFast`."""
    special = {"bos_token": SPECIAL_TOKENS["bos"], "eos_token": SPECIAL_TOKENS["eos"],
               "pad_token": SPECIAL_TOKENS["eos"], "mask_token": SPECIAL_TOKENS["mask"]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"],
              "model_max_length": model_max_length, "chat_template": CHAT_TEMPLATE}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
           max_shard_bytes: int = 5 * 10 ** 9, log=print) -> dict:
    """Write the export of `checkpoint` (a step directory, or a checkpoints root: its newest; a
    released-format directory is read too, as every loader reads it) to `out`, which must not
    exist yet; returns the weight index."""
    with new_directory(Path(out)) as tmp:
        model, entries, tokenizer_path, source = weights_source(checkpoint)
        tok = load_tokenizer(tokenizer_path)
        check_fits_model(tok, model.vocab_size)
        expected = expected_tensors(model)
        require_tensors(entries, expected, f"{source}: the weights do not match its model config")
        config = released_config(model, tok.special_ids)
        start = time.time()
        plan = [PlannedTensor(name, dtype, shape) for name, shape in expected.items()]
        index = write_sharded(tmp, plan, lambda name: read_tensor(entries[name]).to(dtype),
                              max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                      "pad_token_id": tok.eos_id, "mask_token_id": tok.mask_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        for name, content in tokenizer_files(tok, model.max_sequence_length).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        for name in MODELING_FILES:
            shutil.copyfile(MODELING_SOURCE / name, tmp / name)
    shards = len(set(index["weight_map"].values()))
    log(f"exported {source} -> {out}: {len(plan)} tensors, {index['metadata']['total_size'] / 1e9:.3f} GB "
        f"{dtype} in {shards} shard(s), {time.time() - start:.1f} s")
    return index


def unfinished(checkpoint: str | os.PathLike) -> str | None:
    """Why `checkpoint` (a step directory or a checkpoints root: its newest) is not its run's
    last step (`train.steps`; a preempted run's), or None when it is."""
    step_dir = weights_checkpoint(checkpoint)
    step = read_trainer_state(step_dir)["step"]
    steps = yaml.safe_load((step_dir / "config.yaml").read_text())["train"]["steps"]
    if step < steps:
        return f"{step_dir} is step {step} of {steps}; resume the run, then export"
    return None

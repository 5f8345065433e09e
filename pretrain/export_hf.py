"""Export a training checkpoint to the released LLaDA Hugging Face layout.

`python -m pretrain.export_hf --checkpoint DIR --out DIR [--dtype bf16|fp32] [--max-shard-size 5GB] [--if-finished]`

Every checkpoint, whatever its layout (one process, ZeRO-3 partitions, tensor-parallel shards),
publishes the whole weights as `model.safetensors` (ZeRO partitions gathered, TP shards
concatenated along each weight's partition dimension at save time), beside `config.yaml` and
`tokenizer.json`; export reads those. The output is what `AutoModel.from_pretrained(out,
trust_remote_code=True)` and the downstream tools expect: `config.json` with every released
field, the stand-alone `configuration_llada.py` / `modeling_llada.py`, safetensors shards with
`model.safetensors.index.json` under the released tensor names, tokenizer files and
`generation_config.json`. Tensors stream one at a time (host memory stays near a few times the
largest tensor), and the directory appears under its name only once complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from data_pipeline.tokenizer import SPECIAL_TOKENS, TokenizerInfo, check_fits_model, load_tokenizer
from pretrain.checkpoint.hf_format import (
    MODELING_FILES,
    FormatError,
    expected_tensors,
    released_config,
    require_tensors,
)
from pretrain.checkpoint.safetensors_stream import PlannedTensor, parse_size, read_tensor, write_sharded
from pretrain.checkpoint.store import read_trainer_state
from pretrain.checkpoint.weights import new_directory, weights_checkpoint, weights_source

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
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
    released-layout directory is read too, as every loader reads it) to `out`, which must not
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a step_XXXXXXXX directory, or a checkpoints directory (its newest step)")
    parser.add_argument("--out", required=True, help="the directory to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="weight dtype of the export (the release is bf16)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 5GB, 500MB")
    parser.add_argument("--if-finished", action="store_true",
                        help="export only a checkpoint of its run's last step (train.steps); for an "
                             "earlier one (a preempted run) say so and exit 0 without writing")
    args = parser.parse_args(argv)
    try:
        if args.if_finished:
            step_dir = weights_checkpoint(args.checkpoint)
            step = read_trainer_state(step_dir)["step"]
            steps = yaml.safe_load((step_dir / "config.yaml").read_text())["train"]["steps"]
            if step < steps:
                print(f"export skipped: {step_dir} is step {step} of {steps}; resume the run, then export")
                return 0
        export(args.checkpoint, args.out, DTYPES[args.dtype], parse_size(args.max_shard_size))
    except (FormatError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

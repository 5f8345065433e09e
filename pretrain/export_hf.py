"""Export a training checkpoint to the released LLaDA Hugging Face format.

`python -m pretrain.export_hf --checkpoint DIR --out DIR [--dtype bf16|fp32] [--max-shard-size 5GB] [--if-finished]`

Every checkpoint, whatever its layout (one process, ZeRO-3 partitions, tensor-parallel shards),
publishes the whole weights as `model.safetensors` (ZeRO partitions gathered, TP shards
concatenated along each weight's partition dimension at save time), beside `config.yaml` and
`tokenizer.json`; export reads those. The output is what `AutoModel.from_pretrained(out,
trust_remote_code=True)` and the downstream tools expect: `config.json` with every released
field, the stand-alone `configuration_llada.py` / `modeling_llada.py`, safetensors shards with
`model.safetensors.index.json` under the released tensor names, tokenizer files and
`generation_config.json`. Tensors stream one at a time (host memory stays near a few times the
largest tensor), and the directory appears under its name only once complete. The export itself
is `pretrain.checkpoint.hf_export`. A bad path, an occupied --out or a checkpoint that is not a
model is one line on stderr and exit code 2 (the README's exit-code table).
"""

from __future__ import annotations

import argparse
import sys

import torch

from pretrain.checkpoint.hf_export import export, unfinished
from pretrain.checkpoint.safetensors_stream import parse_size
from pretrain.checkpoint.weights import WEIGHTS_ERRORS
from pretrain.runtime.exit_codes import USAGE, UsageError, command_failures, run_command

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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
    return run_command(lambda: export_checkpoint(args),
                       command_failures("export_hf", dict.fromkeys((UsageError, FileExistsError, *WEIGHTS_ERRORS),
                                                                   USAGE)))


def export_checkpoint(args: argparse.Namespace) -> int:
    """Export --checkpoint to --out (or, with --if-finished, say why not)."""
    try:
        max_shard_bytes = parse_size(args.max_shard_size)
    except ValueError as error:
        raise UsageError(f"--max-shard-size: {error}") from None
    if args.if_finished and (reason := unfinished(args.checkpoint)):
        print(f"export skipped: {reason}")
        return 0
    export(args.checkpoint, args.out, DTYPES[args.dtype], max_shard_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The model and sampler flags of the sampling commands (generate, chat, evaluate), in one place.

`add_model_flags` says which model to load and how to lay it out over ranks; `add_sampler_flags`
exposes every field of `SamplerConfig` (the official sampler and fast decoding), and
`sampler_config` turns them back into a checked config (a `UsageError` names the bad values).
`run_sampling_command` runs a command's work with its predictable failures as one line and exit 2.
"""

from __future__ import annotations

import argparse
from typing import Callable

from pretrain.checkpoint.weights import WEIGHTS_ERRORS
from pretrain.diffusion.sampling import (
    CACHE_MODES,
    CONFIDENCE_DTYPES,
    CONFIDENCE_EOS_EOT,
    LOGITS_AT,
    REMASKING,
    SamplerConfig,
)
from pretrain.inference.loading import InferenceModel, load_model
from pretrain.runtime.exit_codes import USAGE, UsageError, command_failures, run_command


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """The sampler's options as flags (shared with `pretrain.chat`)."""
    d = SamplerConfig()
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--gen-length", type=int, default=d.gen_length)
    parser.add_argument("--block-length", type=int, default=d.block_length,
                        help="< gen-length: semi-autoregressive blocks")
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--cfg-scale", type=float, default=d.cfg_scale,
                        help="classifier-free guidance (prompt fully masked in the unconditional branch)")
    parser.add_argument("--remasking", choices=REMASKING, default=d.remasking)
    parser.add_argument("--logits-eos-inf", action="store_true", help="never predict EOS")
    parser.add_argument("--confidence-eos-eot", choices=CONFIDENCE_EOS_EOT, default=d.confidence_eos_eot,
                        help="official: the official flag (EOS's and EoT's confidence zeroed at "
                             "temperature 0, EoT's alone above it); both: EOS's and EoT's at every temperature")
    parser.add_argument("--confidence-dtype", choices=CONFIDENCE_DTYPES, default=d.confidence_dtype,
                        help="softmax of the confidence: model (the logits' dtype, as the official code) "
                             "or float64 (as Fast-dLLM)")
    parser.add_argument("--logits-at", choices=LOGITS_AT, default=d.logits_at,
                        help="block: the LM head, softmax and argmax at the current block only (the same "
                             "tokens at temperature 0, less work; above it the noise covers the block only)")
    parser.add_argument("--no-stop-at-eos", action="store_true",
                        help="run every step even when every answer has ended")
    parser.add_argument("--threshold", type=float, default=d.threshold,
                        help="parallel decoding: reveal every masked token of the block whose confidence "
                             "is >= this (at least one per step; --steps is then unused)")
    parser.add_argument("--cache", choices=CACHE_MODES, default=d.cache,
                        help="block-wise approximate KV cache: prefix (prompt and finished blocks cached) "
                             "or dual (everything outside the current block cached)")
    parser.add_argument("--cache-refresh-every", type=int, default=d.cache_refresh_every,
                        help="with --cache: also refresh it every N steps of a block (default: at each "
                             "block's start only; 1: every step, exact)")
    parser.add_argument("--seed", type=int, default=0, help="seeds temperature and random remasking")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Which model to load and how to lay it out (shared with `pretrain.chat` and `pretrain.evaluate`)."""
    parser.add_argument("--model", required=True, help="training checkpoint or released-format directory")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=3, choices=(0, 3),
                        help="under a launcher: 3 partitions the weights over data-parallel ranks, "
                             "0 keeps a whole copy (or TP shard) on each")
    parser.add_argument("--fuse-projections", action="store_true",
                        help="one q/k/v and one gate/up matmul per block: the same model, fewer kernels")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)


def sampler_config(args: argparse.Namespace) -> SamplerConfig:
    config = SamplerConfig(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                           temperature=args.temperature, cfg_scale=args.cfg_scale,
                           remasking=args.remasking, logits_eos_inf=args.logits_eos_inf,
                           confidence_eos_eot=args.confidence_eos_eot, confidence_dtype=args.confidence_dtype,
                           logits_at=args.logits_at, stop_at_eos=not args.no_stop_at_eos,
                           threshold=args.threshold, cache=args.cache, cache_refresh_every=args.cache_refresh_every)
    problems = config.problems()
    if problems:
        raise UsageError("; ".join(problems))
    return config


def open_model(args: argparse.Namespace) -> InferenceModel:
    return load_model(args.model, dtype=args.dtype, tensor_parallel=args.tensor_parallel,
                      zero_stage=args.zero_stage, fuse_projections=args.fuse_projections)


def run_sampling_command(command: str, action: Callable[[], int | None],
                         usage_errors: tuple[type[BaseException], ...] = ()) -> int:
    """`action()`'s exit code; a bad flag, path or model (or one of `usage_errors`) is the line
    `<command> error: <message>` on stderr and exit code 2 (`pretrain.runtime.exit_codes`)."""
    return run_command(action, command_failures(command, dict.fromkeys((UsageError, *WEIGHTS_ERRORS, *usage_errors),
                                                                       USAGE)))

"""Sample from a LLaDA model: `python -m pretrain.generate --model DIR --prompt TEXT [options]`.

DIR is a training checkpoint (a `step_XXXXXXXX` directory or a checkpoints directory) or a
released-layout directory (GSAI-ML/LLaDA-8B-Base / -Instruct as downloaded, or an export).
Prompts come from `--prompt` (repeatable), `--prompts-file` (one per line, or a .jsonl of
{"prompt": ...}) or `--prompt-ids 1,2,3`; `--chat` wraps each prompt as a user turn of the chat
template (for Instruct models). Every sampler option is a flag (see `pretrain/sampling.py`).
Prompts are batched (`--batch-size`), left-padded with an attention mask. Output: each prompt
followed by its answer (cut at the first EOS), or with `--json` one JSON object per prompt (prompt ids,
answer ids and text, the denoising steps its batch ran, and with `--reveal-steps` the step that
revealed each generated token). Fast decoding (confidence threshold, block-wise KV cache:
`--threshold`, `--cache`, `--cache-refresh-every`) is described in `pretrain/sampling.py`.
`--denoising-html FILE` / `--denoising-png FILE` draw the first prompt's denoising: its answer
with each token coloured by the step that revealed it (`pretrain/denoising_view.py`).

Under a launcher (`torchrun --nproc_per_node N -m pretrain.generate ...` or `deepspeed`) the
model is sharded (ZeRO-3 by default, `--tensor-parallel`), prompts are split over the
data-parallel ranks with dummy padding, every rank runs the same number of forwards, and rank 0
prints the results in prompt order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data_pipeline.eval_sampler import gather_in_order, shard_examples
from data_pipeline.seeding import keyed_generator
from data_pipeline.sft import ChatTemplate
from parallel import engine as ds
from pretrain.denoising_view import DenoisingView, write_html, write_png
from pretrain.inference import InferenceModel, load_model
from pretrain.sampling import (CACHE_MODES, CONFIDENCE_EOS_EOT, REMASKING, SamplerConfig, all_ranks_agree,
                               generate, left_pad, strip_at_eos)


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
                        help="official: EoT's confidence zeroed (the official flag's behaviour); "
                             "both: EOS's and EoT's (the intended one)")
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
    parser.add_argument("--model", required=True, help="training checkpoint or released-layout directory")
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
                           confidence_eos_eot=args.confidence_eos_eot, stop_at_eos=not args.no_stop_at_eos,
                           threshold=args.threshold, cache=args.cache, cache_refresh_every=args.cache_refresh_every)
    problems = config.problems()
    if problems:
        raise SystemExit("generate: " + "; ".join(problems))
    return config


def open_model(args: argparse.Namespace) -> InferenceModel:
    return load_model(args.model, dtype=args.dtype, tensor_parallel=args.tensor_parallel,
                      zero_stage=args.zero_stage, fuse_projections=args.fuse_projections)


def sample_prompts(model: InferenceModel, prompts: list[list[int]], config: SamplerConfig,
                   batch_size: int, key: tuple, cut_at_eot: bool = False) -> list[dict]:
    """Answers to every prompt, in order, as {"ids", "reveal_steps", "steps_run"} (the forwards its
    batch took): this rank's share in left-padded batches, each with a generator keyed by `key`
    and the index of its first prompt (-1 for a dummy), then gathered from every data-parallel
    rank. cut_at_eot: answers also end at the first EoT (chat answers end there)."""
    tok = model.tokenizer
    eot = tok.special_ids["eot"]
    share = shard_examples(prompts, model.dp_rank, model.dp_size)
    agree = all_ranks_agree if model.distributed else (lambda done: done)
    results = []
    for start in range(0, len(share), batch_size):
        batch = share[start:start + batch_size]
        ids, mask = left_pad([p for _, p in batch], tok.eos_id, device=model.device)
        first = -1 if batch[0][0] is None else batch[0][0]
        sample = generate(model, ids, mask_id=tok.mask_id, eos_id=tok.eos_id, eot_id=eot, config=config,
                          attention_mask=mask if not bool(mask.all()) else None,
                          generator=keyed_generator(*key, first, device=model.device), agree=agree)
        for row, answer in enumerate(sample.answers(tok.eos_id)):
            if cut_at_eot:
                answer = strip_at_eos(answer, eot)
            results.append({"ids": answer, "reveal_steps": sample.reveal_step[row, :len(answer)].tolist(),
                            "steps_run": sample.steps_run})
    return gather_in_order(results, [index for index, _ in share], group=model.dp_group)


def read_prompts(args: argparse.Namespace, model: InferenceModel) -> list[list[int]]:
    tok = model.tokenizer
    texts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            for number, line in enumerate(lines, start=1):
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise SystemExit(f"{path}:{number}: expected an object with a string field 'prompt'")
                texts.append(record["prompt"])
        else:
            texts.extend(lines)
    if args.chat:
        chat = ChatTemplate(tok)
        prompts = [chat.prompt([{"role": "user", "content": t}]) for t in texts]
    else:
        prompts = [tok.encode(t) for t in texts]
    if args.prompt_ids:
        prompts.append([int(i) for i in args.prompt_ids.split(",")])
    if not prompts or any(not p for p in prompts):
        raise SystemExit("generate: give non-empty prompts (--prompt, --prompts-file or --prompt-ids)")
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="one prompt per line, or .jsonl with a 'prompt' field")
    parser.add_argument("--prompt-ids", help="a prompt as comma-separated token ids")
    parser.add_argument("--chat", action="store_true",
                        help="wrap prompts in the chat template; answers end at the first EoT")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    parser.add_argument("--reveal-steps", action="store_true", help="with --json: the reveal step of each token")
    parser.add_argument("--denoising-html", metavar="FILE", help="the first prompt's denoising as an HTML page")
    parser.add_argument("--denoising-png", metavar="FILE", help="the first prompt's denoising as a PNG")
    add_model_flags(parser)
    add_sampler_flags(parser)
    args = parser.parse_args(argv)
    config = sampler_config(args)
    model = open_model(args)
    prompts = read_prompts(args, model)
    results = sample_prompts(model, prompts, config, args.batch_size, key=(args.seed, "generate"),
                             cut_at_eot=args.chat)
    if not model.distributed:
        print_results(model.tokenizer, prompts, results, args)
        draw_denoising(model.tokenizer, prompts[0], results[0], args)
        return 0
    if torch.distributed.get_rank() == 0:
        print_results(model.tokenizer, prompts, results, args)
        draw_denoising(model.tokenizer, prompts[0], results[0], args)
    ds.exit_together(0)


def draw_denoising(tok, prompt: list[int], result: dict, args: argparse.Namespace) -> None:
    """The requested pictures of one prompt's denoising."""
    if not (args.denoising_html or args.denoising_png):
        return
    view = DenoisingView.of(tok, prompt, result["ids"], result["reveal_steps"], result["steps_run"])
    for path, write in ((args.denoising_html, write_html), (args.denoising_png, write_png)):
        if path:
            print(f"denoising of prompt 0 written to {write(view, path)}", file=sys.stderr, flush=True)


def print_results(tok, prompts: list[list[int]], results: list[dict], args: argparse.Namespace) -> None:
    """JSON lines, or each prompt followed by its answer, separated by rules."""
    for number, (prompt, result) in enumerate(zip(prompts, results)):
        text = tok.decode(result["ids"])
        if args.json:
            record = {"prompt_ids": prompt, "ids": result["ids"], "text": text, "steps_run": result["steps_run"]}
            if args.reveal_steps:
                record["reveal_steps"] = result["reveal_steps"]
            print(json.dumps(record), flush=True)
        else:
            rule = "" if number == 0 else "-" * 72 + "\n"
            print(f"{rule}{tok.decode(prompt, skip_special_tokens=True)}{text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

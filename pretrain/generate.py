"""Sample from a LLaDA model: `python -m pretrain.generate --model DIR --prompt TEXT [options]`.

DIR is a training checkpoint (a `step_XXXXXXXX` directory or a checkpoints directory) or a
released-format directory (GSAI-ML/LLaDA-8B-Base / -Instruct as downloaded, or an export).
Prompts come from `--prompt` (repeatable), `--prompts-file` (one per line, or a .jsonl of
{"prompt": ...}) or `--prompt-ids 1,2,3`; `--chat` wraps each prompt as a user turn of the chat
template (for Instruct models). Every sampler option is a flag (`pretrain/inference/flags.py`).
Prompts are batched (`--batch-size`), left-padded with an attention mask. Output: each prompt
followed by its answer (cut at the first EOS), or with `--json` one JSON object per prompt (prompt ids,
answer ids and text, the denoising steps its batch ran, and with `--reveal-steps` the step that
revealed each generated token). Fast decoding (confidence threshold, block-wise KV cache:
`--threshold`, `--cache`, `--cache-refresh-every`) is described in `pretrain/diffusion/sampling.py`.
`--denoising-html FILE` / `--denoising-png FILE` draw the first prompt's denoising: its answer
with each token coloured by the step that revealed it (`pretrain/inference/denoising_view.py`).

Under a launcher (`torchrun --nproc_per_node N -m pretrain.generate ...` or `deepspeed`) the
model is sharded (ZeRO-3 by default, `--tensor-parallel`), prompts are split over the
data-parallel ranks with dummy padding, every rank runs the same number of forwards, and rank 0
prints the results in prompt order. A bad flag, path or prompts file is one line on stderr and
exit code 2 (every command's codes: the README's exit-code table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_pipeline.sft import ChatTemplate
from parallel import engine as ds
from pretrain.inference.batched import sample_prompts
from pretrain.inference.denoising_view import DenoisingView, write_html, write_png
from pretrain.inference.flags import (
    add_model_flags,
    add_sampler_flags,
    open_model,
    run_sampling_command,
    sampler_config,
)
from pretrain.inference.loading import InferenceModel
from pretrain.runtime.exit_codes import UsageError

PROMPTS_FILE_FORMS = 'give a text file (one prompt per line) or a .jsonl file of {"prompt": TEXT} objects'


def token_ids(text: str) -> list[int]:
    """`--prompt-ids 1,2,3` as a list (argparse turns the ValueError into a usage error, exit 2)."""
    return [int(i) for i in text.split(",")]


def prompt_texts(args: argparse.Namespace) -> list[str]:
    """The text prompts: every --prompt, then the lines of --prompts-file (read before the model loads)."""
    texts = list(args.prompt or [])
    if args.prompts_file:
        texts += read_prompts_file(Path(args.prompts_file))
    return texts


def read_prompts_file(path: Path) -> list[str]:
    """Its non-empty lines, or of a .jsonl file each line's 'prompt'; a bad file or line is a `UsageError`
    naming it (file:line) and the accepted forms."""
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a file"
        raise UsageError(f"--prompts-file {path} {what}; {PROMPTS_FILE_FORMS}")
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    if path.suffix != ".jsonl":
        return [line for _, line in lines]
    texts = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"--prompts-file {path}:{number}: not valid JSON ({error.msg}); "
                             f"{PROMPTS_FILE_FORMS}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UsageError(f"--prompts-file {path}:{number}: expected an object with a string field 'prompt'")
        texts.append(record["prompt"])
    return texts


def encode_prompts(texts: list[str], args: argparse.Namespace, model: InferenceModel) -> list[list[int]]:
    """Token ids of the text prompts (wrapped in the chat template with --chat), then --prompt-ids."""
    tok = model.tokenizer
    if args.chat:
        chat = ChatTemplate(tok)
        prompts = [chat.prompt([{"role": "user", "content": t}]) for t in texts]
    else:
        prompts = [tok.encode(t) for t in texts]
    if args.prompt_ids:
        prompts.append(args.prompt_ids)
    if not prompts or any(not p for p in prompts):
        raise UsageError("give non-empty prompts (--prompt, --prompts-file or --prompt-ids)")
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="one prompt per line, or .jsonl with a 'prompt' field")
    parser.add_argument("--prompt-ids", type=token_ids, help="a prompt as comma-separated token ids")
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
    return run_sampling_command("generate", lambda: generate(args))


def generate(args: argparse.Namespace) -> int:
    config = sampler_config(args)
    texts = prompt_texts(args)
    model = open_model(args)
    prompts = encode_prompts(texts, args, model)
    results = sample_prompts(model, prompts, config, args.batch_size, key=(args.seed, "generate"),
                             cut_at_eot=args.chat)
    if not model.distributed:
        print_results(model.tokenizer, prompts, results, args)
        draw_denoising(model.tokenizer, prompts[0], results[0], args)
        return 0
    if ds.rank() == 0:
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

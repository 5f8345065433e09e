"""Talk to an Instruct model: `python -m pretrain.chat --model DIR [--system TEXT] [sampler flags]`.

Multi-turn through the chat template: every turn renders the whole dialogue so far (BOS, each
message as `<|start_header_id|>role<|end_header_id|>\\n\\n content<|eot_id|>`, then the
assistant header), samples the answer with the reverse process, cuts it at the first EOS or
EoT, and keeps its text as the assistant message of the next turn. Lines starting with `/`
are commands: `/reset` forgets the dialogue, `/quit` (or end of input) leaves. One process;
the model is loaded as `pretrain.generate` loads it, and a bad flag or path is one line on
stderr and exit code 2 (the README's exit-code table).
"""

from __future__ import annotations

import argparse
import sys

import torch

from data_pipeline.seeding import keyed_generator
from data_pipeline.sft import ChatTemplate
from pretrain.diffusion.sampling import generate, strip_at_eos
from pretrain.inference.flags import (
    add_model_flags,
    add_sampler_flags,
    open_model,
    run_sampling_command,
    sampler_config,
)
from pretrain.inference.loading import InferenceModel
from pretrain.runtime.exit_codes import UsageError


def answer(model: InferenceModel, dialogue: list[dict], config, seed: int, turn: int) -> str:
    """The assistant's reply to `dialogue` (messages so far), without special tokens."""
    tok = model.tokenizer
    chat = ChatTemplate(tok)
    prompt = torch.tensor([chat.prompt(dialogue)], device=model.device)
    sample = generate(model, prompt, mask_id=tok.mask_id, eos_id=tok.eos_id, eot_id=chat.eot_id,
                      config=config, generator=keyed_generator(seed, "chat", turn, device=model.device))
    reply = strip_at_eos(sample.answers(tok.eos_id)[0], chat.eot_id)
    return tok.decode(reply, skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", help="a system message opening the dialogue")
    add_model_flags(parser)
    add_sampler_flags(parser)
    args = parser.parse_args(argv)
    return run_sampling_command("chat", lambda: converse(args))


def converse(args: argparse.Namespace) -> int:
    """Answer every line of stdin until /quit or the end of input."""
    config = sampler_config(args)
    model = open_model(args)
    if model.distributed:
        raise UsageError("chat runs in one process; use pretrain.generate under a launcher")
    opening = [{"role": "system", "content": args.system}] if args.system else []
    dialogue = list(opening)
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        text = line.strip()
        if text == "/reset":
            dialogue = list(opening)
            print("(dialogue reset)", flush=True)
            continue
        if not text:
            continue
        dialogue.append({"role": "user", "content": text})
        reply = answer(model, dialogue, config, args.seed, turn)
        dialogue.append({"role": "assistant", "content": reply})
        turn += 1
        print(f"llada> {reply}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

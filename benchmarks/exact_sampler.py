"""The exact sampler that computes logits at the current block only, against the official algorithm.

    python benchmarks/exact_sampler.py [--prompts 2] [--prompt-length 64] [--gen-length 128]
        [--block-length 32] [--repeats 3] [--threads 1]

A model whose LM head takes about the share of a forward's matmul FLOPs that LLaDA 8B's does
(d_model 256, 4 layers, FFN 768, the vocabulary of a 1024-token BPE trained on the standard
library: 7.1%, against 6.9% for LLaDA 8B; both printed) is initialised at random, exported to
the released format (`pretrain.checkpoint.hf_export`) and loaded with
`AutoModel.from_pretrained(..., trust_remote_code=True)`. Three decoders then answer the same
prompts (one left-padded batch, temperature 0, low-confidence remasking, no early stop) through
that one Hugging Face model:
- official: a transcription of the official `generate` at its head (the one the tests compare
  against, `tests/support/official_reverse_process.py`): every step scores the whole sequence;
- sequence: this stack's sampler (`pretrain.diffusion.sampling`) with `logits_at="sequence"`;
- block: the same with `logits_at="block"`: the final norm, the LM head, the softmax and the
  argmax from the first masked position to the current block's end only (`logits_positions`).
The table gives the best wall time of `--repeats` interleaved passes, the ratio to the official
decoder, and whether the tokens and reveal steps are identical to the official ones. Figures
and the commands that produced them: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from data_pipeline.corpus import stdlib_corpus_files
from data_pipeline.tokenizer import train_bpe
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from pretrain.checkpoint.hf_export import export
from pretrain.diffusion.sampling import SamplerConfig, generate, left_pad

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from support.official_reverse_process import official_generate  # noqa: E402  (the tests' transcription)

LLADA_8B = ModelConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                       vocab_size=126464)


def head_share(config: ModelConfig) -> float:
    """The LM head's share of a forward's matmul FLOPs per token (attention scores left out)."""
    d, kv = config.d_model, config.n_kv_heads * config.head_dim
    blocks = config.n_layers * (2 * d * d + 2 * d * kv + 3 * d * config.mlp_hidden_size)
    head = d * config.vocab_size
    return head / (blocks + head)


def exported_model(directory: Path, max_length: int):
    """A random model of the benchmark's shape in the released format, loaded through transformers."""
    from transformers import AutoModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = train_bpe(stdlib_corpus_files(2_000_000), 1024, directory / "tokenizer.json")
    config = ModelConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=768,
                         vocab_size=tokenizer.vocab_size, max_sequence_length=max_length)
    model = LLaDAModel(config, init_seed=0)
    step = directory / "step_00000000"
    step.mkdir()
    save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, str(step / "model.safetensors"))
    (step / "config.yaml").write_text(yaml.safe_dump({"model": config.__dict__}))
    (step / "tokenizer.json").write_bytes((directory / "tokenizer.json").read_bytes())
    export(step, directory / "hf", torch.float32, log=lambda *_: None)
    hf = AutoModel.from_pretrained(directory / "hf", trust_remote_code=True).eval()
    return hf, tokenizer, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf, tok, config = exported_model(Path(tmp), args.prompt_length + args.gen_length)
    corpus = tok.encode(stdlib_corpus_files(2_000_000)[1].read_text())
    rows = [corpus[i * 97:i * 97 + args.prompt_length - i] for i in range(args.prompts)]  # different lengths
    prompt, attention_mask = left_pad(rows, pad_id=tok.eos_id)

    @torch.no_grad()
    def logits(ids, attention_mask=None, **forward):
        return hf(input_ids=ids, attention_mask=attention_mask, **forward).logits

    steps = args.gen_length
    ids = dict(mask_id=tok.mask_id, eos_id=tok.eos_id, eot_id=tok.special_ids["eot"])
    decoders = {
        "official (transcription of the official generate)": lambda: official_generate(
            logits, prompt, steps, args.gen_length, args.block_length, attention_mask=attention_mask, **ids),
        **{f"this sampler, logits_at={at}": (lambda at=at: astuple(generate(
            logits, prompt, **ids, attention_mask=attention_mask,
            config=SamplerConfig(steps=steps, gen_length=args.gen_length, block_length=args.block_length,
                                 stop_at_eos=False, logits_at=at)))) for at in ("sequence", "block")},
    }
    best = {name: float("inf") for name in decoders}
    outputs = {}
    for _ in range(args.repeats):
        for name, decode in decoders.items():  # interleaved: other load on the machine moves them alike
            start = time.perf_counter()
            outputs[name] = decode()
            best[name] = min(best[name], time.perf_counter() - start)
    reference = next(iter(outputs.values()))
    official = best[next(iter(best))]
    print(f"exact sampler: {args.prompts} prompts of {args.prompt_length - args.prompts + 1}-{args.prompt_length} "
          f"tokens, gen_length {args.gen_length}, block_length {args.block_length}, {steps} steps, greedy; "
          f"model d_model {config.d_model}, {config.n_layers} layers, vocab {config.vocab_size} (LM head "
          f"{head_share(config):.1%} of matmul FLOPs; LLaDA 8B: {head_share(LLADA_8B):.1%}); fp32 on CPU, "
          f"{args.threads} thread(s); best of {args.repeats}\n")
    print("| decoder | seconds | time / official | tokens and reveal steps = official |")
    print("|---|---:|---:|---|")
    for name in decoders:
        same = all(torch.equal(a, b) for a, b in zip(outputs[name], reference))
        print(f"| {name} | {best[name]:.2f} | {best[name] / official:.3f} | {'yes' if same else 'NO'} |")
    return 0


def astuple(sample) -> tuple[torch.Tensor, torch.Tensor]:
    """A Sample as the transcription returns it: (sequence, reveal steps)."""
    return sample.ids, sample.reveal_step


if __name__ == "__main__":
    sys.exit(main())

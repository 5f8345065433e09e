"""The reverse process: LLaDA's sampler as the official `generate` defines it.

Starting from `gen_length` mask tokens after the prompt, `steps` denoising steps are split
evenly over blocks of `block_length` (semi-autoregressive when block_length < gen_length).
Within a block, step i reveals `mask_count // steps_per_block` tokens, the first
`mask_count % steps_per_block` steps one more. Each step predicts every masked position
(argmax, after Gumbel-max noise in float64 when temperature > 0) and keeps the k most
confident predictions (`low_confidence`) or k random ones (`random`), never outside the
current block. Algorithm 4 of the paper remasks each token with probability s/t; this follows
the official code, which reveals exactly k per step.

`model_fn` is any callable mapping token ids [b, s] to logits [b, s, vocab], so the sampler
serves the training model and an exported one alike.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def transfer_counts(mask_counts: torch.Tensor, steps: int) -> torch.Tensor:
    """[b] masked counts of a block -> [b, steps] tokens to reveal per step (remainder first)."""
    base = mask_counts // steps
    remainder = mask_counts % steps
    counts = base[:, None].repeat(1, steps)
    counts += torch.arange(steps, device=mask_counts.device)[None, :] < remainder[:, None]
    return counts


def gumbel_perturbed(logits: torch.Tensor, temperature: float, generator: torch.Generator | None):
    """Gumbel-max sampling in float64: argmax of exp(logits) / (-log u)^temperature."""
    if temperature == 0:
        return logits
    logits = logits.double()
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    return logits.exp() / (-torch.log(u)) ** temperature


@torch.no_grad()
def generate(model_fn: LogitsFn, prompt: torch.Tensor, *, mask_id: int, steps: int,
             gen_length: int, block_length: int, temperature: float = 0.0,
             remasking: str = "low_confidence", generator: torch.Generator | None = None
             ) -> torch.Tensor:
    """prompt [b, p] -> [b, p + gen_length] with every generated position revealed."""
    if gen_length % block_length:
        raise ValueError(f"block_length {block_length} must divide gen_length {gen_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps {steps} must be a multiple of the number of blocks {num_blocks}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking {remasking!r} is not 'low_confidence' or 'random'")
    steps_per_block = steps // num_blocks
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :p] = prompt
    for block in range(num_blocks):
        start, end = p + block * block_length, p + (block + 1) * block_length
        counts = transfer_counts((x[:, start:end] == mask_id).sum(dim=1), steps_per_block)
        for i in range(steps_per_block):
            is_masked = x == mask_id
            logits = model_fn(x)
            predicted = gumbel_perturbed(logits, temperature, generator).argmax(dim=-1)
            if remasking == "low_confidence":
                probs = F.softmax(logits.float(), dim=-1)
                confidence = probs.gather(-1, predicted[..., None]).squeeze(-1)
            else:
                confidence = torch.rand(predicted.shape, generator=generator, device=x.device)
            confidence[:, end:] = -torch.inf
            confidence = torch.where(is_masked, confidence, -torch.inf)
            for row in range(b):
                chosen = torch.topk(confidence[row], k=int(counts[row, i])).indices
                x[row, chosen] = predicted[row, chosen]
    return x


def strip_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """Generated ids up to (not including) the first EOS."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


@torch.no_grad()
def generate_autoregressive(model_fn: LogitsFn, prompt: torch.Tensor, *, gen_length: int,
                            temperature: float = 0.0, generator: torch.Generator | None = None
                            ) -> torch.Tensor:
    """The AR baseline's sampler: one token at a time, greedy or Gumbel-max at `temperature`."""
    x = prompt
    for _ in range(gen_length):
        logits = model_fn(x)[:, -1:]
        x = torch.cat([x, gumbel_perturbed(logits, temperature, generator).argmax(dim=-1)], dim=1)
    return x

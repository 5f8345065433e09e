"""Conditional log-likelihood (paper Algorithm 3) as the official `get_log_likelihood.py` of
ML-GSAI/LLaDA defines it: the validation metric and the likelihood used by multiple-choice
evaluation.

A Monte Carlo batch holds `batch_size` copies of prompt + answer. The prompt is never masked.
Row i masks exactly counts[i] of the answer's L tokens, where the counts are stratified over
1..L: k ~ randint(1, L + 1), counts = round(linspace(k, k + (b - 1) L / b, b)), wrapped into
1..L by ((counts - 1) % L) + 1; the masked positions of row i are the first counts[i] of L
permuted by randperm(L), one permutation per row in row order. The batch loss is the sum over
masked positions of CE / p_mask (p_mask = counts[i] / L, i.e. weight L / l) divided by b, in
fp32. With cfg_scale > 0 an unconditional copy (every prompt token set to mask_id) runs in the
same forward, after the conditional rows, and logits = un + (cfg_scale + 1) (cond - un). The
estimate is minus the mean of the mc_num // batch_size batch losses: a lower bound on
log p(answer | prompt).

Random draws come from an explicit `torch.Generator`, in the official order with the same calls
(randint for k, then one randperm(L) per row), so a CPU generator seeded s reproduces the
official code run after torch.manual_seed(s) on CPU. Unlike the official code, masked positions
are tracked explicitly rather than found by comparing tokens with mask_id.

The number of model forwards depends only on mc_num // batch_size, never on the data, so under
ZeRO-3 or tensor parallelism every rank runs the same number of collectives per example; callers
with uneven example counts per rank pad with dummy examples (data_pipeline/eval_sampler.py).

`model_fn` is any callable mapping token ids [b, s] to logits [b, s, vocab] of any float dtype
(the training `LLaDAModel` called as `model(ids)`, or a wrapper around an HF model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.diffusion.model_fn import LogitsFn, TokenCrossEntropy


def stratified_mask_counts(answer_length: int, batch_size: int,
                           generator: torch.Generator) -> torch.Tensor:
    """[batch_size] masked-token counts in 1..answer_length, stratified from one random start."""
    L, b = answer_length, batch_size
    if L < 1 or b < 1:
        raise ValueError(f"answer_length {L} and batch_size {b} must be positive")
    k = torch.randint(1, L + 1, (), generator=generator, device=generator.device)
    # The same expression as the official code, so float32 rounding matches it bit for bit.
    counts = torch.round(torch.linspace(float(k), k + (b - 1) * (L / b), steps=b,
                                        device=generator.device)).long()
    return ((counts - 1) % L) + 1


def likelihood_noise(seq: torch.Tensor, prompt_length: int, mask_id: int,
                     generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """seq [b, s] -> (noisy [b, s], masked bool [b, s], p_mask float32 [b]): row i has exactly
    counts[i] answer tokens set to mask_id, the prompt (first prompt_length tokens) intact."""
    b, s = seq.shape
    L = s - prompt_length
    if L < 1:
        raise ValueError(f"no answer to mask: sequence length {s}, prompt length {prompt_length}")
    counts = stratified_mask_counts(L, b, generator)
    prefix = torch.arange(L, device=generator.device)[None, :] < counts[:, None]
    rows = [prefix[i][torch.randperm(L, generator=generator, device=generator.device)]
            for i in range(b)]
    masked = torch.zeros(b, s, dtype=torch.bool, device=seq.device)
    masked[:, prompt_length:] = torch.stack(rows).to(seq.device)
    noisy = torch.where(masked, torch.full_like(seq, mask_id), seq)
    p_mask = (counts.to(torch.float32) / L).to(seq.device)
    return noisy, masked, p_mask


def _monte_carlo_batches(mc_num: int, batch_size: int) -> int:
    if batch_size < 1 or mc_num < 1 or mc_num % batch_size:
        raise ValueError(f"mc_num {mc_num} must be a positive multiple of batch_size {batch_size}")
    return mc_num // batch_size


def _cfg_logits(model_fn: LogitsFn, noisy: torch.Tensor, prompt_length: int, mask_id: int,
                cfg_scale: float) -> torch.Tensor:
    if cfg_scale <= 0:
        return model_fn(noisy)
    unconditional = noisy.clone()
    unconditional[:, :prompt_length] = mask_id
    cond, un = model_fn(torch.cat([noisy, unconditional])).chunk(2, dim=0)
    return un + (cfg_scale + 1) * (cond - un)


@torch.no_grad()
def conditional_log_likelihood(model_fn: LogitsFn, prompt: torch.Tensor, answer: torch.Tensor, *,
                               mask_id: int, mc_num: int = 128, batch_size: int = 16,
                               cfg_scale: float = 0.0, generator: torch.Generator) -> float:
    """Monte Carlo estimate (lower bound) of log p(answer | prompt); prompt [p], answer [L]."""
    n_batches = _monte_carlo_batches(mc_num, batch_size)
    if answer.numel() == 0:
        raise ValueError("answer is empty: there is nothing to score")
    if bool((answer == mask_id).any()):
        raise ValueError(f"answer contains the mask token id {mask_id}")
    p = prompt.numel()
    seq = torch.cat([prompt.to(answer.device), answer]).long()[None, :].repeat(batch_size, 1)
    total = torch.zeros((), dtype=torch.float32, device=seq.device)
    for _ in range(n_batches):
        noisy, masked, p_mask = likelihood_noise(seq, p, mask_id, generator)
        logits = _cfg_logits(model_fn, noisy, p, mask_id, cfg_scale)
        ce = F.cross_entropy(logits[masked].float(), seq[masked], reduction="none")
        weights = p_mask[:, None].expand_as(masked)[masked]
        total += (ce / weights).sum() / batch_size
    return -total.item() / n_batches


@torch.no_grad()
def sequence_nll_bound(token_ce: TokenCrossEntropy, seq: torch.Tensor, *, mask_id: int,
                       mc_num: int, batch_size: int, generator: torch.Generator,
                       prompt_length: int = 0) -> float:
    """Algorithm 3 through the per-token cross-entropy path: an upper bound on
    -log p(answer | prompt) in nats, where seq [s] is the prompt (its first `prompt_length`
    tokens, never masked; empty by default) followed by the answer. The validation metric
    during training: whole held-out rows in pretraining, held-out answers in SFT."""
    n_batches = _monte_carlo_batches(mc_num, batch_size)
    rows = seq.long()[None, :].repeat(batch_size, 1)
    total = 0.0
    for _ in range(n_batches):
        noisy, masked, p_mask = likelihood_noise(rows, prompt_length, mask_id, generator)
        ce = token_ce(noisy, rows, masked)
        total += ((ce * masked / p_mask[:, None]).sum() / batch_size).item()
    return total / n_batches

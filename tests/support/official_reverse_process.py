"""An independent transcription of the official LLaDA `generate` (ML-GSAI/LLaDA generate.py),
used only by the tests as the reference the sampler must reproduce.

It keeps the official structure on purpose: the global RNG (seeded by the caller), the
float64 Gumbel noise drawn at every step (also at temperature 0), the float64 softmax, a
per-row topk loop, and the EOS/EoT flags as the official code applies them (including the
`confidence_eos_eot_inf` bug: it writes -inf into the *noisy* scores at EOS and into the
logits at EoT only). It records the step at which each generated position was revealed by
comparing the sequence before and after every step.
"""

import numpy as np
import torch
import torch.nn.functional as F


def official_transfer_counts(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        out[i, :remainder[i]] += 1
    return out


@torch.no_grad()
def official_generate(model, prompt, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0,
                      remasking="low_confidence", mask_id=0, eos_id=1, eot_id=2, logits_eos_inf=False,
                      confidence_eos_eot_inf=False, corrected_confidence=False):
    """Returns (x, reveal_step) with reveal_step [b, gen_length] (-1: never revealed).
    corrected_confidence: not in the official code; the flag as intended (EOS and EoT logits
    -inf before the confidence softmax)."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    reveal = torch.full((prompt.shape[0], gen_length), -1, dtype=torch.long)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    global_step = 0
    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, start:start + block_length] == mask_id
        num_transfer_tokens = official_transfer_counts(block_mask_index, steps)
        for i in range(steps):
            before = x.clone()
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits = model(torch.cat([x, un_x], dim=0))
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            logits64 = logits.to(torch.float64)
            noise = torch.rand_like(logits64, dtype=torch.float64)
            logits_with_noise = logits64.exp() / (-torch.log(noise)) ** temperature
            x0 = torch.argmax(logits_with_noise, dim=-1)
            if confidence_eos_eot_inf:
                logits_with_noise[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
            if corrected_confidence:
                logits[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]))
            else:
                raise NotImplementedError(remasking)
            x0_p[:, prompt.shape[1] + (num_block + 1) * block_length:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
            changed = (before != x)[:, prompt.shape[1]:]
            reveal[changed] = global_step
            global_step += 1
    return x, reveal

"""An independent transcription of the official LLaDA `generate` (ML-GSAI/LLaDA generate.py at its
head, the revision stored as 6063e083e468a024edda373b728b0ba4d3fa218d), used only by the tests as
the reference the sampler must reproduce.

It keeps the official structure on purpose, since the details decide the output:
- the global RNG (seeded by the caller); Gumbel noise only at temperature > 0, where the logits
  go to float64 and exp(logits) / (-log u)^temperature is taken with u = rand_like in float64;
  at temperature 0 the "noisy" scores are the logits tensor itself;
- the `confidence_eos_eot_inf` line after the prediction, writing -inf into the noisy scores'
  EOS column and the logits' EoT column (at temperature 0 both land on the logits);
- the confidence as the softmax of the logits in their own dtype (bf16 logits tie near 1.0);
  random remasking draws one float32 rand per position after the Gumbel noise;
- cfg in the logits' dtype with the whole prompt (left padding included) masked, the attention
  mask doubled for the guided batch; a per-row topk loop.
Two things are not official: the official cfg branch fails without an attention mask (its doubled
mask is then undefined), here it passes None; and `corrected_confidence`, the flag as its name
intends (EOS and EoT zeroed at every temperature), the reference of the sampler's "both". It
records the step at which each generated position was revealed by comparing the sequence before
and after every step.
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


def official_noisy_scores(logits, temperature):
    if temperature == 0:
        return logits
    logits64 = logits.to(torch.float64)
    noise = torch.rand_like(logits64, dtype=torch.float64)
    return logits64.exp() / (-torch.log(noise)) ** temperature


@torch.no_grad()
def official_generate(model, prompt, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0,
                      remasking="low_confidence", mask_id=0, eos_id=1, eot_id=2, logits_eos_inf=False,
                      confidence_eos_eot_inf=False, corrected_confidence=False, attention_mask=None):
    """Returns (x, reveal_step) with reveal_step [b, gen_length] (-1: never revealed)."""
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long)
    x[:, :p] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones((b, gen_length), dtype=attention_mask.dtype)], dim=-1)
    prompt_index = x != mask_id
    reveal = torch.full((b, gen_length), -1, dtype=torch.long)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    global_step = 0
    for num_block in range(num_blocks):
        start = p + num_block * block_length
        block_mask_index = x[:, start:start + block_length] == mask_id
        num_transfer_tokens = official_transfer_counts(block_mask_index, steps)
        for i in range(steps):
            before = x.clone()
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                doubled = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
                logits = model(torch.cat([x, un_x], dim=0), attention_mask=doubled)
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask=attention_mask)
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            logits_with_noise = official_noisy_scores(logits, temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)
            if confidence_eos_eot_inf:
                logits_with_noise[:, :, eos_id] = -torch.inf
                logits[:, :, eot_id] = -torch.inf
            if corrected_confidence:
                logits[:, :, eos_id] = -torch.inf
                logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                probabilities = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(probabilities, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]))
            else:
                raise NotImplementedError(remasking)
            x0_p[:, p + (num_block + 1) * block_length:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
            changed = (before != x)[:, p:]
            reveal[changed] = global_step
            global_step += 1
    return x, reveal

"""An independent transcription of Fast-dLLM's threshold decoding (NVlabs/Fast-dLLM, llada/generate.py
as stored at f6b35ec3f1b16e1b3d3357938046559ae2d350fa: `generate` with `threshold`, its
`get_transfer_index`), used only by the tests as the reference the sampler's threshold path must
reproduce.

It keeps that code's structure: the global RNG (seeded by the caller), Gumbel noise only at
temperature > 0, the prediction as the argmax over the logits in their own dtype (greedy), the
softmax confidence of the prediction always in float64 (the sampler's `confidence_dtype="float64"`;
the same as "model" for float64 logits), candidates = masked positions up to the end of the
current block, a per-row top-k over all candidates of which the first is always kept and the
others only when their confidence is not below the threshold (so >=), and a block that runs until
no row has a mask left in it. Fast-dLLM has no EOS/EoT flags, no cfg and no early stop. It records
the step that revealed each generated position by comparing the sequence before and after every
step.
"""

import torch
import torch.nn.functional as F


@torch.no_grad()
def fast_dllm_threshold_generate(model, prompt, gen_length, block_length, threshold, temperature=0.0,
                                 mask_id=0):
    """Returns (x, reveal_step [b, gen_length], number of forwards)."""
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long)
    x[:, :p] = prompt
    reveal = torch.full((b, gen_length), -1, dtype=torch.long)
    forwards = 0
    for block in range(gen_length // block_length):
        end = p + (block + 1) * block_length
        while True:
            before = x.clone()
            forwards += 1
            mask_index = x == mask_id
            logits = model(x)
            mask_index[:, end:] = False
            if temperature == 0:
                noisy = logits
            else:
                logits64 = logits.to(torch.float64)
                noisy = logits64.exp() / (-torch.log(torch.rand_like(logits64))) ** temperature
            x0 = noisy.argmax(dim=-1)
            probability = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = probability.gather(-1, x0[..., None]).squeeze(-1)
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-float("inf"), dtype=torch.float64))
            transfer = torch.zeros_like(mask_index)
            counts = mask_index.sum(dim=1)
            for row in range(b):
                top = torch.topk(confidence[row], k=int(counts[row])).indices
                transfer[row, top] = True
                for rank in range(1, int(counts[row])):
                    if confidence[row, top[rank]] < threshold:
                        transfer[row, top[rank]] = False
            x[transfer] = x0[transfer]
            reveal[(before != x)[:, p:]] = forwards - 1
            if not bool((x[:, end - block_length:end] == mask_id).any()):
                break
    return x, reveal, forwards

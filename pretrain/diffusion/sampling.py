"""The reverse process: LLaDA's sampler as the official `generate` (ML-GSAI/LLaDA) defines it.

Starting from `gen_length` mask tokens after the prompt, `steps` denoising steps are split
evenly over blocks of `block_length` (semi-autoregressive when block_length < gen_length).
Within a block, step i reveals `mask_count // steps_per_block` tokens, the first
`mask_count % steps_per_block` steps one more. Each step predicts every masked position
(argmax of exp(logits) / (-log u)^temperature in float64: Gumbel-max) and keeps the k most
confident predictions (`low_confidence`: the float64 softmax probability of the prediction)
or k random ones (`random`), never beyond the current block. Classifier-free guidance runs the
prompt fully masked as the unconditional branch: un + (cfg_scale + 1)(cond - un). Algorithm 4
of the paper remasks each token with probability s/t; this follows the official code, which
reveals exactly k per step.

EOS/EoT flags, pinned to the official behaviour:
- `logits_eos_inf`: the EOS logit is -inf before prediction (EOS is never generated).
- `confidence_eos_eot="official"`: what the official `confidence_eos_eot_inf` flag does, a
  known bug: only EoT's probability is zeroed in the confidence (EOS's is not).
  `"both"`: the intended behaviour, a prediction of EOS or EoT gets confidence 0, so those are
  revealed last. `"off"`: neither.

Batched prompts are left-padded with an attention mask (1 at real tokens). Random draws come
from an explicit generator in the official order (the Gumbel noise, then the random
confidences), so a generator seeded s reproduces the official code after torch.manual_seed(s).
The one draw skipped is the Gumbel noise at temperature 0 with low-confidence remasking, which
the official code draws and then raises to the power 0: nothing random follows it, so the
output is the same. A batch stops early once every row has revealed an EOS with nothing masked
before it (its output, cut at the first EOS, is then final); `agree` makes that decision
collective, so ranks running the model under ZeRO-3 / TP do the same number of forwards.

Fast decoding (Fast-dLLM, Wu et al. 2025), training-free and off by default:
- `threshold`: confidence-threshold parallel decoding. Each step reveals every masked position
  of the current block whose confidence (the float64 softmax probability of the prediction,
  after the same temperature / Gumbel and EOS/EoT handling as the exact path) is >= threshold
  (Fast-dLLM's convention: it keeps the top-ranked positions unless their confidence is below
  the threshold), and always the single most confident one. A block ends when it has no mask
  left (in every row, and under `agree` on every rank), so the steps per block vary and `steps`
  is not used. The mask token is never predicted (a "revealed" mask would keep the block from
  ending; the exact path, like the official code, does not exclude it, and a trained model
  never predicts it). Needs low_confidence remasking.
- `cache`: the block-wise approximate KV cache. At the first step of every block (and every
  `cache_refresh_every` steps of it) one forward over the whole sequence gives that step's
  logits and every layer's keys and values; the other steps recompute only a window against
  them: "prefix" the block and everything after it (the prompt and finished blocks are cached),
  "dual" the block alone (everything else cached). The cached entries of positions outside the
  window go stale as the block fills in (their deeper layers saw masks), which is the
  approximation; positions keep their absolute RoPE positions. With temperature > 0 the Gumbel
  noise of a window step covers the window only, so seeded draws differ from the exact path's.
Both decode generated blocks only, so they refuse prompts that contain the mask token (infilling
needs the exact schedule). With threshold 1.0 (one token per step unless a probability is
exactly 1.0), steps == gen_length and a cache refreshed every step, the output equals the exact
path's token for token. `Sample.reveal_step` and `steps_run` are recorded as on the exact path.

`model_fn(ids, attention_mask=None)` is any callable returning logits [b, s, vocab]: the
training model in any layout, or an exported Hugging Face model behind a wrapper. With a cache
it is also called as `model_fn(ids, attention_mask=..., past_key_values=cache)` (a whole forward
filling an empty `parallel.attention.KVCache`) and `model_fn(window_ids, attention_mask=...,
past_key_values=cache, cache_position=arange(start, end))` (the window's logits [b, w, vocab]),
as `parallel.model.LLaDAModel` and the exported `LLaDAModelLM` take them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from parallel.attention import KVCache
from pretrain.diffusion.model_fn import LogitsFn

REMASKING = ("low_confidence", "random")
CONFIDENCE_EOS_EOT = ("off", "official", "both")
CACHE_MODES = ("none", "prefix", "dual")


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 128
    gen_length: int = 128
    block_length: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot: str = "off"
    stop_at_eos: bool = True
    threshold: float | None = None          # None: the exact schedule of `steps`
    cache: str = "none"                     # "none", "prefix" or "dual"
    cache_refresh_every: int | None = None  # None: refresh at the start of each block only

    def problems(self) -> list[str]:
        out = []
        if min(self.gen_length, self.block_length) <= 0 or (self.threshold is None and self.steps <= 0):
            out.append("steps, gen_length and block_length must be positive")
        elif self.gen_length % self.block_length:
            out.append(f"block_length {self.block_length} must divide gen_length {self.gen_length}")
        elif self.threshold is None and self.steps % (self.gen_length // self.block_length):
            out.append(f"steps {self.steps} must be a multiple of the number of blocks "
                       f"{self.gen_length // self.block_length} (gen_length / block_length)")
        if self.threshold is not None:
            if not 0 < self.threshold <= 1:
                out.append(f"threshold {self.threshold} must be in (0, 1] (a probability), or None for "
                           f"the exact schedule")
            if self.remasking != "low_confidence":
                out.append("threshold needs remasking 'low_confidence' (random remasking has no "
                           "confidence to compare)")
        if self.cache not in CACHE_MODES:
            out.append(f"cache {self.cache!r} is not one of {', '.join(CACHE_MODES)}")
        if self.cache_refresh_every is not None:
            if self.cache == "none":
                out.append("cache_refresh_every needs a cache: set cache to 'prefix' or 'dual', or "
                           "cache_refresh_every to None")
            elif self.cache_refresh_every < 1:
                out.append(f"cache_refresh_every {self.cache_refresh_every} must be >= 1 (1: every step)")
        if self.temperature < 0:
            out.append(f"temperature {self.temperature} must be >= 0 (0: greedy)")
        if self.cfg_scale < 0:
            out.append(f"cfg_scale {self.cfg_scale} must be >= 0 (0: no guidance)")
        if self.remasking not in REMASKING:
            out.append(f"remasking {self.remasking!r} is not one of {', '.join(REMASKING)}")
        if self.confidence_eos_eot not in CONFIDENCE_EOS_EOT:
            out.append(f"confidence_eos_eot {self.confidence_eos_eot!r} is not one of "
                       f"{', '.join(CONFIDENCE_EOS_EOT)}")
        return out


@dataclass
class Sample:
    """ids: [b, p + gen_length], the prompt and what was revealed (mask ids where an early stop
    left positions after the first EOS); reveal_step: [b, gen_length], the step (0-based, over
    all blocks) that revealed each generated position, -1 if none; steps_run: forwards made."""
    ids: torch.Tensor
    reveal_step: torch.Tensor
    prompt_length: int
    steps_run: int

    def answers(self, eos_id: int) -> list[list[int]]:
        """Each row's generated ids, cut at the first EOS."""
        return [strip_at_eos(row, eos_id) for row in self.ids[:, self.prompt_length:].tolist()]


def transfer_counts(mask_counts: torch.Tensor, steps: int) -> torch.Tensor:
    """[b] masked counts of a block -> [b, steps] tokens to reveal per step (remainder first)."""
    base = mask_counts // steps
    remainder = mask_counts % steps
    counts = base[:, None].repeat(1, steps)
    counts += torch.arange(steps, device=mask_counts.device)[None, :] < remainder[:, None]
    return counts


def gumbel_perturbed(logits: torch.Tensor, temperature: float, generator: torch.Generator | None):
    """exp(logits) / (-log u)^temperature in float64, u ~ U[0, 1): its argmax is a sample."""
    logits = logits.double()
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    return logits.exp() / (-torch.log(u)) ** temperature


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (ids [b, longest], attention_mask [b, longest]), padded on the left."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        if p:
            ids[row, longest - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            mask[row, longest - len(p):] = 1
    return ids, mask


def _predict(model_fn: LogitsFn, x: torch.Tensor, attention_mask: torch.Tensor | None,
             prompt_index: torch.Tensor, mask_id: int, cfg_scale: float, **cache) -> torch.Tensor:
    """Logits of x (the sequence, or a window of it under a cache), guided by the fully masked
    prompt when cfg_scale > 0 (the guided batch is [x; unconditional], cached as one batch)."""
    if cfg_scale == 0:
        return model_fn(x, attention_mask=attention_mask, **cache)
    unconditional = x.masked_fill(prompt_index, mask_id)
    both_masks = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    logits, un_logits = model_fn(torch.cat([x, unconditional]), attention_mask=both_masks, **cache).chunk(2)
    return un_logits + (cfg_scale + 1) * (logits - un_logits)


class _StepLogits:
    """Each step's logits: of the whole sequence without a cache; with one, of the whole sequence
    at a refresh (filling a new cache) and of a window (from the block's start to its end, or to
    the sequence's end for "prefix") at the other steps."""

    def __init__(self, model_fn: LogitsFn, config: SamplerConfig, attention_mask: torch.Tensor | None,
                 prompt_index: torch.Tensor, mask_id: int):
        self.model_fn, self.config, self.attention_mask = model_fn, config, attention_mask
        self.prompt_index, self.mask_id = prompt_index, mask_id
        self.cache: KVCache | None = None

    def __call__(self, x: torch.Tensor, step_in_block: int, start: int, end: int) -> tuple[int, torch.Tensor]:
        """(first position the logits cover, logits [b, positions, vocab])."""
        c = self.config
        if c.cache == "none":
            return 0, self._predict(x, self.prompt_index)
        every = c.cache_refresh_every
        if step_in_block == 0 or (every is not None and step_in_block % every == 0):
            self.cache = KVCache()
            return 0, self._predict(x, self.prompt_index, past_key_values=self.cache)
        stop = end if c.cache == "dual" else x.shape[1]
        return start, self._predict(x[:, start:stop], self.prompt_index[:, start:stop],
                                    past_key_values=self.cache,
                                    cache_position=torch.arange(start, stop, device=x.device))

    def _predict(self, ids: torch.Tensor, prompt_index: torch.Tensor, **cache) -> torch.Tensor:
        return _predict(self.model_fn, ids, self.attention_mask, prompt_index, self.mask_id,
                        self.config.cfg_scale, **cache)


def _finished(x: torch.Tensor, prompt_length: int, mask_id: int, eos_id: int) -> bool:
    """Every row has revealed an EOS in its generated part with no mask anywhere before it."""
    generated = x[:, prompt_length:]
    is_eos = generated == eos_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), generated.shape[1])
    before = torch.arange(x.shape[1], device=x.device)[None, :] < (prompt_length + first_eos)[:, None]
    return bool(is_eos.any(1).all()) and not bool(((x == mask_id) & before).any())


@torch.no_grad()
def generate(model_fn: LogitsFn, prompt: torch.Tensor, *, mask_id: int, eos_id: int, eot_id: int,
             config: SamplerConfig, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None,
             agree: Callable[[bool], bool] = lambda done: done) -> Sample:
    """prompt [b, p] (left-padded when `attention_mask` [b, p] is given) -> Sample.

    agree: turns this process's "every row is finished" (and, with a threshold, "the block has no
    mask left") into the decision all processes that share the model take (under ZeRO-3 / TP:
    `all_ranks_agree`)."""
    problems = config.problems()
    if problems:
        raise ValueError("sampler: " + "; ".join(problems))
    c = config
    b, p = prompt.shape
    if (c.threshold is not None or c.cache != "none") and bool((prompt == mask_id).any()):
        raise ValueError("sampler: the prompt contains the mask token; threshold decoding and the KV cache "
                         "decode the generated blocks only: use threshold=None and cache='none' to fill "
                         "masks inside a prompt")
    x = torch.full((b, p + c.gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :p] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, c.gen_length)], dim=1)
    prompt_index = x != mask_id
    reveal_step = torch.full((b, c.gen_length), -1, dtype=torch.long, device=prompt.device)
    num_blocks = c.gen_length // c.block_length
    steps_per_block = c.steps // num_blocks
    draws_noise = c.temperature > 0 or c.remasking == "random"
    step_logits = _StepLogits(model_fn, c, attention_mask, prompt_index, mask_id)
    step = 0
    for block in range(num_blocks):
        start, end = p + block * c.block_length, p + (block + 1) * c.block_length
        if c.threshold is None:
            counts = transfer_counts((x[:, start:end] == mask_id).sum(dim=1), steps_per_block)
        i = 0
        while True:
            first, logits = step_logits(x, i, start, end)
            logits = logits.double()
            seen = x[:, first:first + logits.shape[1]]
            mask_index = seen == mask_id
            if c.logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            scores = gumbel_perturbed(logits, c.temperature, generator) if draws_noise else logits
            if c.threshold is not None:  # a revealed mask would stay masked: the block could never end
                scores = scores.index_fill(-1, torch.tensor([mask_id], device=x.device), -torch.inf)
            predicted = scores.argmax(dim=-1)
            if c.remasking == "low_confidence":
                if c.confidence_eos_eot != "off":
                    zeroed = [eot_id] if c.confidence_eos_eot == "official" else [eos_id, eot_id]
                    logits[:, :, zeroed] = -torch.inf
                confidence = F.softmax(logits, dim=-1).gather(-1, predicted[..., None]).squeeze(-1)
            else:
                confidence = torch.rand(predicted.shape, generator=generator, device=x.device)
            confidence[:, end - first:] = -torch.inf
            predicted = torch.where(mask_index, predicted, seen)
            confidence = torch.where(mask_index, confidence, -torch.inf)
            for row in range(b):
                if c.threshold is None:
                    chosen = torch.topk(confidence[row], k=int(counts[row, i])).indices
                elif bool(mask_index[row, start - first:end - first].any()):
                    chosen = torch.cat([torch.topk(confidence[row], k=1).indices,
                                        (confidence[row] >= c.threshold).nonzero().flatten()]).unique()
                else:
                    continue
                x[row, first + chosen] = predicted[row, chosen]
                newly = first + chosen[(first + chosen >= p) & mask_index[row, chosen]]
                reveal_step[row, newly - p] = step
            step += 1
            i += 1
            if c.stop_at_eos and agree(_finished(x, p, mask_id, eos_id)):
                return Sample(x, reveal_step, p, step)
            if (i == steps_per_block if c.threshold is None
                    else agree(not bool((x[:, start:end] == mask_id).any()))):
                break
    return Sample(x, reveal_step, p, step)


def all_ranks_agree(done: bool) -> bool:
    """True once every rank of the initialised process group is done (one all-reduce)."""
    flag = torch.tensor([0 if done else 1], dtype=torch.int64)
    if torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    torch.distributed.all_reduce(flag)
    return int(flag.item()) == 0


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
        scores = gumbel_perturbed(logits, temperature, generator) if temperature > 0 else logits
        x = torch.cat([x, scores.argmax(dim=-1)], dim=1)
    return x

"""The reverse process: LLaDA's sampler as the official `generate` (ML-GSAI/LLaDA generate.py at its
head, the revision stored as 6063e083e468a024edda373b728b0ba4d3fa218d) defines it.

Starting from `gen_length` mask tokens after the prompt, `steps` denoising steps are split
evenly over blocks of `block_length` (semi-autoregressive when block_length < gen_length).
Within a block, step i reveals `mask_count // steps_per_block` tokens, the first
`mask_count % steps_per_block` steps one more. Each step predicts every masked position (at
temperature 0 the argmax of the logits; above it the argmax of exp(logits) / (-log u)^temperature
in float64: Gumbel-max) and keeps the k most confident predictions (`low_confidence`: the softmax
probability of the prediction) or k random ones (`random`: one float32 uniform per position),
never beyond the current block. Classifier-free guidance runs the prompt fully masked as the
unconditional branch: un + (cfg_scale + 1)(cond - un), in the logits' dtype. Algorithm 4 of the
paper remasks each token with probability s/t; this follows the official code, which reveals
exactly k per step.

The confidence is the softmax in `confidence_dtype`: "model" (the default, the official choice)
takes it in the dtype the logits come in, so a bf16 model's probabilities above ~0.998 round to 1.0
and tie, and topk then chooses among them in its own tie order (on CPU the lowest position first
for k = 1) rather than by the float64 order; "float64" is Fast-dLLM's choice, which separates them.
(The stack's `LLaDAModel` and the exported model return logits in the model's dtype, as the
official model does.)

EOS/EoT flags, pinned to the official behaviour:
- `logits_eos_inf`: the EOS logit is -inf before prediction (EOS is never generated).
- `confidence_eos_eot="official"`: what the official `confidence_eos_eot_inf` flag does. It runs
  after the prediction and writes -inf into the Gumbel-perturbed scores' EOS column and the
  logits' EoT column; at temperature 0 the scores are the logits themselves, so a prediction of
  EOS or EoT gets confidence 0 (revealed last), while at temperature > 0 only EoT's does (the EOS
  write lands on a tensor nothing reads again). `"both"`: EOS and EoT at every temperature, the
  flag as its name intends. `"off"`: neither. Zeroing a column also renormalises the others.

Batched prompts are left-padded with an attention mask (1 at real tokens); the padding counts as
prompt, so the unconditional branch masks it too, as the official code does. Random draws come
from an explicit generator (None: the global RNG) in the official order and shapes: the float64
Gumbel noise of the whole [b, s, vocab] logits only at temperature > 0, then, with random
remasking, the float32 [b, s] confidences. A generator seeded s on the logits' device therefore
reproduces the official code run after torch.manual_seed(s). A batch stops early once every row
has revealed an EOS with nothing masked before it (its output, cut at the first EOS, is then
final, since a revealed token never changes); the official code has no early stop. `agree`
makes that decision collective, so ranks running the model under ZeRO-3 / TP do the same number
of forwards.

`logits_at="block"` is the exact sampler with less work: a step can reveal a token only from
the first position still masked (in any row; after the prompt that is inside the current block)
to the block's end, so the model's final norm and LM head, the softmax and the argmax run there
only (`logits_positions`), not over the whole prompt and canvas. At temperature 0 the tokens
and reveal steps are the official ones, for both remaskings (random remasking still draws one
uniform per position of the forward, as the official code, and keeps the block's); above it the
Gumbel noise is drawn for those positions only, a different random stream from the official one
with the same distribution. Default "sequence": every position, as the official code.

Fast decoding (Fast-dLLM, Wu et al. 2025, NVlabs/Fast-dLLM llada/generate.py), training-free and
off by default:
- `threshold`: confidence-threshold parallel decoding. Each step ranks the masked positions of
  the current block by confidence (after the same temperature / Gumbel, EOS/EoT and dtype
  handling as the exact path) and reveals the first of that ranking and every other one whose
  confidence is >= threshold (Fast-dLLM's `get_transfer_index`). A block ends when it has no mask
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
  noise of a window step covers the window only (and Fast-dLLM's prefix loop draws one more,
  unused, noise tensor per window step), so seeded draws differ from the exact path's. With
  cfg, the guided batch [x; unconditional] is cached as one batch (Fast-dLLM has no cfg).
Both decode generated blocks only, so they refuse prompts that contain the mask token (infilling
needs the exact schedule). With threshold 1.0 (one token per step unless a probability is
exactly 1.0), steps == gen_length and a cache refreshed every step, the output equals the exact
path's token for token. `Sample.reveal_step` and `steps_run` are recorded as on the exact path.

`model_fn(ids, attention_mask=None)` is any callable returning logits [b, s, vocab]: the
training model in any layout, or an exported Hugging Face model behind a wrapper. With a cache
it is also called as `model_fn(ids, attention_mask=..., past_key_values=cache)` (a whole forward
filling an empty `parallel.attention.KVCache`) and `model_fn(window_ids, attention_mask=...,
past_key_values=cache, cache_position=arange(start, end))` (the window's logits [b, w, vocab]),
as `parallel.model.LLaDAModel` and the exported `LLaDAModelLM` take them; with
`logits_at="block"` also with `logits_positions=slice(i, j)` (the logits of those positions of
`ids` only).
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
CONFIDENCE_DTYPES = ("model", "float64")
CACHE_MODES = ("none", "prefix", "dual")
LOGITS_AT = ("sequence", "block")


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
    confidence_dtype: str = "model"         # "model": the logits' own dtype (official); "float64": Fast-dLLM
    logits_at: str = "sequence"             # "block": the head only where a token can be revealed
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
        if self.logits_at not in LOGITS_AT:
            out.append(f"logits_at {self.logits_at!r} is not one of {', '.join(LOGITS_AT)} (sequence: every "
                       f"position, as the official code; block: the current block only)")
        if self.confidence_dtype not in CONFIDENCE_DTYPES:
            out.append(f"confidence_dtype {self.confidence_dtype!r} is not one of {', '.join(CONFIDENCE_DTYPES)} "
                       f"(model: the softmax in the logits' dtype, as the official code; float64: as Fast-dLLM)")
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
             prompt_index: torch.Tensor, mask_id: int, cfg_scale: float, **forward) -> torch.Tensor:
    """Logits of x (the sequence, or a window of it under a cache), guided by the fully masked
    prompt when cfg_scale > 0 (the guided batch is [x; unconditional], cached as one batch).
    forward: the KV-cache and `logits_positions` arguments of the model."""
    if cfg_scale == 0:
        return model_fn(x, attention_mask=attention_mask, **forward)
    unconditional = x.masked_fill(prompt_index, mask_id)
    both_masks = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    logits, un_logits = model_fn(torch.cat([x, unconditional]), attention_mask=both_masks, **forward).chunk(2)
    return un_logits + (cfg_scale + 1) * (logits - un_logits)


class _StepLogits:
    """Each step's forward: over the whole sequence without a cache; with one, over the whole
    sequence at a refresh (filling a new cache) and over a window (from the block's start to its
    end, or to the sequence's end for "prefix") at the other steps. Its logits cover the forward's
    positions, or with `logits_at="block"` only those from the first position still masked (in
    any row) to the block's end: no token outside them can be revealed at this step."""

    def __init__(self, model_fn: LogitsFn, config: SamplerConfig, attention_mask: torch.Tensor | None,
                 prompt_index: torch.Tensor, mask_id: int):
        self.model_fn, self.config, self.attention_mask = model_fn, config, attention_mask
        self.prompt_index, self.mask_id = prompt_index, mask_id
        self.cache: KVCache | None = None

    def __call__(self, x: torch.Tensor, step_in_block: int, start: int,
                 end: int) -> tuple[tuple[int, int], int, torch.Tensor]:
        """((first, stop): the positions the forward covers, the first position the logits cover,
        logits [b, positions, vocab])."""
        c = self.config
        every = c.cache_refresh_every
        refresh = c.cache != "none" and (step_in_block == 0 or (every is not None and step_in_block % every == 0))
        first, stop = (0, x.shape[1]) if c.cache == "none" or refresh else \
            (start, end if c.cache == "dual" else x.shape[1])
        forward: dict = {}
        if refresh:
            self.cache = KVCache()
            forward = {"past_key_values": self.cache}
        elif c.cache != "none":
            forward = {"past_key_values": self.cache, "cache_position": torch.arange(first, stop, device=x.device)}
        covered = first
        if c.logits_at == "block":
            masked = (x[:, first:end] == self.mask_id).any(dim=0)
            covered = first + int(masked.int().argmax()) if bool(masked.any()) else start
            forward["logits_positions"] = slice(covered - first, end - first)
        logits = _predict(self.model_fn, x[:, first:stop], self.attention_mask, self.prompt_index[:, first:stop],
                          self.mask_id, c.cfg_scale, **forward)
        return (first, stop), covered, logits


def _confidence(logits: torch.Tensor, predicted: torch.Tensor, config: SamplerConfig, eos_id: int,
                eot_id: int) -> torch.Tensor:
    """[b, s] softmax probability of each prediction in `config.confidence_dtype`, with the
    columns the EOS/EoT flag zeroes set to -inf first (overwrites `logits`: read it no more)."""
    if config.confidence_dtype == "float64":
        logits = logits.double()
    zeroed = {"off": [], "both": [eos_id, eot_id],
              "official": [eos_id, eot_id] if config.temperature == 0 else [eot_id]}[config.confidence_eos_eot]
    if zeroed:
        logits[:, :, zeroed] = -torch.inf
    return F.softmax(logits, dim=-1).gather(-1, predicted[..., None]).squeeze(-1)


def _chosen(confidence: torch.Tensor, count: int, threshold: float | None) -> torch.Tensor:
    """Positions of one row to reveal: the `count` most confident (exact schedule) or, with a
    threshold, of the `count` candidates ranked by confidence the first and every other one whose
    confidence is >= threshold (Fast-dLLM's `get_transfer_index`)."""
    ranked = torch.topk(confidence, k=count).indices
    if threshold is None:
        return ranked
    keep = confidence[ranked] >= threshold
    keep[:1] = True
    return ranked[keep]


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
    step_logits = _StepLogits(model_fn, c, attention_mask, prompt_index, mask_id)
    step = 0
    for block in range(num_blocks):
        start, end = p + block * c.block_length, p + (block + 1) * c.block_length
        if c.threshold is None:
            counts = transfer_counts((x[:, start:end] == mask_id).sum(dim=1), steps_per_block)
        i = 0
        while True:
            (first, stop), covered, logits = step_logits(x, i, start, end)  # in the dtype the model returned
            seen = x[:, covered:covered + logits.shape[1]]
            mask_index = seen == mask_id
            if c.logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            scores = gumbel_perturbed(logits, c.temperature, generator) if c.temperature > 0 else logits
            if c.threshold is not None:  # a revealed mask would stay masked: the block could never end
                scores = scores.index_fill(-1, torch.tensor([mask_id], device=x.device), -torch.inf)
            predicted = scores.argmax(dim=-1)
            if c.remasking == "low_confidence":
                confidence = _confidence(logits, predicted, c, eos_id, eot_id)
            else:  # one draw per position of the forward, as the official code draws over the sequence
                confidence = torch.rand((b, stop - first), generator=generator, device=x.device)
                confidence = confidence[:, covered - first:covered - first + predicted.shape[1]]
            confidence[:, end - covered:] = -torch.inf
            predicted = torch.where(mask_index, predicted, seen)
            confidence = torch.where(mask_index, confidence, -torch.inf)
            candidates = mask_index[:, :end - covered].sum(dim=1)
            for row in range(b):
                count = int(counts[row, i] if c.threshold is None else candidates[row])
                if count == 0:
                    continue
                chosen = _chosen(confidence[row], count, c.threshold)
                x[row, covered + chosen] = predicted[row, chosen]
                newly = covered + chosen[(covered + chosen >= p) & mask_index[row, chosen]]
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

"""The run's training objective as one object, so the loop never tests `train.objective`.

`train.objective` names one of three objectives, which differ in three places: the loss of a
micro-batch, the held-out loss on fixed batches, and the closing sample. Each is a class here
with those three methods, built from the config by `objective_for`:

- `MaskedDiffusion` ("mdm", Algorithm 1): noise keyed by (seed, step, row of the global batch),
  the fixed-t held-out loss, the reverse process for the sample;
- `SupervisedFineTuning` ("sft", Algorithm 2): the same with the prompts never masked (its
  micro-batches are `SFTBatch`es: ids and prompt lengths), the prompt a user turn of the chat
  template and the answer cut at its EoT;
- `Autoregressive` ("arm", the baseline): the next-token loss, left-to-right decoding.

The loader's micro-batch goes on the device through `device_batch` (the ids; for SFT the ids
and the prompt lengths), which is what `micro_batch_loss` takes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from data_pipeline.seeding import keyed_generator
from data_pipeline.sft import ChatTemplate, SFTBatch
from data_pipeline.tokenizer import TokenizerInfo
from pretrain.diffusion.model_fn import TokenCrossEntropy
from pretrain.diffusion.objectives import (
    ar_loss_from_ce,
    next_token_targets,
    pretrain_loss_from_ce,
    sft_loss_from_ce,
)
from pretrain.diffusion.sampling import all_ranks_agree, generate, generate_autoregressive, strip_at_eos
from pretrain.training.config import RunConfig, SampleConfig
from pretrain.training.heldout import fixed_t_loss, next_token_loss
from pretrain.training.step_loss import draw_noise


class Objective(ABC):
    """What the loop asks of `train.objective`; `seed` is `train.seed`, the key of the noise and
    of the closing sample's draws."""

    def __init__(self, seed: int):
        self.seed = seed

    def device_batch(self, item, device: torch.device):
        """The loader's micro-batch (`TokenBatch` or `SFTBatch`) as `micro_batch_loss` takes it."""
        return item.input_ids.to(device)

    @abstractmethod
    def micro_batch_loss(self, engine, batch, mask_id: int, step: int, first_row: int) -> torch.Tensor:
        """The loss of one micro-batch through the engine's chunked cross-entropy; `first_row` is
        the index of its first row in the step's global batch (`step_loss.first_global_row`)."""

    @abstractmethod
    def heldout_loss(self, token_ce: TokenCrossEntropy, batches: list[torch.Tensor], *, mask_id: int,
                     t_buckets: int, seed: int) -> dict[str, float]:
        """{'val/loss': ..., ...} over the fixed held-out batches (`pretrain.training.heldout`)."""

    @abstractmethod
    def closing_sample(self, model, tok: TokenizerInfo, sample: SampleConfig, device) -> list[int]:
        """The generated ids (cut at the first EOS) for `sample.prompt`."""


class MaskedDiffusion(Objective):
    """Algorithm 1 (`train.objective: mdm`)."""

    def micro_batch_loss(self, engine, batch: torch.Tensor, mask_id: int, step: int,
                         first_row: int) -> torch.Tensor:
        nb = draw_noise(batch, mask_id, self.seed, step, first_row)
        return pretrain_loss_from_ce(engine(nb.noisy, targets=batch, loss_mask=nb.masked), nb)

    def heldout_loss(self, token_ce: TokenCrossEntropy, batches: list[torch.Tensor], *, mask_id: int,
                     t_buckets: int, seed: int) -> dict[str, float]:
        return fixed_t_loss(token_ce, batches, mask_id=mask_id, t_buckets=t_buckets, seed=seed)

    @torch.no_grad()
    def closing_sample(self, model, tok: TokenizerInfo, sample: SampleConfig, device) -> list[int]:
        model.eval()
        return self.reverse_process(model, tok, tok.encode(sample.prompt), sample, device)

    def reverse_process(self, model, tok: TokenizerInfo, prompt_ids: list[int], sample: SampleConfig,
                        device) -> list[int]:
        """The sampler's answer to `prompt_ids`, cut at the first EOS. Every rank runs the same
        prompt; the early stop at EOS is still agreed, as the forwards are collective."""
        prompt = torch.tensor([prompt_ids], device=device)
        generator = keyed_generator(self.seed, "sample", device=device)
        out = generate(model, prompt, mask_id=tok.mask_id, eos_id=tok.eos_id, eot_id=tok.special_ids["eot"],
                       config=sample.sampler(), generator=generator, agree=all_ranks_agree)
        return out.answers(tok.eos_id)[0]


class SupervisedFineTuning(MaskedDiffusion):
    """Algorithm 2 (`train.objective: sft`): its held-out loss is Algorithm 1's (the config asks
    SFT runs to validate by the Algorithm 3 bound instead)."""

    def device_batch(self, item: SFTBatch, device: torch.device) -> SFTBatch:
        return SFTBatch(input_ids=item.input_ids.to(device), prompt_lengths=item.prompt_lengths.to(device))

    def micro_batch_loss(self, engine, batch: SFTBatch, mask_id: int, step: int,
                         first_row: int) -> torch.Tensor:
        ids, prompt_lengths = batch.input_ids, batch.prompt_lengths
        nb = draw_noise(ids, mask_id, self.seed, step, first_row, prompt_lengths)
        return sft_loss_from_ce(engine(nb.noisy, targets=ids, loss_mask=nb.masked), prompt_lengths, nb)

    @torch.no_grad()
    def closing_sample(self, model, tok: TokenizerInfo, sample: SampleConfig, device) -> list[int]:
        """The prompt is a user turn of the chat template; the answer ends at its EoT."""
        model.eval()
        chat = ChatTemplate(tok)
        prompt_ids = chat.prompt([{"role": "user", "content": sample.prompt}])
        return strip_at_eos(self.reverse_process(model, tok, prompt_ids, sample, device), chat.eot_id)


class Autoregressive(Objective):
    """The autoregressive baseline (`train.objective: arm`): next-token loss, no noise."""

    def micro_batch_loss(self, engine, batch: torch.Tensor, mask_id: int, step: int,
                         first_row: int) -> torch.Tensor:
        return ar_loss_from_ce(engine(batch, *next_token_targets(batch)))

    def heldout_loss(self, token_ce: TokenCrossEntropy, batches: list[torch.Tensor], *, mask_id: int,
                     t_buckets: int, seed: int) -> dict[str, float]:
        return next_token_loss(token_ce, batches)

    @torch.no_grad()
    def closing_sample(self, model, tok: TokenizerInfo, sample: SampleConfig, device) -> list[int]:
        model.eval()
        prompt = torch.tensor([tok.encode(sample.prompt)], device=device)
        out = generate_autoregressive(model, prompt, gen_length=sample.gen_length, temperature=sample.temperature,
                                      generator=keyed_generator(self.seed, "sample", device=device))
        return strip_at_eos(out[0, prompt.shape[1]:].tolist(), tok.eos_id)


def objective_for(cfg: RunConfig) -> Objective:
    """The objective `train.objective` names (the config has checked the name)."""
    classes = {"mdm": MaskedDiffusion, "sft": SupervisedFineTuning, "arm": Autoregressive}
    return classes[cfg.train.objective](cfg.train.seed)

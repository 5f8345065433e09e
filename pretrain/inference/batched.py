"""Many prompts through the sampler: left-padded batches, split over data-parallel ranks.

Each rank samples its share of the prompts (`data_pipeline.eval_sampler` pads a short share with
dummy prompts, so every rank runs the same number of batches: under ZeRO-3 or tensor
parallelism every forward is a collective), each batch with a generator keyed by its first
prompt's index, and the answers are gathered back in prompt order. generate and evaluate both
sample through it.
"""

from __future__ import annotations

from data_pipeline.eval_sampler import gather_in_order, shard_examples
from data_pipeline.seeding import keyed_generator
from pretrain.diffusion.sampling import SamplerConfig, all_ranks_agree, generate, left_pad, strip_at_eos
from pretrain.inference.loading import InferenceModel


def sample_prompts(model: InferenceModel, prompts: list[list[int]], config: SamplerConfig,
                   batch_size: int, key: tuple, cut_at_eot: bool = False) -> list[dict]:
    """Answers to every prompt, in order, as {"ids", "reveal_steps", "steps_run"} (the forwards its
    batch took): this rank's share in left-padded batches, each with a generator keyed by `key`
    and the index of its first prompt (-1 for a dummy), then gathered from every data-parallel
    rank. cut_at_eot: answers also end at the first EoT (chat answers end there)."""
    tok = model.tokenizer
    eot = tok.special_ids["eot"]
    share = shard_examples(prompts, model.dp_rank, model.dp_size)
    agree = all_ranks_agree if model.distributed else (lambda done: done)
    results = []
    for start in range(0, len(share), batch_size):
        batch = share[start:start + batch_size]
        ids, mask = left_pad([p for _, p in batch], tok.eos_id, device=model.device)
        first = -1 if batch[0][0] is None else batch[0][0]
        sample = generate(model, ids, mask_id=tok.mask_id, eos_id=tok.eos_id, eot_id=eot, config=config,
                          attention_mask=mask if not bool(mask.all()) else None,
                          generator=keyed_generator(*key, first, device=model.device), agree=agree)
        for row, answer in enumerate(sample.answers(tok.eos_id)):
            if cut_at_eot:
                answer = strip_at_eos(answer, eot)
            results.append({"ids": answer, "reveal_steps": sample.reveal_step[row, :len(answer)].tolist(),
                            "steps_run": sample.steps_run})
    return gather_in_order(results, [index for index, _ in share], group=model.dp_group)

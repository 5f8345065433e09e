"""The reverse process reproduces the official `generate`, token for token and step for step.

- Golden fixtures: literal token ids and reveal steps of a seeded float64 toy model (logits
  depend on every position's content, so the reveal order matters) for pure diffusion,
  semi-autoregressive blocks, cfg, random remasking with temperature, and the EOS/EoT flags;
  computed once with an independent transcription of the official code
  (`official_reverse_process.py`, global RNG seeded), which the test also re-runs.
- The per-block transfer-count schedule; nothing beyond the current block is revealed;
  temperature 0 is deterministic; cfg 0 is the cfg formula at 0; stopping at EOS changes no
  answer; left-padded batches on the training model give each row its tokens alone.
- Threshold decoding reproduces an independent transcription of Fast-dLLM's
  (`fast_dllm_reference.py`: tokens, reveal steps, forwards), greedy and with temperature, on
  the toy model with its mask logit at -inf (Fast-dLLM's loop never ends when the mask token is
  predicted; the sampler never predicts it there, checked on the plain toy); threshold 1.0
  with one token per step is the exact schedule. (Caches: `test_fast_decoding.py`.)
"""

import pytest
import torch
from support.fast_dllm_reference import fast_dllm_threshold_generate
from support.official_reverse_process import official_generate

from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from pretrain.diffusion.sampling import SamplerConfig, generate, left_pad, transfer_counts

V, MASK, EOS, EOT = 12, 0, 1, 2
_gen = torch.Generator().manual_seed(20260)
TABLE = torch.randn(64, V, generator=_gen, dtype=torch.float64) * 2
MIX = torch.randn(V, V, generator=_gen, dtype=torch.float64)
TABLE[5:, EOS] += 2.5
TABLE[4:, EOT] += 1.5
PROMPT = torch.tensor([[5, 7, 3], [9, 4, 6]])


def toy(x, attention_mask=None):
    """logits[b, i] = TABLE[i] + mean over positions j of MIX[x[b, j]]."""
    return TABLE[: x.shape[1]][None] + MIX[x].mean(dim=1, keepdim=True)


CASES = {  # name: (official kwargs, this sampler's config)
    "diffusion": (dict(steps=8, gen_length=8, block_length=8), {}),
    "semi_ar": (dict(steps=6, gen_length=9, block_length=3), {}),
    "cfg": (dict(steps=4, gen_length=8, block_length=4, cfg_scale=1.5), {}),
    "random_remasking": (dict(steps=5, gen_length=10, block_length=10, remasking="random",
                              temperature=0.7), {}),
    "logits_eos_inf": (dict(steps=8, gen_length=8, block_length=8, logits_eos_inf=True), {}),
    "confidence_official": (dict(steps=8, gen_length=8, block_length=8, confidence_eos_eot_inf=True),
                            dict(confidence_eos_eot="official")),
    "confidence_both": (dict(steps=8, gen_length=8, block_length=8, corrected_confidence=True),
                        dict(confidence_eos_eot="both")),
}

GOLDEN = {  # generated tokens [b, gen_length], reveal steps [b, gen_length]
    "diffusion": ([[6, 6, 8, 1, 1, 2, 8, 2], [6, 6, 8, 1, 1, 2, 8, 2]],
                  [[1, 2, 6, 0, 3, 7, 5, 4], [0, 2, 5, 1, 3, 7, 6, 4]]),
    "semi_ar": ([[6, 6, 8, 1, 1, 2, 8, 2, 3], [6, 6, 8, 1, 1, 10, 8, 2, 3]],
                [[0, 0, 1, 2, 2, 3, 4, 4, 5], [0, 0, 1, 2, 2, 3, 4, 4, 5]]),
    "cfg": ([[6, 6, 8, 1, 1, 2, 8, 2], [6, 6, 8, 1, 10, 4, 8, 2]],
            [[0, 1, 1, 0, 3, 2, 3, 2], [0, 0, 1, 1, 2, 3, 3, 2]]),
    "random_remasking": ([[6, 6, 6, 1, 1, 2, 11, 2, 3, 1], [6, 6, 6, 1, 1, 10, 8, 2, 1, 6]],
                         [[4, 1, 3, 4, 0, 2, 1, 2, 0, 3], [0, 2, 3, 1, 2, 3, 4, 0, 1, 4]]),
    "logits_eos_inf": ([[6, 6, 8, 5, 10, 2, 8, 2], [6, 6, 8, 5, 10, 2, 8, 2]],
                       [[0, 1, 5, 7, 2, 6, 4, 3], [0, 1, 3, 7, 2, 6, 5, 4]]),
    # the official flag zeroes only EoT's confidence: EOS (1) is still revealed first
    "confidence_official": ([[6, 6, 8, 1, 1, 2, 8, 2], [6, 6, 8, 1, 1, 10, 8, 2]],
                            [[1, 2, 4, 0, 3, 7, 5, 6], [0, 2, 4, 1, 5, 3, 6, 7]]),
    # as intended: EOS and EoT predictions are revealed last
    "confidence_both": ([[6, 6, 8, 1, 1, 2, 8, 2], [6, 6, 8, 1, 1, 10, 8, 2]],
                        [[0, 1, 2, 6, 7, 4, 3, 5], [0, 1, 3, 6, 7, 2, 4, 5]]),
}


def run(name: str, **overrides):
    official, mine = CASES[name]
    fields = {k: v for k, v in official.items() if k not in ("confidence_eos_eot_inf", "corrected_confidence")}
    config = SamplerConfig(**{**fields, **mine, "stop_at_eos": False, **overrides})
    return generate(toy, PROMPT, mask_id=MASK, eos_id=EOS, eot_id=EOT, config=config,
                    generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_fixtures(name):
    tokens, reveal = GOLDEN[name]
    torch.manual_seed(7)
    x, official_reveal = official_generate(toy, PROMPT, mask_id=MASK, eos_id=EOS, eot_id=EOT, **CASES[name][0])
    assert x[:, 3:].tolist() == tokens and official_reveal.tolist() == reveal  # the reference itself
    sample = run(name)
    assert sample.ids[:, :3].tolist() == PROMPT.tolist()
    assert sample.ids[:, 3:].tolist() == tokens, name
    assert sample.reveal_step.tolist() == reveal, name


def test_the_flags_are_not_inert():
    """Controls: each flag changes the outcome of the same run."""
    base = run("diffusion").reveal_step.tolist()
    assert run("confidence_official").reveal_step.tolist() != base
    assert run("confidence_both").reveal_step.tolist() != run("confidence_official").reveal_step.tolist()
    assert 1 not in run("logits_eos_inf").ids[:, 3:].tolist()[0]
    assert run("cfg").ids.tolist() != run("cfg", cfg_scale=0.0).ids.tolist()


def test_transfer_counts_put_the_remainder_first():
    assert transfer_counts(torch.tensor([10, 3, 0, 4]), 4).tolist() == \
        [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]


def test_each_block_is_revealed_in_its_own_steps_only():
    sample = run("semi_ar")  # 3 blocks of 3, 2 steps each
    for block in range(3):
        steps = sample.reveal_step[:, 3 * block:3 * block + 3]
        assert ((steps >= 2 * block) & (steps < 2 * block + 2)).all()
        for step in (2 * block, 2 * block + 1):  # counts per step: 2 then 1 (remainder first)
            assert (sample.reveal_step == step).sum(1).tolist() == [2 - (step % 2)] * 2


def test_temperature_zero_is_deterministic_and_ignores_the_generator():
    a = run("diffusion")
    b = generate(toy, PROMPT, mask_id=MASK, eos_id=EOS, eot_id=EOT,
                 config=SamplerConfig(steps=8, gen_length=8, block_length=8, stop_at_eos=False),
                 generator=torch.Generator().manual_seed(123))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.reveal_step, b.reveal_step)


def test_cfg_zero_equals_no_guidance():
    assert torch.equal(run("cfg", cfg_scale=0.0).ids, run("cfg", cfg_scale=1e-12).ids)


def test_stopping_at_eos_changes_no_answer_and_saves_steps():
    full = run("diffusion")
    early = run("diffusion", stop_at_eos=True)
    assert early.answers(EOS) == full.answers(EOS) == [[6, 6, 8], [6, 6, 8]]
    assert early.steps_run == 7 < full.steps_run == 8  # both rows are final after step 6
    assert (early.reveal_step[:, :4] == full.reveal_step[:, :4]).all()


def test_a_collective_stop_waits_for_every_rank():
    """`agree` is what ranks decide together: one that is not done keeps everyone running."""
    never = run("diffusion", stop_at_eos=True)
    held = generate(toy, PROMPT, mask_id=MASK, eos_id=EOS, eot_id=EOT,
                    config=SamplerConfig(steps=8, gen_length=8, block_length=8),
                    agree=lambda done: False)
    assert never.steps_run == 7 and held.steps_run == 8
    assert held.answers(EOS) == never.answers(EOS)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="block_length 3 must divide gen_length 8"):
        generate(toy, PROMPT, mask_id=MASK, eos_id=EOS, eot_id=EOT,
                 config=SamplerConfig(steps=8, gen_length=8, block_length=3))
    with pytest.raises(ValueError, match="steps 5 must be a multiple of the number of blocks 2"):
        generate(toy, PROMPT, mask_id=MASK, eos_id=EOS, eot_id=EOT,
                 config=SamplerConfig(steps=5, gen_length=8, block_length=4))


def test_left_padded_batch_gives_each_row_its_tokens_alone():
    torch.manual_seed(0)
    model = LLaDAModel(ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=96,
                                   vocab_size=40, max_sequence_length=64), init_seed=3).eval()
    prompts = [[5, 9, 11, 13, 20, 21], [7, 8], [30, 31, 32, 33]]
    config = SamplerConfig(steps=8, gen_length=8, block_length=4, stop_at_eos=False)
    ids, mask = left_pad(prompts, pad_id=EOS)
    batched = generate(model, ids, mask_id=MASK, eos_id=EOS, eot_id=EOT, config=config, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), mask_id=MASK, eos_id=EOS, eot_id=EOT, config=config)
        assert batched.ids[row, ids.shape[1]:].tolist() == alone.ids[0, len(p):].tolist(), row
        assert batched.reveal_step[row].tolist() == alone.reveal_step[0].tolist(), row
    unmasked = generate(model, ids, mask_id=MASK, eos_id=EOS, eot_id=EOT, config=config)  # control
    assert unmasked.ids[1:, ids.shape[1]:].tolist() != batched.ids[1:, ids.shape[1]:].tolist()


def toy_without_mask(x, attention_mask=None):
    """The toy model never predicting the mask token, as a trained model never does."""
    return toy(x).index_fill(-1, torch.tensor([MASK]), -torch.inf)


@pytest.mark.parametrize("threshold, temperature", [(0.5, 0.0), (0.2, 0.7)])
def test_threshold_decoding_equals_fast_dllm(threshold, temperature):
    torch.manual_seed(7)
    x, reveal, forwards = fast_dllm_threshold_generate(toy_without_mask, PROMPT, 12, 6, threshold,
                                                       temperature=temperature, mask_id=MASK)
    config = SamplerConfig(gen_length=12, block_length=6, threshold=threshold, temperature=temperature,
                           stop_at_eos=False)
    sample = generate(toy_without_mask, PROMPT, mask_id=MASK, eos_id=EOS, eot_id=EOT, config=config,
                      generator=torch.Generator().manual_seed(7))
    assert sample.ids.tolist() == x.tolist() and sample.reveal_step.tolist() == reveal.tolist()
    assert sample.steps_run == forwards < 12  # premise: some steps revealed several tokens
    assert 1 in [(reveal[0] == step).sum().item() for step in range(forwards)]  # and some only one


def test_threshold_one_with_one_token_per_step_is_the_exact_schedule():
    exact = SamplerConfig(steps=12, gen_length=12, block_length=6, stop_at_eos=False)
    a = generate(toy_without_mask, PROMPT, mask_id=MASK, eos_id=EOS, eot_id=EOT, config=exact)
    b = generate(toy_without_mask, PROMPT, mask_id=MASK, eos_id=EOS, eot_id=EOT,
                 config=SamplerConfig(**{**exact.__dict__, "threshold": 1.0}))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.reveal_step, b.reveal_step) and a.steps_run == b.steps_run


def test_threshold_decoding_never_predicts_the_mask_token():
    assert (toy(torch.tensor([[MASK] * 12])).argmax(-1) == MASK).any()  # premise: the plain toy would
    sample = generate(toy, PROMPT, mask_id=MASK, eos_id=EOS, eot_id=EOT,
                      config=SamplerConfig(gen_length=12, block_length=6, threshold=0.5, stop_at_eos=False))
    assert not bool((sample.ids == MASK).any()) and sample.steps_run <= 12

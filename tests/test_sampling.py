"""The reverse process reproduces the official `generate` (its head), token for token and step for step.

- Golden fixtures: literal token ids and reveal steps of a seeded float64 toy model (logits
  depend on every position's content, so the reveal order matters) for pure diffusion,
  semi-autoregressive blocks, cfg, random remasking greedy and with temperature, and the EOS/EoT
  flags greedy and sampled; computed once with an independent transcription of the official code
  (`official_reverse_process.py`, global RNG seeded), which the test also re-runs. Random
  remasking at temperature 0 draws no Gumbel noise (control: the same run with that draw added
  comes out different).
- Hand-computable logits (5 tokens, one favourite per position): the official EOS/EoT flag zeroes
  EOS and EoT at temperature 0 and EoT alone above it; bf16 logits whose top probabilities round
  to 1.0 tie, and the official softmax in the model's dtype reveals a different position (and so
  token) than float64 does, on the exact and the threshold path (where float64 is Fast-dLLM's
  choice, which the sampler reproduces under `confidence_dtype="float64"`); threshold decoding
  with the flags and the early stop.
- cfg on left-padded batches against the official code (which doubles the attention mask and
  masks the padding in the unconditional branch) on a toy that honours the attention mask and a
  KV cache (one layer, so the cache is exact): the cached cfg decode equals the exact one, and a
  cache never refreshed does not.
- The per-block transfer-count schedule; nothing beyond the current block is revealed;
  temperature 0 is deterministic; cfg 0 is the cfg formula at 0; stopping at EOS changes no
  answer; left-padded batches on the training model give each row its tokens alone.
- Threshold decoding reproduces an independent transcription of Fast-dLLM's
  (`fast_dllm_reference.py`: tokens, reveal steps, forwards), greedy and with temperature, on
  the toy model with its mask logit at -inf (Fast-dLLM's loop never ends when the mask token is
  predicted; the sampler never predicts it there, checked on the plain toy); threshold 1.0
  with one token per step is the exact schedule. (Caches on trained models: `test_fast_decoding.py`.)
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
    "random_greedy": (dict(steps=5, gen_length=10, block_length=10, remasking="random"), {}),
    "sampled": (dict(steps=8, gen_length=8, block_length=8, temperature=0.7), {}),
    "logits_eos_inf": (dict(steps=8, gen_length=8, block_length=8, logits_eos_inf=True), {}),
    "confidence_official": (dict(steps=8, gen_length=8, block_length=8, confidence_eos_eot_inf=True),
                            dict(confidence_eos_eot="official")),
    "confidence_both": (dict(steps=8, gen_length=8, block_length=8, corrected_confidence=True),
                        dict(confidence_eos_eot="both")),
    "confidence_official_sampled": (dict(steps=8, gen_length=8, block_length=8, temperature=0.7,
                                         confidence_eos_eot_inf=True), dict(confidence_eos_eot="official")),
    "confidence_both_sampled": (dict(steps=8, gen_length=8, block_length=8, temperature=0.7,
                                     corrected_confidence=True), dict(confidence_eos_eot="both")),
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
    # no Gumbel noise at temperature 0: the random confidences are the generator's first draws
    "random_greedy": ([[6, 6, 8, 1, 1, 2, 8, 2, 1, 1], [6, 6, 8, 1, 1, 10, 8, 2, 3, 1]],
                      [[4, 1, 3, 2, 2, 1, 0, 0, 3, 4], [2, 1, 0, 3, 0, 3, 4, 2, 4, 1]]),
    "sampled": ([[6, 6, 6, 1, 1, 10, 8, 2], [6, 6, 8, 1, 1, 2, 8, 2]],
                [[0, 2, 6, 1, 3, 7, 5, 4], [0, 2, 5, 1, 3, 6, 7, 4]]),
    "logits_eos_inf": ([[6, 6, 8, 5, 10, 2, 8, 2], [6, 6, 8, 5, 10, 2, 8, 2]],
                       [[0, 1, 5, 7, 2, 6, 4, 3], [0, 1, 3, 7, 2, 6, 5, 4]]),
    # greedy, the official flag zeroes EOS and EoT: EOS (1) and EoT (2) predictions come last
    "confidence_official": ([[6, 6, 8, 1, 1, 2, 8, 2], [6, 6, 8, 1, 1, 10, 8, 2]],
                            [[0, 1, 2, 6, 7, 4, 3, 5], [0, 1, 3, 6, 7, 2, 4, 5]]),
    "confidence_both": ([[6, 6, 8, 1, 1, 2, 8, 2], [6, 6, 8, 1, 1, 10, 8, 2]],
                        [[0, 1, 2, 6, 7, 4, 3, 5], [0, 1, 3, 6, 7, 2, 4, 5]]),
    # sampled, the official flag zeroes EoT alone: EOS is revealed early, unlike "both"
    "confidence_official_sampled": ([[6, 6, 8, 1, 1, 9, 8, 1], [6, 6, 8, 1, 1, 10, 8, 2]],
                                    [[0, 2, 4, 1, 3, 6, 5, 7], [0, 2, 4, 1, 6, 3, 5, 7]]),
    "confidence_both_sampled": ([[6, 6, 8, 1, 10, 9, 8, 3], [6, 6, 8, 1, 10, 10, 8, 3]],
                                [[0, 1, 2, 7, 4, 6, 5, 3], [0, 1, 4, 6, 7, 3, 5, 2]]),
}


def run(name: str, model_fn=toy, generator=None, **overrides):
    official, mine = CASES[name]
    fields = {k: v for k, v in official.items() if k not in ("confidence_eos_eot_inf", "corrected_confidence")}
    config = SamplerConfig(**{**fields, **mine, "stop_at_eos": False, **overrides})
    return generate(model_fn, PROMPT, mask_id=MASK, eos_id=EOS, eot_id=EOT, config=config,
                    generator=generator or torch.Generator().manual_seed(7))


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
    """Controls: each flag changes the outcome of the same run; the official flag is "both" when
    greedy and differs from it (and from no flag) when sampling."""
    assert GOLDEN["confidence_official"][1] != GOLDEN["diffusion"][1]
    assert GOLDEN["confidence_official"] == GOLDEN["confidence_both"]
    assert GOLDEN["confidence_official_sampled"] != GOLDEN["confidence_both_sampled"]
    assert GOLDEN["confidence_official_sampled"] != GOLDEN["sampled"]
    assert 1 not in run("logits_eos_inf").ids[:, 3:].tolist()[0]
    assert run("cfg").ids.tolist() != run("cfg", cfg_scale=0.0).ids.tolist()


def test_random_remasking_draws_no_gumbel_noise_when_greedy():
    """Control: a run that also draws the float64 Gumbel noise of the logits' shape before the
    random confidences (what the sampler did for the earlier official revision) comes out different."""
    generator = torch.Generator().manual_seed(7)

    def toy_drawing_noise(x, attention_mask=None):
        torch.rand((*x.shape, V), generator=generator, dtype=torch.float64)
        return toy(x)

    extra_draw = run("random_greedy", model_fn=toy_drawing_noise, generator=generator)
    assert extra_draw.reveal_step.tolist() != GOLDEN["random_greedy"][1]


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
    with pytest.raises(ValueError, match="confidence_dtype 'bfloat16' is not one of model, float64"):
        generate(toy, PROMPT, mask_id=MASK, eos_id=EOS, eot_id=EOT,
                 config=SamplerConfig(steps=8, gen_length=8, block_length=8, confidence_dtype="bfloat16"))


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


# ---------------------------------------------------------------------------------------------
# Hand-computable logits: 5 tokens (MASK, EOS, EOT, A, B), each position one favourite token at
# logit a, the other three 0, the mask -inf: the favourite's probability is e^a / (e^a + 3).
# ---------------------------------------------------------------------------------------------
A, B = 3, 4


def favourites(*rows, dtype=torch.float64):
    """A model whose position i (the prompt's included) gives logit rows[i][1] to token rows[i][0]."""
    def model_fn(x, attention_mask=None):
        logits = torch.zeros(*x.shape, 5, dtype=dtype)
        logits[..., MASK] = -torch.inf
        for position, (token, logit) in enumerate(rows):
            logits[:, position, token] = logit
        return logits
    return model_fn


def hand(model_fn, gen_length, **fields):
    config = SamplerConfig(**{"steps": gen_length, "gen_length": gen_length, "block_length": gen_length,
                              "stop_at_eos": False, **fields})
    return generate(model_fn, torch.tensor([[A]]), mask_id=MASK, eos_id=EOS, eot_id=EOT, config=config,
                    generator=torch.Generator().manual_seed(0))


# after the prompt: EOS at 4 (p 0.948), EoT at 3 (0.870), A at 2 (0.711); one reveal per step
EOS_EOT_A = favourites((A, 0), (EOS, 4), (EOT, 3), (A, 2))


@pytest.mark.parametrize("flag, temperature, reveal", [
    ("off", 0.0, [0, 1, 2]),          # by probability
    ("official", 0.0, [1, 2, 0]),     # EOS and EoT at 0: A first (now 0.881), then the tie at 0 in order
    ("both", 0.0, [1, 2, 0]),
    ("official", 0.01, [0, 2, 1]),    # sampled: EoT alone at 0, EOS (now 0.965) still first
    ("both", 0.01, [1, 2, 0]),
])
def test_the_official_flag_zeroes_eos_too_when_greedy(flag, temperature, reveal):
    """Temperature 0.01 keeps every favourite (a logit gap of 2 outweighs any Gumbel factor), so
    only the flag moves the order. The EoT-only order [0, 2, 1] at temperature 0 was the old reading."""
    sample = hand(EOS_EOT_A, 3, confidence_eos_eot=flag, temperature=temperature)
    assert sample.ids[0, 1:].tolist() == [EOS, EOT, A]
    assert sample.reveal_step[0].tolist() == reveal
    torch.manual_seed(0)
    _, official = official_generate(EOS_EOT_A, torch.tensor([[A]]), 3, 3, 3, temperature=temperature,
                                    mask_id=MASK, eos_id=EOS, eot_id=EOT,
                                    confidence_eos_eot_inf=flag == "official", corrected_confidence=flag == "both")
    assert official.tolist() == [reveal]


def tie_toy(x, attention_mask=None):
    """bf16 logits: position 1 favours A at 5 (p 0.9802 -> bf16 0.9805), position 2 favours B at
    8.25 while position 3 is masked and A once it is not (p 0.99922 -> 1.0), position 3 favours A
    at 9 (p 0.99963 -> 1.0): in bf16 positions 2 and 3 tie at 1.0."""
    rows = torch.zeros(*x.shape, 5, dtype=torch.bfloat16)
    rows[..., MASK] = -torch.inf
    rows[:, 1, A] = 5.0
    rows[:, 2, B] = torch.where(x[:, 3] == MASK, 8.25, 0.0).to(torch.bfloat16)
    rows[:, 2, A] = torch.where(x[:, 3] == MASK, 0.0, 8.25).to(torch.bfloat16)
    rows[:, 3, A] = 9.0
    return rows


def test_bf16_confidences_tie_and_the_official_softmax_keeps_the_first():
    probabilities = torch.softmax(tie_toy(torch.tensor([[A, MASK, MASK, MASK]])), dim=-1).amax(-1)[0, 1:]
    assert probabilities.tolist() == [0.98046875, 1.0, 1.0]  # premise: the tie
    official = hand(tie_toy, 3)  # topk keeps position 2 (lowest of the tie) while 3 is masked: B
    assert official.ids[0, 1:].tolist() == [A, B, A] and official.reveal_step[0].tolist() == [2, 0, 1]
    x, reveal = official_generate(tie_toy, torch.tensor([[A]]), 3, 3, 3, mask_id=MASK, eos_id=EOS, eot_id=EOT)
    assert x.tolist() == official.ids.tolist() and reveal.tolist() == official.reveal_step.tolist()
    float64 = hand(tie_toy, 3, confidence_dtype="float64")  # control: 0.99963 > 0.99922, position 3 first
    assert float64.ids[0, 1:].tolist() == [A, A, A] and float64.reveal_step[0].tolist() == [2, 1, 0]


def test_bf16_threshold_decoding_float64_is_fast_dllm_and_model_dtype_is_not():
    """Threshold 0.9995: in float64 only position 3 (0.99963) passes at step 0; in bf16 the tie
    at 1.0 reveals positions 2 (first of the ranking, while 3 is masked: B) and 3 together."""
    torch.manual_seed(0)
    x, reveal, forwards = fast_dllm_threshold_generate(tie_toy, torch.tensor([[A]]), 3, 3, 0.9995, mask_id=MASK)
    float64 = hand(tie_toy, 3, threshold=0.9995, confidence_dtype="float64")
    assert float64.ids.tolist() == x.tolist() == [[A, A, A, A]]
    assert float64.reveal_step.tolist() == reveal.tolist() == [[2, 1, 0]] and float64.steps_run == forwards == 3
    model = hand(tie_toy, 3, threshold=0.9995)
    assert model.ids.tolist() == [[A, A, B, A]] and model.reveal_step.tolist() == [[1, 0, 0]] and model.steps_run == 2


# after the prompt: A at 4 (p 0.948), then EOS at 5 (0.980), 3 (0.870) and 2.5 (0.802)
A_EOS_EOS_EOS = favourites((A, 0), (A, 4), (EOS, 5), (EOS, 3), (EOS, 2.5))


@pytest.mark.parametrize("flag, temperature, stop_at_eos, reveal, steps_run", [
    # >= 0.9: positions 1 and 2 at step 0, and the answer [A] has ended
    ("off", 0.0, True, [0, 0, -1, -1], 1),
    ("off", 0.0, False, [0, 0, 1, 2], 3),
    # EOS and EoT at 0: A (0.982) alone, then the first of the EOS tied at 0 (topk ranks position 2
    # first), and the answer has ended
    ("official", 0.0, True, [0, 1, -1, -1], 2),
    ("both", 0.0, True, [0, 1, -1, -1], 2),
    # EoT alone at 0: A 0.965, EOS 0.987, 0.909 pass together, and the answer has ended
    ("official", 0.01, True, [0, 0, 0, -1], 1),
])
def test_threshold_decoding_with_the_eos_flags_and_the_early_stop(flag, temperature, stop_at_eos, reveal,
                                                                   steps_run):
    sample = hand(A_EOS_EOS_EOS, 4, threshold=0.9, confidence_eos_eot=flag, temperature=temperature,
                  stop_at_eos=stop_at_eos)
    assert sample.reveal_step[0].tolist() == reveal and sample.steps_run == steps_run
    assert sample.answers(EOS) == [[A]]
    if flag == "off" and not stop_at_eos:  # Fast-dLLM has no flags and no early stop
        torch.manual_seed(0)
        x, fast_reveal, forwards = fast_dllm_threshold_generate(A_EOS_EOS_EOS, torch.tensor([[A]]), 4, 4, 0.9,
                                                                mask_id=MASK)
        assert x.tolist() == sample.ids.tolist() and fast_reveal.tolist() == [reveal] and forwards == steps_run


# ---------------------------------------------------------------------------------------------
# cfg on left-padded batches, with and without a KV cache
# ---------------------------------------------------------------------------------------------
def attending_toy(x, attention_mask=None, past_key_values=None, cache_position=None):
    """A one-layer stand-in that honours the attention mask and a KV cache: logits[b, i] =
    TABLE[i] + the mean of the keys MIX[x[b, j]] over the positions j row b attends to (the mask
    token at -1e4, never predicted: cfg keeps it finite). A whole forward with a cache keeps every
    key; a window's call writes its fresh keys in and reads the rest from the cache."""
    keys = MIX[x]
    if past_key_values is not None:
        if cache_position is None:
            past_key_values.keys = [keys.clone()]
        else:
            past_key_values.keys[0][:, cache_position] = keys
            keys = past_key_values.keys[0]
    weights = torch.ones(keys.shape[:2], dtype=keys.dtype) if attention_mask is None else attention_mask.double()
    context = (keys * weights[..., None]).sum(1, keepdim=True) / weights.sum(1)[:, None, None]
    positions = torch.arange(x.shape[1]) if cache_position is None else cache_position
    return (TABLE[positions][None] + context).index_fill(-1, torch.tensor([MASK]), -1e4)


class NeverRefreshed:
    """Control: every cache holds the keys of the first whole forward."""

    def __init__(self):
        self.first = None

    def __call__(self, x, attention_mask=None, past_key_values=None, cache_position=None):
        logits = attending_toy(x, attention_mask, past_key_values, cache_position)
        if past_key_values is not None and cache_position is None:
            self.first = past_key_values.keys[0].clone() if self.first is None else self.first
            past_key_values.keys = [self.first.clone()]
        return logits


PADDED_IDS, PADDED_MASK = left_pad([[8, 7, 3], [6]], pad_id=EOS)
CFG = SamplerConfig(steps=8, gen_length=8, block_length=4, cfg_scale=1.5, stop_at_eos=False)
CFG_GOLDEN = ([[6, 6, 8, 1, 1, 2, 8, 2], [6, 6, 8, 1, 1, 4, 4, 2]],
              [[0, 1, 3, 2, 6, 5, 7, 4], [0, 2, 3, 1, 4, 6, 7, 5]])


def padded(model_fn, config, attention_mask=PADDED_MASK):
    return generate(model_fn, PADDED_IDS, mask_id=MASK, eos_id=EOS, eot_id=EOT, config=config,
                    attention_mask=attention_mask)


def test_cfg_on_a_left_padded_batch_is_the_official_one():
    x, reveal = official_generate(attending_toy, PADDED_IDS, 8, 8, 4, cfg_scale=1.5, mask_id=MASK, eos_id=EOS,
                                  eot_id=EOT, attention_mask=PADDED_MASK)
    assert (x[:, 3:].tolist(), reveal.tolist()) == CFG_GOLDEN
    sample = padded(attending_toy, CFG)
    assert (sample.ids[:, 3:].tolist(), sample.reveal_step.tolist()) == CFG_GOLDEN
    assert padded(attending_toy, CFG, attention_mask=None).ids[1].tolist() != sample.ids[1].tolist()  # control


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cfg_with_a_kv_cache_caches_the_guided_batch(cache):
    """Threshold 1.0 with one step per token is the exact schedule; the toy's cache is exact, so
    refreshing at block starts only gives the exact cfg decode; a stale cache does not."""
    config = SamplerConfig(**{**CFG.__dict__, "threshold": 1.0, "cache": cache})
    sample = padded(attending_toy, config)
    assert (sample.ids[:, 3:].tolist(), sample.reveal_step.tolist()) == CFG_GOLDEN
    assert padded(NeverRefreshed(), config).ids.tolist() != sample.ids.tolist()


# ---------------------------------------------------------------------------------------------
# logits_at="block": the head only where a token can be revealed
# ---------------------------------------------------------------------------------------------
class HeadRows:
    """A real LLaDAModel that counts the positions its head scored (the control: an exact path
    that did no less work would not be one)."""

    def __init__(self):
        self.model = LLaDAModel(ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=96,
                                            vocab_size=40, max_sequence_length=64), init_seed=11).eval()
        self.rows = 0

    def __call__(self, ids, attention_mask=None, **forward):
        logits = self.model(ids, attention_mask=attention_mask, **forward)
        self.rows += logits.shape[0] * logits.shape[1]
        return logits


BLOCK_CASES = {  # name: (official kwargs, SamplerConfig fields); 3 blocks of 4 after a 6-token prompt
    "greedy": ({}, {}),
    "greedy, random remasking": ({"remasking": "random"}, {"remasking": "random"}),
    "greedy, cfg, official flag": ({"cfg_scale": 1.0, "confidence_eos_eot_inf": True},
                                   {"cfg_scale": 1.0, "confidence_eos_eot": "official"}),
}


@pytest.mark.parametrize("name", list(BLOCK_CASES))
def test_block_logits_give_the_official_tokens_with_less_head_work(name):
    official_kwargs, fields = BLOCK_CASES[name]
    prompts, _ = left_pad([[5, 9, 11, 13, 20, 21], [7, 8, 30]], pad_id=EOS)
    _, attention_mask = left_pad([[5, 9, 11, 13, 20, 21], [7, 8, 30]], pad_id=EOS)
    full, block = HeadRows(), HeadRows()
    torch.manual_seed(4)
    x, reveal = official_generate(full, prompts, 12, 12, 4, mask_id=MASK, eos_id=EOS, eot_id=EOT,
                                  attention_mask=attention_mask, **official_kwargs)
    config = SamplerConfig(steps=12, gen_length=12, block_length=4, stop_at_eos=False, logits_at="block", **fields)
    sample = generate(block, prompts, mask_id=MASK, eos_id=EOS, eot_id=EOT, config=config,
                      attention_mask=attention_mask, generator=torch.Generator().manual_seed(4))
    assert sample.ids.tolist() == x.tolist() and sample.reveal_step.tolist() == reveal.tolist()
    guided = 2 if fields.get("cfg_scale") else 1
    assert full.rows == guided * 2 * 12 * 18  # every step scores the whole sequence
    # from the first position still masked to the block's end (this random model sometimes
    # "reveals" the mask id, which leaves a position masked: the head then reaches back to it)
    assert guided * 2 * (4 + 3 + 2 + 1) * 3 <= block.rows <= full.rows / 2


def test_block_logits_follow_masks_in_the_prompt_and_the_cache():
    """Infilling: a mask inside the prompt can be revealed in any block, so the head covers it;
    with a dual cache the window is the block and the logits cover the rest of it."""
    model = HeadRows()
    prompt = torch.tensor([[5, MASK, 11, 13]])
    config = SamplerConfig(steps=8, gen_length=8, block_length=4, stop_at_eos=False)
    sequence = generate(model, prompt, mask_id=MASK, eos_id=EOS, eot_id=EOT, config=config)
    block = generate(model, prompt, mask_id=MASK, eos_id=EOS, eot_id=EOT,
                     config=SamplerConfig(**{**config.__dict__, "logits_at": "block"}))
    assert block.ids.tolist() == sequence.ids.tolist() and block.ids[0, 1] != MASK
    cached = SamplerConfig(steps=8, gen_length=8, block_length=4, stop_at_eos=False, cache="dual")
    plain = generate(model, prompt[:, [0, 2, 3]], mask_id=MASK, eos_id=EOS, eot_id=EOT, config=cached)
    model.rows = 0
    fast = generate(model, prompt[:, [0, 2, 3]], mask_id=MASK, eos_id=EOS, eot_id=EOT,
                    config=SamplerConfig(**{**cached.__dict__, "logits_at": "block"}))
    assert fast.ids.tolist() == plain.ids.tolist()
    assert (4 + 3 + 2 + 1) * 2 <= model.rows <= 4 * 8  # refresh steps included: within the block


def test_block_logits_at_temperature_draw_their_own_noise():
    """Above temperature 0 the Gumbel noise covers the block's positions only: another random
    stream than the official one (documented), so the seeded tokens differ (a control that the
    comparison above can fail)."""
    model = HeadRows()
    config = SamplerConfig(steps=8, gen_length=8, block_length=4, temperature=1.0, stop_at_eos=False)
    draws = [generate(model, PROMPT, mask_id=MASK, eos_id=EOS, eot_id=EOT,
                      config=SamplerConfig(**{**config.__dict__, "logits_at": at}),
                      generator=torch.Generator().manual_seed(0)).ids.tolist() for at in ("sequence", "block")]
    assert draws[0] != draws[1]

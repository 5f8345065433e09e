"""Hand-checked values for the training objectives (DESIGN.md section 1, Algorithms 1 and 2).

The losses are the whole method: a wrong denominator, a missing 1/p_mask, a masked prompt token
or an untrained padding EOS all train a plausible-looking but different model, and nothing
downstream would notice. So every loss here is compared with a literal number worked out by hand
(the arithmetic is in the comments) for a tiny batch whose logits, t and masks are all fixed,
never with a value the code under test computes itself; the forward process is checked for its
p_mask formula, its per-row masking rate and its reproducibility from a seeded generator.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from pretrain.diffusion.objectives import (
    ar_loss,
    forward_process,
    next_token_targets,
    p_mask_of,
    pretrain_loss,
    sft_loss,
    sft_noise,
    token_cross_entropy,
)

LN2, LN3, LN4, LN5, LN7 = (math.log(v) for v in (2.0, 3.0, 4.0, 5.0, 7.0))
MASK_ID = 3  # vocabulary {0, 1, 2, 3}; 3 is the mask row, never a data token here


# ---------------------------------------------------------------------------------------------
# A 2 x 4 pretraining batch, vocabulary 4.
#
# A row of logits [ln a, ln b, ln c, ln d] gives softmax (a, b, c, d) / (a + b + c + d), so the
# cross-entropy of target j is ln(sum / weight_j). Masked positions:
#   row 0 (t = 1.0 -> p_mask = 0.999 * 1.0 + 0.001 = 1.0):
#     pos 0, target 0, logits [ln3, 0, 0, 0] -> weights (3,1,1,1) -> CE = ln(6/3) = ln 2
#     pos 2, target 2, logits [0, 0, 0, 0]   -> CE = ln 4
#   row 1 (t = 0.5 -> p_mask = 0.999 * 0.5 + 0.001 = 0.5005):
#     pos 1, target 2, logits [0, 0, ln5, 0]   -> weights (1,1,5,1) -> CE = ln(8/5)
#     pos 2, target 1, logits [0, 0, ln5, 0]   -> CE = ln(8/1) = ln 8
#     pos 3, target 0, logits [ln2, ln2, 0, 0] -> weights (2,2,1,1) -> CE = ln(6/2) = ln 3
# Unmasked positions get arbitrary logits that must not matter.
#
# Algorithm 1: [ (ln2 + ln4) / 1.0 + (ln1.6 + ln8 + ln3) / 0.5005 ] / (2 * 4)
#            = [ 2.0794415 + 3.6480575 / 0.5005 ] / 8 = 1.1710335
# ---------------------------------------------------------------------------------------------
PRETRAIN_LOSS = 1.171033454346763
# Cut to length 2 (the 1% variable-length rule): masked are row 0 pos 0 and row 1 pos 1 only;
# [ ln2 / 1.0 + ln1.6 / 0.5005 ] / (2 * 2) = (0.6931472 + 0.9390741) / 4 = 0.4080538
PRETRAIN_LOSS_LEN2 = 0.4080538427152789


def _pretrain_case():
    input_ids = torch.tensor([[0, 1, 2, 0],
                              [2, 2, 1, 0]])
    masked = torch.tensor([[True, False, True, False],
                           [False, True, True, True]])
    t = torch.tensor([1.0, 0.5])
    logits = torch.tensor([
        [[LN3, 0, 0, 0], [5.0, -2.0, 1.0, 0.0], [0, 0, 0, 0], [1.0, 2.0, 3.0, 4.0]],
        [[0.0, 1.0, 0.0, 1.0], [0, 0, LN5, 0], [0, 0, LN5, 0], [LN2, LN2, 0, 0]],
    ], dtype=torch.float32)
    return input_ids, masked, t, logits


def test_pretrain_loss_matches_hand_computed_algorithm_1():
    input_ids, masked, t, logits = _pretrain_case()
    nb = forward_process(input_ids, MASK_ID, t=t, masked=masked)
    assert nb.p_mask.tolist() == pytest.approx([1.0, 0.5005])
    assert nb.noisy.tolist() == [[MASK_ID, 1, MASK_ID, 0], [2, MASK_ID, MASK_ID, MASK_ID]]
    loss = pretrain_loss(logits, input_ids, nb)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(PRETRAIN_LOSS, rel=1e-6)


def test_pretrain_loss_ignores_logits_at_unmasked_positions():
    input_ids, masked, t, logits = _pretrain_case()
    nb = forward_process(input_ids, MASK_ID, t=t, masked=masked)
    scrambled = logits.clone()
    scrambled[~masked] = torch.tensor([-7.0, 9.0, 0.5, 3.0])
    assert pretrain_loss(scrambled, input_ids, nb).item() == pytest.approx(PRETRAIN_LOSS, rel=1e-6)


def test_pretrain_loss_runs_in_fp32_for_bf16_logits():
    input_ids, masked, t, logits = _pretrain_case()
    nb = forward_process(input_ids, MASK_ID, t=t, masked=masked)
    loss = pretrain_loss(logits.to(torch.bfloat16), input_ids, nb)
    assert loss.dtype == torch.float32
    # bf16 rounding of ln3 / ln5 / ln2 moves the value by well under 1%.
    assert loss.item() == pytest.approx(PRETRAIN_LOSS, rel=1e-2)


def test_pretrain_gradient_is_exactly_zero_at_unmasked_positions():
    input_ids, masked, t, logits = _pretrain_case()
    nb = forward_process(input_ids, MASK_ID, t=t, masked=masked)
    logits = logits.clone().requires_grad_(True)
    pretrain_loss(logits, input_ids, nb).backward()
    grad = logits.grad
    assert torch.equal(grad[~masked], torch.zeros_like(grad[~masked]))
    # ... and nonzero at every masked position (each one's softmax differs from its one-hot).
    assert (grad[masked].abs().sum(-1) > 0).all()


def test_pretrain_denominator_is_batch_times_shortened_length():
    input_ids, masked, t, logits = _pretrain_case()
    ids2, masked2, logits2 = input_ids[:, :2], masked[:, :2], logits[:, :2]
    nb = forward_process(ids2, MASK_ID, t=t, masked=masked2)
    loss = pretrain_loss(logits2, ids2, nb)
    # b * l = 4 here; the masked count is 2, and the uncut length 4 would give b * l = 8.
    assert loss.item() == pytest.approx(PRETRAIN_LOSS_LEN2, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# An SFT batch, length 5, vocabulary 4, EOS = 2 (also the padding), mask = 3.
#   row 0: prompt [0, 1] (length 2), answer [1, EOS] right-padded with one EOS -> answer length 3
#          t = 0.5 -> p_mask 0.5005; masked: pos 2 and pos 4 (the padding EOS)
#          pos 2, target 1, logits [0, ln3, 0, 0] -> weights (1,3,1,1) -> CE = ln(6/3) = ln 2
#          pos 4, target 2, logits [0, 0, 0, 0]   -> CE = ln 4
#          row value = (ln2 + ln4) / 0.5005 / 3 = 2.0794415 / 1.5015 = 1.3849095
#   row 1: prompt [0] (length 1), answer [1, 0, 1, EOS] -> answer length 4
#          t = 1.0 -> p_mask 1.0; masked: pos 1, 2, 4
#          pos 1, target 1, logits [ln2, 0, 0, 0] -> weights (2,1,1,1) -> CE = ln(5/1) = ln 5
#          pos 2, target 0, logits [ln2, 0, 0, 0] -> CE = ln(5/2)
#          pos 4, target 2, logits [0, 0, ln7, 0] -> weights (1,1,7,1) -> CE = ln(10/7)
#          row value = (ln5 + ln2.5 + ln(10/7)) / 1.0 / 4 = ln(17.857143) / 4 = 0.7206009
#   Algorithm 2: mean over rows = (1.3849095 + 0.7206009) / 2 = 1.0527552
# ---------------------------------------------------------------------------------------------
SFT_LOSS = 1.0527551743649846
EOS = 2


def _sft_case():
    input_ids = torch.tensor([[0, 1, 1, EOS, EOS],
                              [0, 1, 0, 1, EOS]])
    prompt_lengths = torch.tensor([2, 1])
    t = torch.tensor([0.5, 1.0])
    masked = torch.tensor([[False, False, True, False, True],
                           [False, True, True, False, True]])
    z = [0.0, 0.0, 0.0, 0.0]
    logits = torch.tensor([
        [[4.0, 1.0, 0.0, 0.0], [0.0, 3.0, 2.0, 1.0], [0, LN3, 0, 0], [1.0, 1.0, 5.0, 0.0], z],
        [[2.0, 0.0, 1.0, 0.0], [LN2, 0, 0, 0], [LN2, 0, 0, 0], [0.0, 6.0, 0.0, 0.0], [0, 0, LN7, 0]],
    ], dtype=torch.float32)
    return input_ids, prompt_lengths, t, masked, logits


def test_sft_loss_matches_hand_computed_algorithm_2():
    input_ids, prompt_lengths, t, masked, logits = _sft_case()
    nb = sft_noise(input_ids, prompt_lengths, MASK_ID, t=t, masked=masked)
    assert nb.masked.tolist() == masked.tolist()
    loss = sft_loss(logits, input_ids, prompt_lengths, nb)
    assert loss.item() == pytest.approx(SFT_LOSS, rel=1e-6)


def test_sft_padding_eos_is_masked_and_trained():
    input_ids, prompt_lengths, t, masked, logits = _sft_case()
    nb = sft_noise(input_ids, prompt_lengths, MASK_ID, t=t, masked=masked)
    assert nb.noisy[0, 4].item() == MASK_ID  # the padding EOS is noised like any answer token
    logits = logits.clone().requires_grad_(True)
    sft_loss(logits, input_ids, prompt_lengths, nb).backward()
    assert logits.grad[0, 4].abs().sum() > 0  # and it receives gradient
    assert torch.equal(logits.grad[~masked], torch.zeros_like(logits.grad[~masked]))


def test_sft_noise_never_masks_prompt_tokens_even_when_asked():
    input_ids, prompt_lengths, t, _, _ = _sft_case()
    everything = torch.ones_like(input_ids, dtype=torch.bool)
    nb = sft_noise(input_ids, prompt_lengths, MASK_ID, t=t, masked=everything)
    assert nb.masked.tolist() == [[False, False, True, True, True],
                                  [False, True, True, True, True]]
    assert nb.noisy.tolist() == [[0, 1, MASK_ID, MASK_ID, MASK_ID],
                                 [0, MASK_ID, MASK_ID, MASK_ID, MASK_ID]]
    assert nb.p_mask.tolist() == pytest.approx([0.5005, 1.0])


def test_sft_noise_with_generator_keeps_prompt_clean():
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, 3, (64, 32), generator=torch.Generator().manual_seed(1))
    prompt_lengths = torch.randint(0, 32, (64,), generator=torch.Generator().manual_seed(2))
    nb = sft_noise(input_ids, prompt_lengths, MASK_ID, generator=g)
    pos = torch.arange(32)[None, :]
    in_prompt = pos < prompt_lengths[:, None]
    assert not nb.masked[in_prompt].any()
    assert torch.equal(nb.noisy[in_prompt], input_ids[in_prompt])
    assert nb.masked[~in_prompt].any()


# ---------------------------------------------------------------------------------------------
# AR loss, ids [[0, 1, 2], [2, 0, 0]]: position i predicts token i + 1.
#   row 0: pos 0 -> 1, logits [ln3, 0, 0, 0] -> weights (3,1,1,1) -> CE = ln(6/1) = ln 6
#          pos 1 -> 2, logits [0, 0, 0, 0]   -> CE = ln 4
#   row 1: pos 0 -> 0, logits [ln3, 0, 0, 0] -> CE = ln(6/3) = ln 2
#          pos 1 -> 0, logits [0, ln2, 0, 0] -> weights (1,2,1,1) -> CE = ln(5/1) = ln 5
#   (the last position predicts nothing: its logits must not matter)
#   mean over b * (l - 1) = 4 targets: (ln6 + ln4 + ln2 + ln5) / 4 = ln(240) / 4 = 1.3701597
# ---------------------------------------------------------------------------------------------
AR_LOSS = 1.3701597308354978


def test_ar_loss_matches_hand_computed_value():
    input_ids = torch.tensor([[0, 1, 2], [2, 0, 0]])
    logits = torch.tensor([
        [[LN3, 0, 0, 0], [0, 0, 0, 0], [9.0, -3.0, 2.0, 1.0]],
        [[LN3, 0, 0, 0], [0, LN2, 0, 0], [-1.0, 4.0, 0.0, 8.0]],
    ], dtype=torch.float32)
    assert ar_loss(logits, input_ids).item() == pytest.approx(AR_LOSS, rel=1e-6)


def test_ar_loss_of_a_length_1_batch_is_0_with_a_zero_gradient():
    """The 1% random-length rule can cut a micro-batch to one token: no position has a next
    token, so the loss is 0 (the sum over no positions, divided by the count clamped to 1) and
    the position is still scored, so the loss has a (zero) gradient."""
    input_ids = torch.tensor([[2], [0]])
    logits = torch.tensor([[[LN3, 0, 0, 0]], [[0, LN2, 0, 0]]], requires_grad=True)
    targets, loss_mask = next_token_targets(input_ids)
    assert loss_mask.tolist() == [[True], [True]]
    loss = ar_loss(logits, input_ids)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    # control: the mean over the b x (l - 1) = 0 positions with a target is NaN
    assert math.isnan(token_cross_entropy(logits, targets)[:, :-1].mean().item())
    assert next_token_targets(torch.tensor([[0, 1, 2]]))[1].tolist() == [[True, True, False]]


def test_ar_training_through_length_1_micro_batches_has_finite_losses_and_skips_nothing(tmp_path, subprocess_env):
    """`train.objective=arm` with every micro-batch cut to a random length in {1, 2}
    (data.seq_len=2, data.variable_length_prob=1): the steps whose micro-batch has length 1 (4
    tokens) log loss 0 and gradient norm 0, the others a positive loss, and the guard rails
    count no step skipped."""
    overrides = ["model.n_layers=1", "model.vocab_size=500", "data.pad_vocab_to_multiple=64",
                 "data.max_bytes=800000", "data.heldout_fraction=0.2", "data.seq_len=2",
                 "data.variable_length_prob=1.0", "data.num_workers=0", "train.objective=arm", "model.causal=true",
                 "train.steps=8", "train.micro_batch_size=4", "train.global_batch_size=4", "validation.every=4",
                 "validation.batches=1", "validation.batch_size=4", "validation.elbo_every=0", "checkpoint.every=0",
                 "checkpoint.save_at_end=false", "logging.every=1", "logging.progress_bar=false",
                 "sample.gen_length=4", "sample.steps=4", "sample.block_length=4", f"train.out_dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", "recipes/tiny.yaml", *overrides],
                          capture_output=True, text=True, timeout=300, env=subprocess_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *steps], steps)]
    length_1 = [r for r, n in zip(steps, tokens) if n == 4]
    assert length_1 and len(length_1) < len(steps), tokens  # premise: both lengths were drawn
    assert all(r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in length_1)
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r, n in zip(steps, tokens) if n == 8)
    assert all(r["skipped_steps"] == 0 for r in steps)


# ---------------------------------------------------------------------------------------------
# The forward process.
# ---------------------------------------------------------------------------------------------
def test_p_mask_is_one_minus_eps_t_plus_eps():
    # (1 - 0.001) t + 0.001 for t = 0, 0.5, 1: 0.001, 0.5005, 1.0
    assert p_mask_of(torch.tensor([0.0, 0.5, 1.0])).tolist() == pytest.approx([0.001, 0.5005, 1.0])
    nb = forward_process(torch.zeros(3, 5, dtype=torch.long), MASK_ID,
                         t=torch.tensor([0.0, 0.25, 0.75]), generator=torch.Generator().manual_seed(0))
    # 0.999 * 0.25 + 0.001 = 0.25075; 0.999 * 0.75 + 0.001 = 0.75025
    assert nb.p_mask.tolist() == pytest.approx([0.001, 0.25075, 0.75025])


def test_drawn_t_gives_p_mask_in_eps_to_one():
    g = torch.Generator().manual_seed(3)
    nb = forward_process(torch.zeros(20000, 2, dtype=torch.long), MASK_ID, generator=g)
    p = nb.p_mask
    assert p.dtype == torch.float32
    assert p.min().item() >= 0.001 and p.max().item() < 1.0
    # t ~ U[0, 1): E[p_mask] = 0.999 * 0.5 + 0.001 = 0.5005, sd of the mean ~ 0.289 / sqrt(2e4)
    assert p.mean().item() == pytest.approx(0.5005, abs=0.01)
    # The draws are spread over the interval, not clumped (a quarter in each quarter).
    q = torch.histc(p, bins=4, min=0.0, max=1.0) / p.numel()
    assert q.tolist() == pytest.approx([0.25] * 4, abs=0.02)


def test_mask_fraction_per_row_is_near_its_p_mask():
    g = torch.Generator().manual_seed(11)
    input_ids = torch.zeros(3, 50000, dtype=torch.long)
    t = torch.tensor([0.1, 0.5, 0.9])
    nb = forward_process(input_ids, MASK_ID, generator=g, t=t)
    frac = nb.masked.float().mean(dim=1)
    # p_mask = 0.1009, 0.5005, 0.8991; binomial sd over 5e4 tokens <= 0.0023
    assert frac.tolist() == pytest.approx([0.1009, 0.5005, 0.8991], abs=0.012)
    assert torch.equal(nb.noisy == MASK_ID, nb.masked)


def test_mask_is_independent_per_token_with_random_t():
    g = torch.Generator().manual_seed(5)
    nb = forward_process(torch.zeros(4000, 64, dtype=torch.long), MASK_ID, generator=g)
    # over rows, the mask fraction tracks each row's own p_mask ...
    frac = nb.masked.float().mean(dim=1)
    assert (frac - nb.p_mask).abs().mean().item() < 0.06
    # ... and overall it is E[p_mask] = 0.5005
    assert nb.masked.float().mean().item() == pytest.approx(0.5005, abs=0.02)


def test_same_seed_same_mask_different_seed_different_mask():
    ids = torch.arange(8 * 32).view(8, 32) % 3
    a = forward_process(ids, MASK_ID, generator=torch.Generator().manual_seed(123))
    b = forward_process(ids, MASK_ID, generator=torch.Generator().manual_seed(123))
    c = forward_process(ids, MASK_ID, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.p_mask, b.p_mask)
    assert torch.equal(a.noisy, b.noisy)
    assert not torch.equal(a.masked, c.masked)


def test_forward_process_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    forward_process(torch.zeros(4, 16, dtype=torch.long), MASK_ID,
                    generator=torch.Generator().manual_seed(9))
    assert torch.equal(torch.rand(4), expected)


def test_unmasked_tokens_are_kept_and_masked_become_mask_id():
    ids = torch.tensor([[0, 1, 2, 0, 1]])
    masked = torch.tensor([[False, True, False, True, True]])
    nb = forward_process(ids, MASK_ID, t=torch.tensor([0.3]), masked=masked)
    assert nb.noisy.tolist() == [[0, MASK_ID, 2, MASK_ID, MASK_ID]]
    assert nb.p_mask.tolist() == pytest.approx([0.999 * 0.3 + 0.001])


def test_training_noise_is_keyed_on_the_global_row():
    """t and masks depend on (seed, step, row of the global batch) only: tensor-parallel peers
    (same call) agree, replicas (other rows) differ, and any split of the batch over ranks or
    micro-steps gives each row the same noise."""
    from pretrain.training.step_loss import draw_noise

    batch = torch.randint(0, 50, (4, 32), generator=torch.Generator().manual_seed(0))
    whole = draw_noise(batch, 63, seed=5, step=3, first_row=0)
    peer = draw_noise(batch, 63, seed=5, step=3, first_row=0)
    assert torch.equal(whole.masked, peer.masked) and torch.equal(whole.p_mask, peer.p_mask)
    second_half = draw_noise(batch[2:], 63, seed=5, step=3, first_row=2)
    assert torch.equal(second_half.masked, whole.masked[2:])
    assert torch.equal(second_half.p_mask, whole.p_mask[2:])
    other_replica = draw_noise(batch[:2], 63, seed=5, step=3, first_row=2)
    assert not torch.equal(other_replica.masked, whole.masked[:2])
    next_step = draw_noise(batch, 63, seed=5, step=4, first_row=0)
    assert not torch.equal(next_step.p_mask, whole.p_mask)

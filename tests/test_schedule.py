"""The learning-rate schedules of the paper, at the points where they change (DESIGN.md 1).

A schedule mistake costs a whole run and shows only as a slightly worse model: a warm-up off by
one step, a step-down keyed on steps instead of tokens, a decay that never reaches its floor.
These tests read `lr_at` at the paper's boundaries (pretraining: linear warm-up to 4e-4 over
2000 iterations, hold to 1.2T tokens, step down to 1e-4 for 0.8T tokens, linear to 1e-5 over
the last 0.3T; SFT: warm-up over 50 iterations to 2.5e-5, hold, linear to 2.5e-6 over the last
10%) and compare with literal numbers worked out by hand.
"""

import pytest

from pretrain.training.schedule import ScheduleConfig, lr_at

T = 1e12  # tokens


# ---------------------------------------------------------------------------------------------
# Pretraining (the ScheduleConfig defaults are the paper's values).
# ---------------------------------------------------------------------------------------------
def test_defaults_are_the_papers_pretraining_values():
    c = ScheduleConfig()
    assert c.kind == "llada_pretrain"
    assert (c.peak_lr, c.warmup_steps, c.mid_lr, c.final_lr) == (4e-4, 2000, 1e-4, 1e-5)
    assert (c.stable_tokens, c.mid_tokens, c.decay_tokens) == (1.2e12, 0.8e12, 0.3e12)
    assert c.problems() == []


def test_pretraining_warmup():
    c = ScheduleConfig()
    # step counts the optimizer steps already taken: the first step uses peak * 1 / 2000
    assert lr_at(c, 0, 0) == pytest.approx(2e-7)            # 4e-4 / 2000
    assert lr_at(c, 999, 4e9) == pytest.approx(2e-4)        # 4e-4 * 1000 / 2000
    assert lr_at(c, 1999, 8e9) == pytest.approx(4e-4)       # 4e-4 * 2000 / 2000: warm-up end
    assert lr_at(c, 2000, 8e9) == pytest.approx(4e-4)
    # linear: equal increments
    assert lr_at(c, 11, 0) - lr_at(c, 10, 0) == pytest.approx(2e-7)


def test_pretraining_stable_phase_and_step_down_at_1_2t_tokens():
    c = ScheduleConfig()
    assert lr_at(c, 5000, 0.5 * T) == pytest.approx(4e-4)
    assert lr_at(c, 100000, 1.2 * T - 1) == pytest.approx(4e-4)  # just before 1.2T
    assert lr_at(c, 100000, 1.2 * T) == pytest.approx(1e-4)      # the step down
    assert lr_at(c, 100000, 1.6 * T) == pytest.approx(1e-4)
    assert lr_at(c, 100000, 2.0 * T - 1) == pytest.approx(1e-4)
    assert lr_at(c, 100000, 2.0 * T) == pytest.approx(1e-4)      # decay starts from 1e-4


def test_pretraining_linear_decay_to_final():
    c = ScheduleConfig()
    # 1e-4 + f * (1e-5 - 1e-4) with f = (tokens - 2.0T) / 0.3T
    assert lr_at(c, 10**6, 2.075 * T) == pytest.approx(7.75e-5)  # f = 0.25
    assert lr_at(c, 10**6, 2.15 * T) == pytest.approx(5.5e-5)    # f = 0.5
    assert lr_at(c, 10**6, 2.225 * T) == pytest.approx(3.25e-5)  # f = 0.75
    assert lr_at(c, 10**6, 2.3 * T) == pytest.approx(1e-5)       # final
    assert lr_at(c, 10**6, 2.5 * T) == pytest.approx(1e-5)
    assert lr_at(c, 10**6, 10 * T) == pytest.approx(1e-5)


def test_pretraining_is_keyed_on_tokens_not_steps():
    c = ScheduleConfig()
    # a late step with few tokens is still in the stable phase, an early one with many is not
    assert lr_at(c, 10**7, 0.1 * T) == pytest.approx(4e-4)
    assert lr_at(c, 2500, 1.5 * T) == pytest.approx(1e-4)
    assert lr_at(c, 2500, 2.15 * T) == pytest.approx(5.5e-5)


# ---------------------------------------------------------------------------------------------
# SFT: warm-up 50 steps to 2.5e-5, hold, linear to 2.5e-6 over the last 10% of 1000 steps.
# ---------------------------------------------------------------------------------------------
def _sft():
    return ScheduleConfig(kind="sft", peak_lr=2.5e-5, warmup_steps=50, total_steps=1000,
                          final_lr=2.5e-6)


def test_sft_warmup_and_hold():
    c = _sft()
    assert c.problems() == []
    assert lr_at(c, 0, 0) == pytest.approx(5e-7)          # 2.5e-5 / 50
    assert lr_at(c, 24, 0) == pytest.approx(1.25e-5)      # 2.5e-5 * 25 / 50
    assert lr_at(c, 49, 0) == pytest.approx(2.5e-5)       # warm-up end
    assert lr_at(c, 50, 0) == pytest.approx(2.5e-5)
    assert lr_at(c, 500, 0) == pytest.approx(2.5e-5)
    assert lr_at(c, 899, 0) == pytest.approx(2.5e-5)      # last step before the last 10%


def test_sft_linear_decay_over_last_ten_percent():
    c = _sft()
    # decay over steps 900..999: 2.5e-5 - (step + 1 - 900) / 100 * 2.25e-5
    assert lr_at(c, 900, 0) == pytest.approx(2.4775e-5)   # 1/100 of the way
    assert lr_at(c, 949, 0) == pytest.approx(1.375e-5)    # half way
    assert lr_at(c, 999, 0) == pytest.approx(2.5e-6)      # the last step ends on the floor
    assert lr_at(c, 1200, 0) == pytest.approx(2.5e-6)     # past the end it stays there
    steps = range(900, 1000)
    diffs = [lr_at(c, s + 1, 0) - lr_at(c, s, 0) for s in steps[:-1]]
    assert all(d == pytest.approx(-2.25e-7) for d in diffs)  # linear


def test_sft_needs_total_steps():
    assert ScheduleConfig(kind="sft", total_steps=0).problems()


# ---------------------------------------------------------------------------------------------
# Cosine and constant.
# ---------------------------------------------------------------------------------------------
def test_cosine_reaches_final_lr_at_total_steps():
    c = ScheduleConfig(kind="cosine", peak_lr=1e-3, warmup_steps=10, total_steps=110, final_lr=1e-4)
    assert lr_at(c, 0, 0) == pytest.approx(1e-4)     # 1e-3 * 1 / 10
    assert lr_at(c, 9, 0) == pytest.approx(1e-3)     # warm-up end
    assert lr_at(c, 10, 0) == pytest.approx(1e-3)    # cosine starts at the peak
    # half way (step 60): 1e-4 + 0.5 * 9e-4 * (1 + cos(pi / 2)) = 5.5e-4
    assert lr_at(c, 60, 0) == pytest.approx(5.5e-4)
    # a quarter (step 35): 1e-4 + 0.5 * 9e-4 * (1 + cos(pi / 4)) = 8.681981e-4
    assert lr_at(c, 35, 0) == pytest.approx(8.681981e-4, rel=1e-6)
    assert lr_at(c, 110, 0) == pytest.approx(1e-4)   # final_lr at total_steps
    assert lr_at(c, 500, 0) == pytest.approx(1e-4)


def test_constant_is_warmup_then_peak():
    c = ScheduleConfig(kind="constant", peak_lr=3e-4, warmup_steps=4)
    assert [lr_at(c, s, 10 * T) for s in range(6)] == pytest.approx(
        [7.5e-5, 1.5e-4, 2.25e-4, 3e-4, 3e-4, 3e-4])

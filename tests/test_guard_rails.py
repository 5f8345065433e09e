"""Guard rails: skipped non-finite steps, halts on runs of them and on loss spikes, the hang watchdog.

A guard that never fires costs a week of compute spent on a diverged run; one that fires on a
healthy run stops it for nothing. These tests feed literal loss sequences and check the verdict
of each step, and run the watchdog in a subprocess to see it exit with the rank, step and phase.
"""

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from pretrain.runtime.guard_rails import GuardConfig, GuardRails, HangWatchdog, Verdict

REPO = Path(__file__).resolve().parents[1]
NAN, INF = math.nan, math.inf
CKPT = "/runs/demo/checkpoints/step_00001000"


# ---------------------------------------------------------------------------------------------
# Non-finite steps.
# ---------------------------------------------------------------------------------------------
def test_non_finite_loss_or_grad_norm_is_skipped_and_counted():
    g = GuardRails(GuardConfig(max_consecutive_skips=5))
    assert g.observe(1, 2.0, 1.0, None) == Verdict(skipped=False, halt=None)
    assert g.observe(2, NAN, 1.0, None) == Verdict(skipped=True, halt=None)
    assert g.observe(3, 2.0, INF, None) == Verdict(skipped=True, halt=None)
    assert g.observe(4, -INF, None, None) == Verdict(skipped=True, halt=None)
    assert (g.skipped_total, g.consecutive_skips) == (3, 3)
    assert g.observe(5, 2.0, None, None) == Verdict(skipped=False, halt=None)
    assert (g.skipped_total, g.consecutive_skips) == (3, 0)


def test_consecutive_non_finite_steps_halt_with_the_recovery():
    g = GuardRails(GuardConfig(max_consecutive_skips=3))
    g.observe(41, NAN, 1.0, CKPT)
    g.observe(42, NAN, 1.0, CKPT)
    g.observe(43, 2.0, 1.0, CKPT)  # resets the run of skips
    assert g.observe(44, NAN, NAN, CKPT).halt is None
    assert g.observe(45, 2.0, NAN, CKPT).halt is None
    v = g.observe(46, INF, 1.0, CKPT)
    assert v.skipped and v.halt is not None
    assert "step 46" in v.halt and "3 consecutive" in v.halt
    assert CKPT in v.halt and "schedule.lr_scale" in v.halt and f"--resume {CKPT}" in v.halt
    assert g.skipped_total == 5


def test_halt_without_a_checkpoint_says_so():
    g = GuardRails(GuardConfig(max_consecutive_skips=1))
    v = g.observe(3, NAN, None, None)
    assert "no checkpoint saved yet" in v.halt and "schedule.lr_scale" in v.halt


def test_zero_max_consecutive_skips_never_halts():
    g = GuardRails(GuardConfig(max_consecutive_skips=0))
    verdicts = [g.observe(s, NAN, None, CKPT) for s in range(1, 101)]
    assert all(v.skipped and v.halt is None for v in verdicts)
    assert g.consecutive_skips == 100


# ---------------------------------------------------------------------------------------------
# Loss spikes.
# ---------------------------------------------------------------------------------------------
def spiky(**kw) -> GuardRails:
    return GuardRails(GuardConfig(**{"spike_factor": 3.0, "spike_window": 4, "spike_warmup": 4, **kw}))


def test_spike_halts_after_warmup_with_the_numbers():
    g = spiky()
    for s, loss in enumerate([2.0, 4.0, 2.0, 4.0], start=1):
        assert g.observe(s, loss, 1.0, CKPT).halt is None
    assert g.observe(5, 8.9, 1.0, CKPT).halt is None  # 8.9 < 3 x 3.0
    # window now 4.0, 2.0, 4.0, 8.9: average 4.725; 15.0 is 3.17x
    v = g.observe(6, 15.0, 1.0, CKPT)
    assert not v.skipped and v.halt is not None
    assert "step 6" in v.halt and "loss 15" in v.halt and "3.17x" in v.halt
    assert "4-step average 4.725" in v.halt and CKPT in v.halt and "schedule.lr_scale" in v.halt


def test_no_spike_check_during_warmup():
    g = spiky()
    for s, loss in enumerate([2.0, 2.0, 2.0], start=1):
        assert g.observe(s, loss, 1.0, None).halt is None
    assert g.observe(4, 100.0, 1.0, None).halt is None  # only 3 finite steps seen before it
    assert g.observe(5, 1000.0, 1.0, None).halt is not None


def test_zero_spike_factor_never_halts():
    g = GuardRails(GuardConfig(spike_factor=0.0, spike_window=4, spike_warmup=0))
    for s in range(1, 20):
        assert g.observe(s, 2.0 * 10 ** s, 1.0, CKPT).halt is None


def test_nan_loss_is_kept_out_of_the_average():
    g = spiky()
    for s in range(1, 5):
        g.observe(s, 2.0, 1.0, None)
    assert g.observe(5, NAN, 1.0, None).skipped
    # a NaN in the window would make the average NaN and the comparison always false
    v = g.observe(6, 7.0, 1.0, None)
    assert v.halt is not None and "3.50x" in v.halt and "average 2" in v.halt


# ---------------------------------------------------------------------------------------------
# Resume.
# ---------------------------------------------------------------------------------------------
def test_state_dict_round_trip_reaches_the_same_verdicts():
    cfg = GuardConfig(max_consecutive_skips=3, spike_factor=2.0, spike_window=3, spike_warmup=3)
    before = [2.0, 3.0, NAN, 2.5, 2.0, NAN, NAN]
    after = [NAN, 2.0, 4.0, 2.2, 5.5, 7.0, NAN, NAN, NAN]
    original = GuardRails(cfg)
    for s, loss in enumerate(before, start=1):
        original.observe(s, loss, 1.0, CKPT)
    resumed = GuardRails(cfg)
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert (resumed.skipped_total, resumed.consecutive_skips) == (3, 2)
    verdicts = []
    for s, loss in enumerate(after, start=len(before) + 1):
        a, b = original.observe(s, loss, 1.0, CKPT), resumed.observe(s, loss, 1.0, CKPT)
        assert a == b
        verdicts.append(a)
    # the sequence exercises both halts, so the counters and window really carried over
    assert verdicts[0].halt is not None and "3 consecutive" in verdicts[0].halt
    assert any(v.halt and "average" in v.halt for v in verdicts)
    assert GuardRails(cfg).observe(len(before) + 1, NAN, 1.0, CKPT).halt is None


# ---------------------------------------------------------------------------------------------
# Config validation.
# ---------------------------------------------------------------------------------------------
def test_problems_flag_invalid_values():
    assert GuardConfig().problems() == []
    bad = GuardConfig(max_consecutive_skips=-1, spike_factor=-2.0, spike_window=0, spike_warmup=-5,
                      hang_timeout_s=-1.0)
    text = "\n".join(bad.problems())
    for name in ("max_consecutive_skips", "spike_factor", "spike_window", "spike_warmup", "hang_timeout_s"):
        assert f"guard.{name}:" in text
    assert len(bad.problems()) == 5


# ---------------------------------------------------------------------------------------------
# Hang watchdog.
# ---------------------------------------------------------------------------------------------
def test_watchdog_reports_a_hang_and_exits(subprocess_env):
    code = textwrap.dedent("""
        import time
        from pretrain.runtime.guard_rails import HangWatchdog
        w = HangWatchdog(timeout_s=1, rank=3).start()
        w.beat(7, "all-reduce of the step metrics")
        time.sleep(30)
    """)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env,
                          capture_output=True, text=True, timeout=20)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 5, proc.stderr
    assert elapsed < 10
    assert "hang watchdog: rank 3" in proc.stderr
    assert "step 7" in proc.stderr and "all-reduce of the step metrics" in proc.stderr
    assert 'File "<string>"' in proc.stderr  # the main thread's stack, stuck in time.sleep


def test_watchdog_with_regular_beats_does_not_fire():
    w = HangWatchdog(timeout_s=1, rank=0, poll_s=0.05).start()
    end = time.monotonic() + 2.0
    step = 0
    while time.monotonic() < end:
        step += 1
        w.beat(step, "micro-batch 0 forward/backward")
        time.sleep(0.2)
    assert w._thread.is_alive()
    w.stop()
    assert not w._thread.is_alive()


def test_watchdog_off_starts_no_thread():
    w = HangWatchdog(timeout_s=0, rank=0).start()
    assert w._thread is None
    w.beat(1, "checkpoint save")
    w.stop()

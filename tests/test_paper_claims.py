"""The paper's claims at small scale, fast variant (`python -m experiments.paper_claims all --fast`):
the same commands the README's figures come from, on fewer facts, steps and tokens, with two
seeds, run once through the CLI as a user types it. Each test checks the direction of one effect
seed by seed (the two sides come from the same seed's models), with a margin larger than the
spread over seeds: every seed's difference is positive and their mean exceeds their standard
deviation. A claim that stops reproducing, or a change that breaks training, the AR baseline,
SFT, the sampler or the evaluation, fails here. Effects that do not reproduce at this size (the
MDM's side of the reversal and scaling claims, quality against steps: see the README) are not
asserted.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEEDS = ["1", "2"]


@pytest.fixture(scope="module")
def claims(tmp_path_factory, subprocess_env) -> Path:
    out = tmp_path_factory.mktemp("claims")
    proc = subprocess.run([sys.executable, "-m", "experiments.paper_claims", "all", "--out", str(out), "--fast",
                           "--seeds", *SEEDS], cwd=REPO, env=subprocess_env, capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def results(out: Path, claim: str) -> dict:
    return json.loads((out / f"{claim}.json").read_text())


def clearly_above(high: list[float], low: list[float]) -> bool:
    """Every seed's high - low is positive, and their mean exceeds their standard deviation."""
    assert len(high) == len(low) == len(SEEDS)
    differences = [h - lo for h, lo in zip(high, low)]
    return min(differences) > 0 and statistics.fmean(differences) > statistics.stdev(differences)


def test_every_claim_writes_its_table_picture_and_numbers(claims):
    for claim in ("reversal", "remasking", "scaling", "sampling_steps"):
        table = (claims / f"{claim}.md").read_text()
        assert "| " in table and "Paper:" in table, table
        assert (claims / f"{claim}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--fast" in (claims / "README.md").read_text()


def test_reversal_the_autoregressive_model_answers_forward_questions_not_reversed_ones(claims):
    arm = results(claims, "reversal")["ARM"]
    assert clearly_above(arm["one_way_forward"], arm["one_way_reversed"])
    assert clearly_above(arm["one_way_forward_choice"], arm["one_way_reversed_choice"])
    assert max(arm["one_way_reversed"]) == 0.0  # the reversal curse: not one reversed answer


def test_remasking_pure_low_confidence_answers_too_short_after_sft_and_blocks_fix_it(claims):
    """The answers' length, the failure's own measure (exact match on long canvases varies too much
    between seeds at this size: the README's table)."""
    r = results(claims, "remasking")
    pure = r["low-confidence (canvas 64)"]["length_ratio"]
    for fix in ("low-confidence + blocks of 8 (canvas 64)", "low-confidence, EOS/EoT confidence 0 (canvas 64)"):
        assert clearly_above(r[fix]["length_ratio"], pure), (fix, r[fix], pure)


def test_scaling_the_larger_arm_reaches_a_lower_held_out_loss_and_the_mdm_bound_lies_above_it(claims):
    r = results(claims, "scaling")
    assert clearly_above(r["ARM"]["d32"], r["ARM"]["d128"]), r["ARM"]
    for size in ("d32", "d64", "d128"):
        assert clearly_above(r["MDM"][size], r["ARM"][size]), (size, r)


def test_sampling_steps_threshold_decoding_needs_fewer_forwards_than_one_token_per_step(claims):
    r = results(claims, "sampling_steps")
    assert clearly_above(r["steps 16"]["forwards"], r["threshold 0.9"]["forwards"])

"""Claim 2, remasking (paper Table 9 / Appendix B.3-B.4): which masked tokens the sampler reveals
matters, and after SFT with EOS padding, pure low-confidence decoding of a long canvas fills its
end with EOS first and answers too short, which semi-autoregressive blocks fix.

The SFT models of `experiments.repeat_task` decode the held-out prompts two ways: on a canvas
that fits the longest answer (16 positions, one token per step) with random, low-confidence and
low-confidence + blocks of 4 remasking; and asked for a long answer (a canvas of 64, one token
per step) with pure low-confidence, low-confidence + blocks of 8, and low-confidence with EOS's
and EoT's confidence zeroed (the fix of the paper's v3, `confidence_eos_eot: both`). Exact match
and the answers' length against the targets' say what happened.
"""

from __future__ import annotations

from pathlib import Path

from experiments import charts, stack
from experiments.repeat_task import decode

FIT, LONG = 16, 64
SETTINGS = {
    "random (canvas 16)": {"gen_length": FIT, "steps": FIT, "block_length": FIT, "remasking": "random"},
    "low-confidence (canvas 16)": {"gen_length": FIT, "steps": FIT, "block_length": FIT},
    "low-confidence + blocks of 4 (canvas 16)": {"gen_length": FIT, "steps": FIT, "block_length": 4},
    "random (canvas 64)": {"gen_length": LONG, "steps": LONG, "block_length": LONG, "remasking": "random"},
    "low-confidence (canvas 64)": {"gen_length": LONG, "steps": LONG, "block_length": LONG},
    "low-confidence + blocks of 8 (canvas 64)": {"gen_length": LONG, "steps": LONG, "block_length": 8},
    "low-confidence, EOS/EoT confidence 0 (canvas 64)": {"gen_length": LONG, "steps": LONG, "block_length": LONG,
                                                         "confidence_eos_eot": "both"},
}
PAPER = ("GSM8K, v2 Table 6 (length 512, 256 steps, blocks of 32), Base / Instruct: random 52.3 / 72.0, "
         "low-confidence 64.7 / 12.9, low-confidence + semi-autoregressive 64.4 / 73.8; v3 Table 9 (Base, "
         "length = steps = 256): random vs low-confidence 21.3 vs 70.0 on GSM8K, 32.1 vs 45.0 on BBH. Appendix B.3: "
         "the Instruct model's SFT data holds many EOS, so pure low-confidence remasking gives an unnaturally high "
         "share of EOS (too-short answers); blocks fix it")


def run(out: Path, seeds: list[int], *, fast: bool = False, workers: int = 2) -> dict:
    results = decode(out, seeds, "remasking", SETTINGS, fast=fast, workers=workers)
    rows = [[name, stack.spread(r["exact_match"]), stack.spread(r["length_ratio"])] for name, r in results.items()]
    table = stack.markdown_table(["decoding", "exact match", "answer length / target length"], rows)
    (out / "remasking.md").write_text(
        f"## Remasking (paper Table 9 and Appendix B.3)\n\nThe SFT repeat model, held-out prompts, temperature 0, "
        f"one token per step; mean ± sd over seeds {seeds}.\n\n{table}\nPaper: {PAPER}.\n")
    groups = ["canvas 16", "canvas 64"]
    rows_of = {"random": ("random (canvas 16)", "random (canvas 64)"),
               "low-confidence": ("low-confidence (canvas 16)", "low-confidence (canvas 64)"),
               "low-confidence + blocks": ("low-confidence + blocks of 4 (canvas 16)",
                                           "low-confidence + blocks of 8 (canvas 64)")}
    charts.bars(out / "remasking.png", "Remasking after SFT: exact match (mean ± sd over seeds)", groups,
                [charts.Series(name, {group: stack.mean_sd(results[row]["exact_match"])
                                      for group, row in zip(groups, rows)}) for name, rows in rows_of.items()],
                "exact match")
    return results

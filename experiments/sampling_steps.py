"""Claim 4, sampling steps (paper Figure 5 of v1/v2, Appendix B.6): answer quality against the
number of forwards (NFE), exact (a fixed number of steps) and with threshold decoding (every
masked token whose confidence reaches the threshold revealed at once, Fast-dLLM's rule).

The SFT repeat models of `experiments.repeat_task`, a 16-position canvas (every answer fits),
temperature 0, pure low-confidence diffusion: steps 16 (one token per forward) down to 2 (eight
per forward), and thresholds from 0.99 down to 0.3, each point at its measured mean NFE.
"""

from __future__ import annotations

from pathlib import Path

from experiments import charts, stack
from experiments.repeat_task import decode

CANVAS = 16
STEPS = (2, 4, 8, 16)
THRESHOLDS = (0.3, 0.5, 0.7, 0.9, 0.99)
SETTINGS = {
    **{f"steps {s}": {"gen_length": CANVAS, "steps": s, "block_length": CANVAS} for s in STEPS},
    **{f"threshold {t}": {"gen_length": CANVAS, "steps": CANVAS, "block_length": CANVAS, "threshold": t}
       for t in THRESHOLDS},
}
PAPER = ("v1/v2 Figure 5 (LLaDA 8B Base, GSM8K and HumanEval, answer length 1024): accuracy rises with the "
         "number of sampling steps up to one token per step; v3 Figure 5 (length 256, steps 32 to 256) trades "
         "accuracy for throughput the same way; README FAQ: best at steps = answer length")


def run(out: Path, seeds: list[int], *, fast: bool = False, workers: int = 2) -> dict:
    results = decode(out, seeds, "sampling_steps", SETTINGS, fast=fast, workers=workers)
    rows = [[name, stack.spread(r["forwards"], 1), stack.spread(r["exact_match"])] for name, r in results.items()]
    table = stack.markdown_table(["decoding", "forwards per answer (NFE)", "exact match"], rows)
    (out / "sampling_steps.md").write_text(
        f"## Sampling steps (paper Figure 5)\n\nThe SFT repeat model, canvas {CANVAS}, temperature 0, low-confidence "
        f"remasking; mean ± sd over seeds {seeds}.\n\n{table}\nPaper: {PAPER}.\n")

    def series(prefix: str, name: str) -> charts.Series:
        chosen = [r for row, r in results.items() if row.startswith(prefix)]
        return charts.Series(name, {stack.mean_sd(r["forwards"])[0]: stack.mean_sd(r["exact_match"]) for r in chosen})

    charts.curves(out / "sampling_steps.png", "Quality against forwards per answer (mean ± sd over seeds)",
                  [series("steps", "fixed steps"), series("threshold", "threshold decoding")],
                  "forwards per answer (NFE), log scale", "exact match", log_x=True)
    return results

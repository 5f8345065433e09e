"""lm-eval's CLI with the `llada_stack` model registered (`pretrain.evaluation.lm_eval_model`).

    python -m pretrain.lm_eval_adapter --model llada_stack --model_args model=DIR,mc_num=128 \
        --tasks T --include_path P [--output_path OUT --log_samples]
    torchrun --nproc_per_node 8 -m pretrain.lm_eval_adapter --model llada_stack --model_args model=DIR ...
    python -m pretrain.lm_eval_adapter --preset gsm8k-base --model_args model=DIR   (an official protocol)
    import pretrain.lm_eval_adapter; lm_eval.simple_evaluate(model="llada_stack", model_args={...}, ...)

lm-eval finds models only through imports (no plugin entry points), so the plain `lm_eval`
command does not know `llada_stack`; importing this module (or the model's) registers it. The
model's arguments and how it scores and samples: `pretrain/evaluation/lm_eval_model.py`.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from pretrain.checkpoint.weights import WEIGHTS_ERRORS
from pretrain.evaluation import lm_eval_model  # noqa: F401  (registers `llada_stack` with lm-eval)
from pretrain.evaluation.presets import lm_eval_argv
from pretrain.runtime.exit_codes import USAGE, UsageError, command_failures, run_command


def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI on `argv` (default: the command line) with `llada_stack` registered; a
    `deepspeed` launcher's --local_rank is dropped. A bad model path or model is one line on
    stderr and exit code 2 (the README's exit-code table); lm-eval's own usage errors exit 2 too."""
    from lm_eval.__main__ import cli_evaluate

    from parallel import engine as ds

    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]

    def evaluate() -> None:
        sys.argv = [sys.argv[0], *lm_eval_argv(args)]  # lm-eval parses sys.argv; --preset NAME expanded here
        cli_evaluate()

    code = run_command(evaluate, command_failures("lm_eval_adapter", dict.fromkeys((UsageError, *WEIGHTS_ERRORS),
                                                                                   USAGE)))
    if code == 0 and dist.is_initialized():
        ds.exit_together(0)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""lm-eval's CLI with the `llada_stack` model registered (`pretrain.evaluation.lm_eval_model`).

    python -m pretrain.lm_eval_adapter --model llada_stack --model_args model=DIR,mc_num=128 \
        --tasks T --include_path P [--output_path OUT --log_samples]
    torchrun --nproc_per_node 8 -m pretrain.lm_eval_adapter --model llada_stack --model_args model=DIR ...
    import pretrain.lm_eval_adapter; lm_eval.simple_evaluate(model="llada_stack", model_args={...}, ...)

lm-eval finds models only through imports (no plugin entry points), so the plain `lm_eval`
command does not know `llada_stack`; importing this module (or the model's) registers it. The
model's arguments and how it scores and samples: `pretrain/evaluation/lm_eval_model.py`.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from pretrain.evaluation import lm_eval_model  # noqa: F401  (registers `llada_stack` with lm-eval)


def main() -> None:
    """lm-eval's CLI with `llada_stack` registered; a `deepspeed` launcher's --local_rank is dropped."""
    from lm_eval.__main__ import cli_evaluate

    from parallel import engine as ds

    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    cli_evaluate()
    if dist.is_initialized():
        ds.exit_together(0)


if __name__ == "__main__":
    main()

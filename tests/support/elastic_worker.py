"""One rank of a resume in another layout (run by torchrun from test_elastic_resume.py).

argv: CONFIG CHECKPOINT OUT_DIR STEPS [section.field=value ...]. The run's trainer restores
CHECKPOINT in the layout the overrides and the world size give; rank 0 then writes what the
engine holds right after the restore, gathered under the released names
(`restored.safetensors`: `weights/<name>` and the optimizer state's `fp32/<name>`,
`exp_avg/<name>`, `exp_avg_sq/<name>`), and the losses of the next STEPS optimizer steps
(`losses.json`), which the trainer runs as the training loop does.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from parallel import engine as ds
from pretrain.checkpoint.optimizer_state import gather_optimizer_state
from pretrain.runtime.guard_rails import HangWatchdog
from pretrain.runtime.preemption import PreemptionFlag
from pretrain.training.config import load_config
from pretrain.training.layout import resolve_layout
from pretrain.training.trainer import Trainer


def main(config: str, checkpoint: str, out_dir: str, steps: str, *overrides: str) -> None:
    cfg = load_config(config, [*overrides, f"train.out_dir={out_dir}"])
    layout = resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    ds.init_distributed()
    rank = torch.distributed.get_rank()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, layout, rank, PreemptionFlag(), HangWatchdog(600, rank).start())
    trainer.restore(checkpoint)
    module = trainer.engine.module
    gather_weights = getattr(module, "whole_state_dict", None)
    weights = gather_weights() if gather_weights else ds.full_state_dict(module)
    optimizer = gather_optimizer_state(trainer.engine)
    trainer.start_meters()
    losses = {}
    for _ in range(int(steps)):
        outcome = trainer.step()
        losses[trainer.state.step] = outcome.loss
    if rank == 0:
        tensors = {**{f"weights/{name}": t for name, t in weights.items()}, **optimizer.tensors}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(out_dir) / "restored.safetensors"))
        (Path(out_dir) / "losses.json").write_text(json.dumps(losses))
    trainer.close()
    ds.exit_together(0)


if __name__ == "__main__":
    main(*sys.argv[1:])

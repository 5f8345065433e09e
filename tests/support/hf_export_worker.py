"""Train a small model in a given layout, checkpoint it, and record its logits (run by
test_hf_export.py: under plain python for "single", under torchrun with 2 ranks for "zero3"
and "tp2").

argv: OUT_DIR LAYOUT [LAYOUT ...]. For each layout, OUT_DIR/LAYOUT/ receives the checkpoint
(`checkpoints/step_00000002`), the trained model's fp32 logits on fixed ids (`logits.pt`), and
`roundtrip.json`: an fp32 export of the checkpoint, imported again and loaded into a fresh
engine of the same layout through the trainer's `train.init_from` path (weights loaded before
`deepspeed.initialize`), gives logits that differ from the trained engine's by
`import_logits_diff` after one optimizer step at learning rate 0; `late_load_logits_diff` is
the control: the same weights written into the module after the engine exists.

- "single": one process, ZeRO-3 at world size 1.
- "zero3": 2 ranks, DP=2 under ZeRO-3 with zero.Init (run first: DeepSpeed keeps the last mpu).
- "tp2": 2 ranks, TP=2 (megatron-core layers, vocabulary-parallel head) under ZeRO-1.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import engine as ds
from parallel.model_config import ModelConfig
from parallel.topology import coordinates
from pretrain.checkpoint.hf_export import export
from pretrain.checkpoint.store import save_checkpoint
from pretrain.checkpoint.weights import load_weights_only
from pretrain.training.config import RunConfig
from pretrain.training.engine_setup import build_engine, init_from_weights
from pretrain.training.init_from_release import import_release
from pretrain.training.layout import engine_config, resolve_layout
from pretrain.training.objective import objective_for

MODEL = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=96,
                    vocab_size=320, max_sequence_length=64)
LAYOUTS = {"single": dict(tensor_parallel=1, zero_stage=3),
           "zero3": dict(tensor_parallel=1, zero_stage=3),
           "tp2": dict(tensor_parallel=2, zero_stage=1)}
STEPS = 2
SEQ = 24


def run_config(layout: str, tokenizer: Path, world: int) -> RunConfig:
    cfg = RunConfig()
    cfg.model = dataclasses.replace(MODEL)
    cfg.data.tokenizer = str(tokenizer)
    cfg.train.micro_batch_size = 2
    cfg.train.global_batch_size = 2 * world // LAYOUTS[layout]["tensor_parallel"]
    cfg.train.seed = 11
    for key, value in LAYOUTS[layout].items():
        setattr(cfg.parallel, key, value)
    return cfg


def engine_for(cfg: RunConfig, world: int):
    """The trainer's engine for this layout, started from `train.init_from` when set."""
    weights = init_from_weights(cfg) if cfg.train.init_from else None
    return build_engine(cfg, engine_config(cfg, resolve_layout(cfg, world)), weights)


@torch.no_grad()
def logits_of(engine, ids: torch.Tensor) -> torch.Tensor:
    engine.module.eval()
    return engine.module(ids)


def run_layout(out: Path, layout: str, tokenizer: Path, mask_id: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = run_config(layout, tokenizer, world)
    grid = coordinates(rank, world, cfg.parallel.tensor_parallel)
    engine = engine_for(cfg, world)
    data = torch.randint(0, mask_id, (STEPS, cfg.train.global_batch_size, SEQ),
                         generator=torch.Generator().manual_seed(len(layout)))
    for step in range(STEPS):
        for group in engine.optimizer.param_groups:
            group["lr"] = 1e-2  # large enough to move the weights well away from the init
        first_row = grid.dp_rank * cfg.train.micro_batch_size
        batch = data[step, first_row:first_row + cfg.train.micro_batch_size]
        engine.backward(objective_for(cfg).micro_batch_loss(engine, batch, mask_id, step, first_row))
        engine.step()
    checkpoint = save_checkpoint(
        engine, out / "checkpoints", STEPS, config=cfg.to_dict(), tokenizer_path=tokenizer,
        trainer_state={"tokens_seen": 0, "guard": {}, "layout": {"tensor_parallel": cfg.parallel.tensor_parallel}},
        data_state=None)
    ids = torch.randint(0, MODEL.vocab_size, (3, SEQ), generator=torch.Generator().manual_seed(99))
    trained = logits_of(engine, ids)

    if rank == 0:
        torch.save({"ids": ids, "logits": trained}, out / "logits.pt")
        export(checkpoint, out / "hf_fp32", dtype=torch.float32)
        import_release(out / "hf_fp32", out / "imported")
    dist.barrier()
    restarted = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(out / "imported")))
    report = {"import_logits_diff": after_a_still_step(engine_for(restarted, world), ids, trained, cfg,
                                                       data[0, :cfg.train.micro_batch_size], mask_id)}
    # control: weights written into the module after DeepSpeed made its master copies are lost
    late = engine_for(cfg, world)
    load_weights_only(late.module, out / "imported")
    report["late_load_logits_diff"] = after_a_still_step(late, ids, trained, cfg,
                                                         data[0, :cfg.train.micro_batch_size], mask_id)
    if rank == 0:
        (out / "roundtrip.json").write_text(json.dumps(report))


def after_a_still_step(engine, ids, trained, cfg, batch, mask_id) -> float:
    """Largest logit difference to `trained` after one optimizer step at learning rate 0 (the
    step copies DeepSpeed's master weights back into the module)."""
    engine.module.train()
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    engine.backward(objective_for(cfg).micro_batch_loss(engine, batch, mask_id, 0, 0))
    engine.step()
    diff = (logits_of(engine, ids) - trained).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def main(out: str, layouts: list[str]) -> None:
    from data_pipeline.tokenizer import load_tokenizer

    ds.init_distributed()
    tokenizer = Path(out) / "tokenizer.json"
    mask_id = load_tokenizer(tokenizer).mask_id
    for layout in layouts:
        (Path(out) / layout).mkdir(parents=True, exist_ok=True)
        run_layout(Path(out) / layout, layout, tokenizer, mask_id)
    ds.exit_together(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2:])

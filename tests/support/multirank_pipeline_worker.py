"""One rank of the pipeline-parallel tests (run by torchrun from test_pipeline.py).

argv: SCENARIO OUT_DIR TOKENIZER. Every rank writes OUT_DIR/rank<N>.json with its measurements.
The model has 3 blocks, so 2 stages split them 2 + 1 (the last stage's weights are drawn after
the first stage's, which that rank skips). Every run trains 5 optimizer steps of 2 accumulated
micro-batches through the trainer's own functions (`build_engine`, `pipeline_step`), two of
the micro-batches cut short as the 1% rule cuts them, against plain torch AdamW on the dense
model over the same micro-batches with the same noise (the PP=1 computation).

- "pp2" (2 ranks, PP=2): the trajectory (loss, gradient norm) and the final whole weights; the
  shapes the second stage's first layer receives; `fast.compile_pointwise` reaching every stage's
  norms, RoPE and SwiGLU (the stages are built, not run); a checkpoint at step 3 (its whole weights
  against the reference's step-3 weights, its export to the released format loaded by
  `AutoModel(trust_remote_code=True)` against the pipeline's own logits; `logits_positions`, the
  last stage's head at selected positions only, against those logits), then a fresh engine
  resumed from it for steps 4-5 against the uninterrupted run, and another resumed from its
  layout-free form (whole weights and `optimizer.safetensors`). Controls: a restart from the
  checkpoint's weights only (optimizer state dropped); the shortened micro-batches padded back
  to full length.
- "pp4" (4 ranks): PP=2 x TP=2 (megatron-core layers inside each stage, fused projections,
  full activation checkpointing, chunked head) and PP=2 x DP=2, each against the reference. Control: PP=2 x
  TP=2 with a DeepSpeed topology that lacks the tensor-parallel axis. Under PP=2 x DP=2 the
  layout-free optimizer state gathered over stages and replicas holds the master weights (in
  fp32, the weights) under every released name.
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from logits_positions import positions_diffs  # tests/support, the script's directory

from parallel import engine as ds
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from parallel.topology import coordinates
from pretrain.checkpoint.optimizer_state import STATE_KEYS, gather_optimizer_state, load_optimizer_state
from pretrain.checkpoint.store import load_full_state, save_checkpoint
from pretrain.diffusion.objectives import pretrain_loss_from_ce
from pretrain.training.config import RunConfig
from pretrain.training.engine_setup import build_engine, build_model, build_optimizer
from pretrain.training.layout import engine_config, resolve_layout
from pretrain.training.step_loss import draw_noise, pipeline_loss, pipeline_step

CFG = ModelConfig(d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden_size=96,
                  vocab_size=320, max_sequence_length=32)
SEED, SEQ, MICRO, ACCUM, STEPS, LR = 7, 16, 2, 2, 5, 3e-3
SHORT = {(1, 1): 9, (3, 0): 5}  # (step, micro-step) -> length of a micro-batch cut short


def run_config(tp: int, pp: int, dp: int, fuse_projections: bool = False, **memory) -> RunConfig:
    cfg = RunConfig()
    cfg.fast.fuse_projections = fuse_projections
    cfg.model = CFG
    cfg.train.seed = SEED
    cfg.train.micro_batch_size, cfg.train.global_batch_size = MICRO, MICRO * ACCUM * dp
    # Adam's first steps divide each gradient by its own magnitude: eps 1e-4 keeps float noise
    # in near-zero gradient elements (summation orders differ between layouts) invisible.
    cfg.optim.eps = 1e-4
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.zero_stage = tp, pp, 1
    for key, value in memory.items():
        setattr(cfg.memory, key, value)
    return cfg


def make_data(dp: int, mask_id: int) -> list:
    """data[step][micro_step][dp_rank]: token ids [MICRO, length]."""
    gen = torch.Generator().manual_seed(1)
    return [[[torch.randint(0, mask_id, (MICRO, SHORT.get((step, m), SEQ)), generator=gen)
              for _ in range(dp)] for m in range(ACCUM)] for step in range(STEPS)]


def first_row(micro_step: int, dp_rank: int, dp: int) -> int:
    return (micro_step * dp + dp_rank) * MICRO  # as the trainer keys the noise


def reference(cfg: RunConfig, data: list, dp: int, mask_id: int) -> dict:
    """Plain torch on the dense model: each micro-batch's Algorithm 1 loss scaled by
    1 / (accumulation x DP) as DeepSpeed scales and averages, clipping, AdamW."""
    model = LLaDAModel(CFG, init_seed=SEED)
    opt = build_optimizer(model, cfg)
    out = {"losses": [], "norms": []}
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = LR
        opt.zero_grad()
        total = 0.0
        for m in range(ACCUM):
            for r in range(dp):
                batch = data[step][m][r]
                nb = draw_noise(batch, mask_id, SEED, step, first_row(m, r, dp))
                loss = pretrain_loss_from_ce(model(nb.noisy, targets=batch, loss_mask=nb.masked), nb)
                (loss / (ACCUM * dp)).backward()
                total += loss.item()
        out["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip).item())
        opt.step()
        out["losses"].append(total / (ACCUM * dp))
        if step + 1 == 3:
            out["weights_3"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def train_steps(engine, cfg: RunConfig, data: list, steps: range, mask_id: int, micro_batches=None):
    """The trainer's step metrics over `steps`: (losses, gradient norms). micro_batches(step,
    batches) replaces the trainer's micro-batch building (for a control)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    grid = coordinates(rank, world, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    losses, norms = [], []
    for step in steps:
        for group in engine.optimizer.param_groups:
            group["lr"] = LR
        batches = [data[step][m][grid.dp_rank] for m in range(ACCUM)]
        if micro_batches is None:
            loss_sum, _ = pipeline_step(engine, cfg, batches, mask_id, step, grid.dp_rank, grid.dp_size)
        else:
            from parallel.pipeline import train_step
            mean, _ = train_step(engine, micro_batches(step, batches))
            loss_sum = mean * ACCUM
        summed = torch.tensor([float(loss_sum)], dtype=torch.float64)
        dist.all_reduce(summed)  # every rank reports its replica's losses, as in the trainer
        losses.append(summed.item() / (ACCUM * world))
        norms.append(float(engine.get_global_grad_norm()))
    return losses, norms


def weight_diff(whole: dict | None, ref: dict) -> float:
    """Largest difference of rank 0's gathered whole weights to the reference (0 elsewhere)."""
    if whole is None:
        return 0.0
    assert sorted(whole) == sorted(ref), (sorted(whole), sorted(ref))
    return max((whole[n] - ref[n]).abs().max().item() for n in ref)


def relative(a: list, b: list) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def record_boundary(engine) -> list:
    """The shapes the first layer of every stage after the first receives."""
    shapes = []
    if engine.stage_id > 0:
        engine.module.forward_funcs[0].register_forward_pre_hook(
            lambda module, args: shapes.append(list(args[0].shape)))
    return shapes


def engine_for(cfg: RunConfig, weights: Path | None = None):
    return build_engine(cfg, engine_config(cfg, resolve_layout(cfg, dist.get_world_size())), weights)


def compare(out: dict, label: str, ref: dict, losses: list, norms: list, whole: dict | None) -> None:
    out[f"{label}_loss"] = relative(losses, ref["losses"])
    out[f"{label}_grad_norm"] = relative(norms, ref["norms"])
    out[f"{label}_weights"] = weight_diff(whole, ref["weights"])


def scenario_pp2(out_dir: Path, tokenizer: Path, mask_id: int) -> dict:
    cfg = run_config(tp=1, pp=2, dp=1)
    data = make_data(1, mask_id)
    ref = reference(cfg, data, 1, mask_id)
    out = {"reference_losses": ref["losses"]}
    ids = torch.randint(0, CFG.vocab_size, (3, SEQ), generator=torch.Generator().manual_seed(99))

    from parallel.pipeline import PipelineForward
    engine = engine_for(cfg)
    out["stage"] = engine.stage_id
    compiled = copy.deepcopy(cfg)  # built only: that the switch reaches every stage's blocks
    compiled.fast.compile_pointwise = True
    stage, _ = build_model(compiled, engine_config(compiled, resolve_layout(compiled, dist.get_world_size())))
    out["compiled_pointwise_names"] = sorted({m.pointwise.name for m in stage.modules() if hasattr(m, "pointwise")})
    out["boundary_shapes"] = record_boundary(engine)
    losses, norms = train_steps(engine, cfg, data, range(3), mask_id)
    layout = resolve_layout(cfg, dist.get_world_size())
    checkpoint = save_checkpoint(engine, out_dir / "checkpoints", 3, config=cfg.to_dict(), tokenizer_path=tokenizer,
                                 trainer_state={"tokens_seen": 0, "guard": {}, "layout": layout.checkpoint_key()},
                                 data_state=None, optimizer_state=gather_optimizer_state(engine))
    forward = PipelineForward(engine.module).eval()
    logits_3 = forward(ids)
    picked = torch.tensor([11, 2, 5])
    out.update(positions_diffs(forward(ids, logits_positions=picked), forward(ids, logits_positions=slice(4, 8)),
                               logits_3, picked))
    engine.module.train()
    more_losses, more_norms = train_steps(engine, cfg, data, range(3, STEPS), mask_id)
    losses, norms = losses + more_losses, norms + more_norms
    whole = engine.module.whole_state_dict()
    compare(out, "pp2", ref, losses, norms, whole)
    out["pp2_losses"] = losses

    resumed = engine_for(cfg)
    load_full_state(resumed, checkpoint)
    resumed_losses, _ = train_steps(resumed, cfg, data, range(3, STEPS), mask_id)
    resumed_whole = resumed.module.whole_state_dict()
    out["resumed_losses"], out["uninterrupted_losses"] = resumed_losses, more_losses
    out["resumed_weights_diff"] = weight_diff(resumed_whole, whole) if whole is not None else 0.0

    # the layout-free form (optimizer.safetensors, gathered over the stages) into a fresh engine
    reloaded = engine_for(cfg, weights=checkpoint)
    load_optimizer_state(reloaded, checkpoint)
    reloaded_losses, _ = train_steps(reloaded, cfg, data, range(3, STEPS), mask_id)
    out["layout_free_resumed_loss"] = relative(reloaded_losses, more_losses)

    # control: the checkpoint's weights without its optimizer state
    restarted = engine_for(cfg, weights=checkpoint)
    restarted_losses, _ = train_steps(restarted, cfg, data, range(3, STEPS), mask_id)
    out["control_weights_only_loss"] = relative(restarted_losses, more_losses)

    # control: the shortened micro-batches padded back to full length (padding never masked)
    def padded(step, batches):
        micro_batches = []
        for m, batch in enumerate(batches):
            nb = draw_noise(batch, mask_id, SEED, step, first_row(m, 0, 1))
            pad = (0, SEQ - batch.shape[1])
            micro_batches.append((F.pad(nb.noisy, pad), (F.pad(batch, pad), F.pad(nb.masked.long(), pad).bool(),
                                                          nb.p_mask)))
        return micro_batches
    padded_losses, _ = train_steps(engine_for(cfg), cfg, data, range(STEPS), mask_id, micro_batches=padded)
    out["control_padded_loss"] = relative(padded_losses, ref["losses"])

    if dist.get_rank() == 0:
        from safetensors.torch import load_file
        out["checkpoint_weights_3"] = weight_diff(load_file(str(checkpoint / "model.safetensors")), ref["weights_3"])
        from pretrain.checkpoint.hf_export import export
        export(checkpoint, out_dir / "hf", dtype=torch.float32, log=lambda *_: None)
        from transformers import AutoModel
        hf = AutoModel.from_pretrained(str(out_dir / "hf"), trust_remote_code=True).eval()
        with torch.no_grad():
            hf_logits = hf(ids).logits.float()
        scale = logits_3.abs().max().item()
        out["export_logits"] = (hf_logits - logits_3).abs().max().item() / scale
        # control: the model two steps later
        out["control_export_logits"] = (hf_logits - PipelineForward(engine.module)(ids)).abs().max().item() / scale
    else:
        PipelineForward(engine.module)(ids)  # every stage runs the control's forward
    return out


def scenario_pp4(out_dir: Path, tokenizer: Path, mask_id: int) -> dict:
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from parallel.pipeline import LLaDAPipeline
    from parallel.tensor_parallel import TensorParallelLayers

    out = {}
    cfg = run_config(tp=2, pp=2, dp=1, fuse_projections=True, activation_checkpointing="full",
                     loss_chunk_tokens=7)
    data = make_data(1, mask_id)
    ref = reference(cfg, data, 1, mask_id)
    engine = engine_for(cfg)
    out["tp_stage"], out["tp_dp_world_size"] = engine.stage_id, engine.dp_world_size
    out["tp_boundary_shapes"] = record_boundary(engine)
    losses, norms = train_steps(engine, cfg, data, range(STEPS), mask_id)
    compare(out, "tp", ref, losses, norms, engine.module.whole_state_dict())

    # control: DeepSpeed told of pipe and data axes only sees the TP peers as replicas
    torch.manual_seed(SEED)  # as build_model seeds it
    control = LLaDAPipeline(CFG, TensorParallelLayers(2), pipeline_parallel=2, loss_from_ce=pipeline_loss,
                            init_seed=SEED, topology=PipeDataParallelTopology(num_pp=2, num_dp=2))
    control_engine = ds.initialize(control, build_optimizer(control, cfg),
                                   engine_config(cfg, resolve_layout(cfg, dist.get_world_size())))
    out["control_dp_world_size"] = control_engine.dp_world_size
    losses, norms = train_steps(control_engine, cfg, data, range(STEPS), mask_id)
    compare(out, "control", ref, losses, norms, control.whole_state_dict())

    cfg = run_config(tp=1, pp=2, dp=2)
    data = make_data(2, mask_id)
    ref = reference(cfg, data, 2, mask_id)
    engine = engine_for(cfg)
    out["dp_dp_world_size"] = engine.dp_world_size
    losses, norms = train_steps(engine, cfg, data, range(STEPS), mask_id)
    whole = engine.module.whole_state_dict()
    compare(out, "dp", ref, losses, norms, whole)
    # the optimizer state gathered over stages and replicas: in fp32 its master weights are the weights
    optimizer = gather_optimizer_state(engine)
    if optimizer is not None:
        tensors = optimizer.tensors
        out["dp_master_weights"] = weight_diff({k.removeprefix("fp32/"): v for k, v in tensors.items()
                                                if k.startswith("fp32/")}, whole)
        out["dp_state_names"] = sorted(tensors) == sorted(f"{key}/{name}" for key in STATE_KEYS for name in whole)
    return out


def main(scenario: str, out_dir: str, tokenizer: str) -> None:
    from data_pipeline.tokenizer import load_tokenizer

    ds.init_distributed()
    rank = dist.get_rank()
    torch.manual_seed(1000 + rank)  # nothing may depend on the global RNG: make ranks differ
    mask_id = load_tokenizer(Path(tokenizer)).mask_id
    run = {"pp2": scenario_pp2, "pp4": scenario_pp4}[scenario]
    out = run(Path(out_dir), Path(tokenizer), mask_id)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
    ds.exit_together(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*sys.argv[1:])

"""One rank of the tensor-parallel tests (run by torchrun from test_parallel.py).

argv: SCENARIO OUT_JSON. Every rank computes its measurements, the maxima are all-reduced,
rank 0 writes them.

- "tp" (2 ranks, TP=2): the megatron-core model against the dense model with the same seed:
  local weight shapes, weights, logits (whole, and at selected positions: the
  vocabulary-parallel head there only, gathered), loss and every gradient; with full and selective
  activation checkpointing and a chunked head; negative control: column-parallel layers that
  skip the all-reduce of their input gradient (the replicated norm and embedding weights then
  get wrong gradients). Fused projections (qkv_proj, gate_up_proj) under TP: the released
  tensors they stand for, drawn and loaded (`load_weights` of the dense model's weights), equal
  the dense model's, and so do the loss and the released gradients; negative control: the
  pieces stacked [q; k; v] before the TP split instead of rank by rank.
- "zero3" (4 ranks, TP=2 x DP=2): 5 optimizer steps of ZeRO-3 (built under zero.Init, full
  activation checkpointing, chunked head) with 2 accumulated micro-batches per rank, against
  plain torch AdamW on the dense model over the whole global batch, compared on what
  checkpoints publish (whole weights); the same with fused projections; negative control: the
  same run without the `mpu` adapter.
"""

import json
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from logits_positions import positions_diffs  # tests/support, the script's directory

from parallel import engine as ds
from parallel import fused_projections
from parallel.engine_config import ParallelConfig, deepspeed_config
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from parallel.tensor_parallel import MegatronMpu, TensorParallelLayers, initialize_groups
from pretrain.checkpoint.safetensors_stream import read_header
from pretrain.checkpoint.weights import load_weights
from pretrain.diffusion.objectives import pretrain_loss_from_ce
from pretrain.training.config import RunConfig
from pretrain.training.engine_setup import build_optimizer
from pretrain.training.objective import objective_for
from pretrain.training.step_loss import draw_noise

CFG = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=96,
                  vocab_size=128, max_sequence_length=32)
MASK_ID = 127
SEED = 7


def partition_dim(name: str) -> int | None:
    """Which dimension TP splits (None: replicated)."""
    if name.endswith("norm.weight") or ".ln_f." in name:
        return None
    row_parallel = ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight"))
    return 1 if row_parallel else 0


def local_slice(full: torch.Tensor, name: str, rank: int, size: int) -> torch.Tensor:
    dim = partition_dim(name)
    return full if dim is None else full.chunk(size, dim=dim)[rank]


def max_diff_to_dense(tp_tensors: dict, dense_tensors: dict, rank: int, size: int) -> float:
    return max((tp_tensors[n] - local_slice(dense_tensors[n], n, rank, size)).abs().max().item()
               for n in dense_tensors)


def released_diff(model, dense_tensors: dict, gradients: bool = False) -> float:
    """Largest difference of the whole released tensors of `model` (TP shards concatenated,
    fused projections split; weights, or gradients) from `dense_tensors`."""
    return max((whole - dense_tensors[released]).abs().max().item()
               for p in model.whole_model_parameters()
               for released, whole in fused_projections.whole_released_tensors(
                   p, p.param.grad if gradients else None))


def loss_and_grads(model, ids, nb) -> tuple[float, dict]:
    model.zero_grad()
    loss = pretrain_loss_from_ce(model(nb.noisy, targets=ids, loss_mask=nb.masked), nb)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def scenario_tp(rank: int) -> dict:
    initialize_groups(2)
    layers = TensorParallelLayers(2)
    dense = LLaDAModel(CFG, init_seed=SEED)
    tp = LLaDAModel(CFG, layers, init_seed=SEED)
    dense_params = dict(dense.named_parameters())
    out = {"names_equal": float(list(dense_params) == [n for n, _ in tp.named_parameters()]),
           "state_dict_keys_equal": float(list(dense.state_dict()) == list(tp.state_dict()))}
    shape_errors = 0
    for n, p in tp.named_parameters():
        expected = list(dense_params[n].shape)
        if partition_dim(n) is not None:
            expected[partition_dim(n)] //= 2
        shape_errors += list(p.shape) != expected
    out["shape_errors"] = float(shape_errors)
    out["weights"] = max_diff_to_dense(dict(tp.named_parameters()), dense_params, rank, 2)

    ids = torch.randint(0, MASK_ID, (2, 16), generator=torch.Generator().manual_seed(0))
    nb = draw_noise(ids, MASK_ID, SEED, step=0, first_row=0)
    picked = torch.tensor([11, 2, 5])
    with torch.no_grad():
        whole = tp(nb.noisy)
        out["logits"] = (whole - dense(nb.noisy)).abs().max().item()
        out.update(positions_diffs(tp(nb.noisy, logits_positions=picked), tp(nb.noisy, logits_positions=slice(4, 8)),
                                   whole, picked))
    dense_loss, dense_grads = loss_and_grads(dense, ids, nb)
    tp_loss, tp_grads = loss_and_grads(tp, ids, nb)
    out["loss"] = abs(tp_loss - dense_loss)
    out["grads"] = max_diff_to_dense(tp_grads, dense_grads, rank, 2)
    for mode in ("full", "selective"):
        variant = LLaDAModel(CFG, layers, init_seed=SEED, activation_checkpointing=mode,
                             loss_chunk_tokens=5)
        v_loss, v_grads = loss_and_grads(variant, ids, nb)
        out[f"{mode}_chunked_loss"] = abs(v_loss - tp_loss)
        out[f"{mode}_chunked_grads"] = max((v_grads[n] - tp_grads[n]).abs().max().item() for n in tp_grads)

    fused = LLaDAModel(CFG, layers, init_seed=SEED, fuse_projections=True)
    out["fused_weights"] = released_diff(fused, dense_params)
    fused_loss, _ = loss_and_grads(fused, ids, nb)
    out["fused_loss"] = abs(fused_loss - dense_loss)
    out["fused_grads"] = released_diff(fused, dense_grads, gradients=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        from safetensors.torch import save_file
        save_file({n: p.detach().contiguous() for n, p in dense_params.items()}, str(path))
        loaded = LLaDAModel(CFG, layers, init_seed=None, fuse_projections=True)
        load_weights(loaded, read_header(path), str(path))
    out["fused_loaded_weights"] = released_diff(loaded, dense_params)
    with mock.patch.object(fused_projections, "rank_major", lambda pieces, tp_size: torch.cat(pieces)):
        stacked_whole = LLaDAModel(CFG, layers, init_seed=SEED, fuse_projections=True)
    out["control_fused_weights"] = released_diff(stacked_whole, dense_params)

    column = layers.column

    def column_without_grad_allreduce(*args, **kwargs):
        layer = column(*args, **kwargs)
        layer.allreduce_dgrad, layer.disable_grad_reduce = False, True
        return layer

    layers.column = column_without_grad_allreduce
    broken = LLaDAModel(CFG, layers, init_seed=SEED)
    layers.column = column
    _, broken_grads = loss_and_grads(broken, ids, nb)
    out["control_grads"] = max_diff_to_dense(broken_grads, dense_grads, rank, 2)
    return out


def scenario_zero3(rank: int) -> dict:
    initialize_groups(2)
    dp_rank = rank // 2  # ranks: tp fastest, then dp
    run = RunConfig()
    run.model = CFG
    run.train.seed = SEED
    run.optim.grad_clip = 1.0
    # Adam's first steps divide each gradient by its own magnitude: at eps 1e-8, float noise in a
    # near-zero gradient element (summation order differs between layouts) becomes a visible
    # weight difference. eps 1e-4 damps that, leaving differences at float precision.
    run.optim.eps = 1e-4
    micro, accum, dp_size, steps, seq = 2, 2, 2, 5, 16
    global_rows = micro * accum * dp_size
    data = torch.randint(0, MASK_ID, (steps, global_rows, seq), generator=torch.Generator().manual_seed(1))
    lr = 3e-3

    # The reference: one process, the dense model, torch AdamW on the whole global batch.
    reference = LLaDAModel(CFG, init_seed=SEED)
    opt = build_optimizer(reference, run)
    ref_losses, ref_norms = [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        nb = draw_noise(data[step], MASK_ID, SEED, step, first_row=0)
        loss = pretrain_loss_from_ce(reference(nb.noisy, targets=data[step], loss_mask=nb.masked), nb)
        loss.backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), run.optim.grad_clip).item())
        opt.step()
        ref_losses.append(loss.item())
    ref_weights = dict(reference.named_parameters())

    out = {}
    # The control first: DeepSpeed keeps the last mpu it was given in module state.
    for label, with_mpu, fused in (("control", False, False), ("mpu", True, False), ("fused", True, True)):
        mpu = MegatronMpu() if with_mpu else None
        config = deepspeed_config(ParallelConfig(zero_stage=3), micro_batch_size=micro,
                                  grad_accum_steps=accum, bf16=False, grad_clip=run.optim.grad_clip)
        with ds.model_construction(config, mpu):
            # the real run also checkpoints every block and chunks the head (ZeRO-3 re-gathers
            # parameters in the recomputation)
            model = LLaDAModel(CFG, TensorParallelLayers(2), init_seed=SEED,
                               activation_checkpointing="full" if with_mpu else "none",
                               loss_chunk_tokens=7 if with_mpu else 0, fuse_projections=fused)
        engine = ds.initialize(model, build_optimizer(model, run), config, mpu=mpu)
        out[f"{label}_dp_world_size"] = float(engine.dp_world_size)
        losses, norms = [], []
        for step in range(steps):
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            for micro_step in range(accum):
                first_row = (micro_step * dp_size + dp_rank) * micro
                batch = data[step, first_row:first_row + micro]
                loss = objective_for(run).micro_batch_loss(engine, batch, MASK_ID, step, first_row)
                engine.backward(loss)
                engine.step()
                total += loss.item()
            summed = torch.tensor(total)
            dist.all_reduce(summed)  # 2 TP ranks x 2 DP ranks x accum micro-batches
            losses.append(summed.item() / (2 * dp_size * accum))
            norms.append(float(engine.get_global_grad_norm()))
        out[f"{label}_loss"] = max(abs(a - b) for a, b in zip(losses, ref_losses))
        out[f"{label}_grad_norm"] = max(abs(a - b) / b for a, b in zip(norms, ref_norms))
        # what checkpoints publish: ZeRO partitions gathered, TP shards concatenated, on rank 0
        whole = ds.full_state_dict(engine.module)
        out[f"{label}_weights"] = (max((whole[n] - ref_weights[n]).abs().max().item() for n in ref_weights)
                                   if rank == 0 else 0.0)
    return out


def main(scenario: str, out_path: str) -> None:
    rank = int(os.environ["RANK"])
    ds.init_distributed()
    torch.manual_seed(1000 + rank)  # nothing may depend on the global RNG: make ranks differ
    out = {"tp": scenario_tp, "zero3": scenario_zero3}[scenario](rank)
    values = torch.tensor([out[k] for k in sorted(out)], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(zip(sorted(out), values.tolist())), f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

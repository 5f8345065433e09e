"""Memory plan tables: the per-GPU estimate for the paper's models, and estimate vs measurement.

`python benchmarks/memory_plan.py` prints
1. the launch-time estimate for LLaDA 8B and 1B at the paper's batch (local 4 x 4096, global
   1280) over data-parallel sizes and activation-checkpointing modes, against 80 GB;
2. for a small model on this machine, the measured peak of one forward and backward (CUDA's
   allocator peak on GPU, torch's MemTracker on CPU) next to the estimate, for every
   checkpointing mode with and without loss chunks.
Options: --d-model, --layers, --seq-len, --batch, --vocab size the measured model.
"""

from __future__ import annotations

import argparse

import torch

from parallel.memory_plan import CHECKPOINTING, GiB, estimate_memory, parameter_count
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig, preset


def paper_table() -> None:
    print("per-GPU estimate, bf16, micro 4 x 4096, loss chunks of 1024 (GiB; * = fits 80 GB); "
          "ZeRO-3, but ZeRO-2 for selective checkpointing (ZeRO-3 cannot run it)")
    print(f"{'model':<9} {'DP':>4} " + " ".join(f"{mode:>10}" for mode in CHECKPOINTING))
    for name in ("llada_8b", "llada_1b"):
        for dp in (8, 16, 64, 160):
            cells = []
            for mode in CHECKPOINTING:
                stage = 2 if mode == "selective" else 3
                e = estimate_memory(preset(name), tensor_parallel=1, data_parallel=dp, zero_stage=stage,
                                    micro_batch_size=4, seq_len=4096, bf16=True,
                                    activation_checkpointing=mode, loss_chunk_tokens=1024,
                                    prefetch_bucket_size=50_000_000, reduce_bucket_size=500_000_000)
                cells.append(f"{e.total / GiB:9.1f}{'*' if e.fits(80 * GiB) else ' '}")
            print(f"{name:<9} {dp:>4} " + " ".join(cells))


def measured_peak(model: LLaDAModel, ids: torch.Tensor) -> int:
    if ids.is_cuda:
        torch.cuda.reset_peak_memory_stats()
        model(ids, targets=ids).mean().backward()
        return torch.cuda.max_memory_allocated()
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(ids, targets=ids).mean().backward()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def measured_table(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda"
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.d_model // 64,
                      n_kv_heads=args.d_model // 64, mlp_hidden_size=args.d_model * 3,
                      vocab_size=args.vocab, max_sequence_length=args.seq_len)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    states = parameter_count(cfg) * 2 * (2 if bf16 else 4)  # weights + gradients
    print(f"\n{device.type}, {'bf16' if bf16 else 'fp32'}, d {args.d_model}, {args.layers} layers, "
          f"vocab {args.vocab}, {args.batch} x {args.seq_len} tokens "
          f"(MiB of activations + head: peak minus weights and gradients)")
    print(f"{'checkpointing':<13} {'loss chunk':>10} {'measured':>9} {'estimate':>9}")
    for mode in CHECKPOINTING:
        for chunk in (0, 1024):
            model = LLaDAModel(cfg, init_seed=0, activation_checkpointing=mode, loss_chunk_tokens=chunk)
            model = model.to(device, torch.bfloat16 if bf16 else torch.float32)
            peak = measured_peak(model, ids) - states
            e = estimate_memory(cfg, tensor_parallel=1, data_parallel=1, zero_stage=0,
                                micro_batch_size=args.batch, seq_len=args.seq_len, bf16=bf16,
                                activation_checkpointing=mode, loss_chunk_tokens=chunk,
                                prefetch_bucket_size=1, reduce_bucket_size=1)
            print(f"{mode:<13} {chunk or 'none':>10} {peak / 2**20:9.1f} "
                  f"{(e.activations + e.head) / 2**20:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=16384)
    args = parser.parse_args()
    paper_table()
    measured_table(args)


if __name__ == "__main__":
    main()

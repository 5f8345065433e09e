"""Training-step throughput of the stack against a Hugging Face Llama reference: one table, one run.

`python benchmarks/train_step.py` (on one GPU; defaults are the paper's shapes, bf16, local
batch 4 x 4096) prints one row per configuration, each measured in its own process so its peak
memory is its own:

  stack 8B shape     LLaDA 8B's full width (d 4096, 32 heads, FFN 12288, vocab 126464) with
                     --layers blocks, the real DeepSpeed engine (ZeRO --zero-stage, bf16 with
                     fp32 master weights) and the real Algorithm 1 loss (`pretrain.train`)
  stack 1B           LLaDA 1B whole (22 blocks), the same way
  reference 8B shape transformers' LlamaForCausalLM of the 8B shape with the causal mask
                     removed (every attention's `is_causal` off and no mask, so SDPA attends
                     both ways: `bidirectional_llama`, tested), the same loss through its full
                     logits, torch AdamW with the same settings and clipping, bf16 autocast over
                     fp32 weights (the usual transformers recipe)
  stack 8B shape, X  with --switches: the stack's 8B-shape row again with one fast-path switch
                     flipped (`SWITCHES`: fused projections off, per-tensor AdamW, compiled
                     pointwise ops, an SDPA kernel, selective or full checkpointing, a chunked
                     head), so one run measures what each switch does; a switch the machine
                     cannot run (a GPU-only kernel on CPU) gets a "failed" row

Columns: tokens/s, model and executed TFLOP/s and MFU (`pretrain.runtime.flops`: 51.43 GFLOP/token for
LLaDA 8B at 4096; the reference runs its head at every position, the stack only at masked
ones), peak memory (CUDA allocator peak; on CPU the process's peak RSS) and the stack's tokens/s
over the reference's at the same shape (the headline). On CPU it runs in fp32 at whatever shape
it is given, to prove the script works, e.g.
    python benchmarks/train_step.py --d-model 128 --layers 2 --seq-len 256 --vocab 2048 --batch 2
(--d-model scales every row's width by d / 4096: heads, KV heads and FFN with it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parallel.model_config import ModelConfig, preset  # noqa: E402
from pretrain.diffusion.objectives import forward_process, pretrain_loss_from_ce  # noqa: E402
from pretrain.runtime.flops import FlopMeter, Flops, device_name, mfu, micro_batch_flops, peak_tflops  # noqa: E402
from pretrain.runtime.throughput import peak_memory_gib  # noqa: E402

# row name on the command line -> the name the table prints
ROWS = {"stack-8b": "stack 8B shape", "stack-1b": "stack 1B", "reference-8b": "reference 8B shape"}
# --switches: the stack's 8B-shape row again with one fast-path switch flipped from the command's
# settings (the flags are appended, so they win), each its own row
SWITCHES = {
    "separate q/k/v and gate/up": ["--no-fuse-projections"],
    "per-tensor AdamW": ["--no-fused-adamw"],
    "compiled pointwise ops": ["--compile-pointwise"],
    "SDPA flash kernel": ["--attention-backend", "sdpa_flash"],
    "SDPA cuDNN kernel": ["--attention-backend", "sdpa_cudnn"],
    "selective checkpointing": ["--activation-checkpointing", "selective"],
    "full checkpointing": ["--activation-checkpointing", "full"],
    "head in chunks of 1024": ["--loss-chunk-tokens", "1024"],
}
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def scaled(config: ModelConfig, factor: float, vocab: int, seq_len: int, layers: int | None = None) -> ModelConfig:
    """`config` with its width times `factor` (heads, KV heads and FFN alike, at least 2 heads
    and 1 KV head), `vocab` tokens and room for seq_len."""
    if factor == 1:
        heads, kv_heads, d, ffn = config.n_heads, config.n_kv_heads, config.d_model, config.mlp_hidden_size
    else:
        heads = max(2, round(config.n_heads * factor))
        kv_heads = max(1, heads * config.n_kv_heads // config.n_heads)
        head_dim = max(2, 2 * round(config.d_model * factor / heads / 2))
        d, ffn = heads * head_dim, max(2, 2 * round(config.mlp_hidden_size * factor / 2))
    return dataclasses.replace(config, d_model=d, n_heads=heads, n_kv_heads=kv_heads, mlp_hidden_size=ffn,
                               vocab_size=vocab, max_sequence_length=max(seq_len, config.max_sequence_length),
                               n_layers=layers or config.n_layers)


def row_config(row: str, args) -> ModelConfig:
    factor = args.d_model / 4096
    if row == "stack-1b":
        return scaled(preset("llada_1b"), factor, args.vocab, args.seq_len)
    return scaled(preset("llada_8b"), factor, args.vocab, args.seq_len, layers=args.layers)


def bidirectional_llama(config: ModelConfig):
    """transformers' LlamaForCausalLM with `config`'s shape and no causal mask: with no mask given
    its SDPA attention falls back to each module's `is_causal`, which is switched off."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.d_model,
                     intermediate_size=config.mlp_hidden_size, num_hidden_layers=config.n_layers,
                     num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                     max_position_embeddings=config.max_sequence_length, rope_theta=config.rope_theta,
                     rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=False, attention_bias=False,
                     mlp_bias=False)
    hf._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf)
    for layer in model.model.layers:
        layer.self_attn.is_causal = False
    return model


def _batch(config: ModelConfig, args, step: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return torch.randint(0, config.vocab_size - 1, (args.batch, args.seq_len), generator=gen).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_stack(config: ModelConfig, args) -> tuple[float, Flops]:
    """(seconds for the timed steps, their FLOPs) through the training loop's own pieces."""
    from parallel import engine as ds
    from pretrain.training.config import RunConfig, config_problems
    from pretrain.training.engine_setup import build_engine
    from pretrain.training.layout import engine_config, resolve_layout
    from pretrain.training.objective import objective_for

    cfg = RunConfig(model=config)
    cfg.data.seq_len = args.seq_len
    cfg.train.micro_batch_size = cfg.train.global_batch_size = args.batch
    cfg.train.attention_backend = args.attention_backend
    cfg.parallel.zero_stage = args.zero_stage
    cfg.memory.activation_checkpointing = args.activation_checkpointing
    cfg.memory.loss_chunk_tokens = args.loss_chunk_tokens
    cfg.fast.compile_pointwise = args.compile_pointwise
    cfg.fast.fused_adamw = args.fused_adamw
    cfg.fast.fuse_projections = args.fuse_projections
    problems = config_problems(cfg, check_paths=False)
    if problems:
        raise SystemExit("stack config: " + "; ".join(problems))
    ds.init_distributed()
    engine = build_engine(cfg, engine_config(cfg, resolve_layout(cfg, 1)))
    meter = FlopMeter(config, activation_checkpointing=cfg.memory.activation_checkpointing,
                      loss_chunk_tokens=cfg.memory.loss_chunk_tokens).attach(engine.module)
    device = next(engine.module.parameters()).device
    mask_id = config.vocab_size - 1

    objective = objective_for(cfg)

    def step(i: int) -> None:
        loss = objective.micro_batch_loss(engine, _batch(config, args, i, device), mask_id, i, 0)
        engine.backward(loss)
        engine.step()

    return _timed(step, args, device, meter)


def run_reference(config: ModelConfig, args) -> tuple[float, Flops]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = bidirectional_llama(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.1, fused=args.fused_adamw)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    mask_id = config.vocab_size - 1

    def step(i: int) -> None:
        ids = _batch(config, args, i, device)
        nb = forward_process(ids, mask_id, generator=torch.Generator(device=device).manual_seed(i))
        with autocast:
            logits = model(input_ids=nb.noisy).logits
        ce = torch.zeros(ids.shape, dtype=torch.float32, device=device)
        ce[nb.masked] = F.cross_entropy(logits[nb.masked].float(), ids[nb.masked], reduction="none")
        pretrain_loss_from_ce(ce, nb).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, _ = _timed(step, args, device, None)
    # the head runs at every position
    per_step = micro_batch_flops(config, args.batch, args.seq_len, args.batch * args.seq_len,
                                 activation_checkpointing="none", loss_chunk_tokens=0)
    return seconds, Flops(per_step.model * args.steps, per_step.executed * args.steps)


def _timed(step, args, device: torch.device, meter: FlopMeter | None) -> tuple[float, Flops]:
    for i in range(args.warmup):
        step(i)
    _sync(device)
    if meter is not None:
        meter.take()
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    _sync(device)
    return time.perf_counter() - start, meter.take() if meter is not None else Flops()


def measure_row(row: str, args) -> dict:
    config = row_config(row, args)
    seconds, flops = (run_reference if row.startswith("reference") else run_stack)(config, args)
    row = f"{ROWS[row]}, {args.label}" if args.label else ROWS[row]
    tokens = args.steps * args.batch * args.seq_len
    memory, memory_kind = peak_memory_gib()
    peak = peak_tflops(device_name(), args.peak_tflops)
    model_tflops = flops.model / seconds / 1e12
    return {"row": row, "tokens_per_s": tokens / seconds, "model_tflops": model_tflops,
            "executed_tflops": flops.executed / seconds / 1e12, "mfu": mfu(model_tflops, peak),
            "peak_memory_gib": memory, "memory_kind": memory_kind, "device": device_name(),
            "layers": config.n_layers, "d_model": config.d_model}


def print_table(results: list[dict], args) -> None:
    reference = next(r for r in results if r["row"].startswith("reference"))
    first = results[0]
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    print(f"{first['device']}, {precision}, batch {args.batch} x {args.seq_len}, {args.steps} steps after "
          f"{args.warmup} warm-up; attention {args.attention_backend}, compile_pointwise "
          f"{args.compile_pointwise}, fused_adamw {args.fused_adamw}, fuse_projections "
          f"{args.fuse_projections}, checkpointing "
          f"{args.activation_checkpointing}, ZeRO {args.zero_stage}; memory = {first['memory_kind']}")
    print("| row | layers x d | tokens/s | model TFLOP/s | executed TFLOP/s | MFU | peak memory GiB | x reference |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "failed" in r:
            print(f"| {r['row']} | failed (exit code {r['failed']}; its error is above) | | | | | | |")
            continue
        ratio = (f"{r['tokens_per_s'] / reference['tokens_per_s']:.2f}"
                 if r["row"] != ROWS["stack-1b"] else "-")
        mfu_text = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "unknown"
        print(f"| {r['row']} | {r['layers']} x {r['d_model']} | {r['tokens_per_s']:,.0f} | "
              f"{r['model_tflops']:.3g} | {r['executed_tflops']:.3g} | {mfu_text} | "
              f"{r['peak_memory_gib']:.2f} | {ratio} |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=4096, help="the 8B shape's width (others scale)")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the 8B-shape rows")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=126464)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--activation-checkpointing", default="none")
    parser.add_argument("--loss-chunk-tokens", type=int, default=0)
    parser.add_argument("--compile-pointwise", action="store_true")
    parser.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=True,
                        help="one q/k/v and one gate/up matmul per block (the stack's rows)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="dense bf16 TFLOP/s for MFU (default: by device name; unknown elsewhere)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        help="rows to measure (the reference is always measured)")
    parser.add_argument("--switches", action="store_true",
                        help="add a stack 8B-shape row per fast-path switch flipped (SWITCHES)")
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # a child measuring one row
    parser.add_argument("--label", help=argparse.SUPPRESS)  # the switch a child's row flips
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.row:
        Path(args.result).write_text(json.dumps(measure_row(args.row, args)))
        return 0
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    results = []
    passed = argv if argv is not None else sys.argv[1:]
    jobs = [(row, [], None) for row in ROWS if row in args.rows or row == "reference-8b"]
    if args.switches:
        jobs += [("stack-8b", flags, label) for label, flags in SWITCHES.items()]
    with tempfile.TemporaryDirectory() as tmp:
        for index, (row, flags, label) in enumerate(jobs):
            result = Path(tmp, f"{index}.json")
            proc = subprocess.run([sys.executable, __file__, *passed, *flags, "--row", row, "--result",
                                   str(result), *(["--label", label] if label else [])], env=env, cwd=ROOT)
            if proc.returncode == 0:
                results.append(json.loads(result.read_text()))
            elif label:  # a switch this machine cannot run (a GPU-only kernel on CPU): say so, go on
                results.append({"row": f"{ROWS[row]}, {label}", "failed": proc.returncode})
            else:
                print(f"{row}: failed with exit code {proc.returncode}", file=sys.stderr)
                return proc.returncode
    print_table(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

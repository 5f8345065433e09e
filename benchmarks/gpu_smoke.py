"""The GPU path in one call: imports, one training step on CUDA in bf16, every fast-path switch.

`python benchmarks/gpu_smoke.py` prints a pass/fail table and exits 1 if anything failed:
1. the imports a GPU run needs (flash-attn is optional and only reported);
2. one optimizer step of a small model through the real DeepSpeed engine (ZeRO-1 and ZeRO-3,
   bf16, the Algorithm 1 loss) with the fast path on (compiled pointwise ops, fused AdamW, fused
   projections): finite loss and gradient norm;
3. each switch on vs off on the same weights and batch in bf16: compiled pointwise ops, fused
   projections, every SDPA kernel (and flash-attn when installed) against SDPA's own choice,
   full and selective activation checkpointing, the chunked head; loss within 1% and every
   gradient (under its released name) within 5% (L2, relative), the measured differences
   printed; fused AdamW against the per-tensor loop on fp32 weights (one step);
4. the benchmark's reference (transformers' Llama, causal mask removed) attends both ways on GPU.
A kernel that cannot run on this GPU / torch build is reported "unavailable", not failed. On a
machine without CUDA it says so and exits 0. Run it from the repository root; a machine without
internet needs the wheels `benchmarks/prepare_wheels.sh` downloads.
"""

from __future__ import annotations

import importlib
import math
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS: list[tuple[str, str, str]] = []  # (check, PASS | FAIL | unavailable, detail)


def check(name: str):
    def wrap(fn):
        try:
            detail = fn()
            RESULTS.append((name, "PASS", detail or ""))
        except Unavailable as e:
            RESULTS.append((name, "unavailable", str(e)))
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            RESULTS.append((name, "FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:160]))
            traceback.print_exc()
        return fn
    return wrap


class Unavailable(Exception):
    """This GPU or torch build cannot run the thing checked."""


def check_imports() -> None:
    for module in ("deepspeed", "megatron.core", "transformers", "webdataset", "tokenizers",
                   "safetensors", "triton"):
        check(f"import {module}")(lambda m=module: getattr(importlib.import_module(m), "__version__", "ok"))

    @check("import flash_attn (optional)")
    def _():
        try:
            return importlib.import_module("flash_attn").__version__
        except ImportError:
            raise Unavailable("not installed: the attention runs on SDPA") from None


def small_config(**overrides):
    from parallel.model_config import ModelConfig
    fields = dict(d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=688,
                  vocab_size=1024, max_sequence_length=256)
    return ModelConfig(**{**fields, **overrides})


def check_engine_steps() -> None:
    from parallel import engine as ds
    from pretrain.training.config import load_config
    from pretrain.training.engine_setup import build_engine
    from pretrain.training.layout import engine_config, resolve_layout
    from pretrain.training.objective import objective_for

    ds.init_distributed()
    for stage in (1, 3):
        @check(f"engine step, ZeRO-{stage}, bf16, fast path on")
        def _(stage=stage):
            cfg = load_config(None, ["model.n_layers=2", "data.seq_len=256", "train.micro_batch_size=2",
                                     "train.global_batch_size=2", f"parallel.zero_stage={stage}",
                                     "fast.compile_pointwise=true", "fast.fused_adamw=true",
                                     "fast.fuse_projections=true"])
            engine = build_engine(cfg, engine_config(cfg, resolve_layout(cfg, 1)))
            ids = torch.randint(0, cfg.model.vocab_size - 1, (2, 256), device="cuda")
            loss = objective_for(cfg).micro_batch_loss(engine, ids, cfg.model.vocab_size - 1, 0, 0)
            engine.backward(loss)
            engine.step()
            norm = float(engine.get_global_grad_norm())
            if not (math.isfinite(loss.item()) and math.isfinite(norm)):
                raise AssertionError(f"loss {loss.item()}, grad norm {norm}")
            return f"loss {loss.item():.3f}, grad norm {norm:.3f}"


def loss_and_grads(config, *, seed: int = 0, **model_args):
    from parallel.fused_projections import whole_released_tensors
    from parallel.model import LLaDAModel
    from pretrain.diffusion.objectives import forward_process, pretrain_loss_from_ce

    torch.manual_seed(0)
    model = LLaDAModel(config, init_seed=seed, **model_args).to("cuda", torch.bfloat16)
    ids = torch.randint(0, config.vocab_size - 1, (2, 256), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))
    noise = forward_process(ids, config.vocab_size - 1, generator=torch.Generator(device="cuda").manual_seed(2))
    try:
        loss = pretrain_loss_from_ce(model(noise.noisy, targets=ids, loss_mask=noise.masked), noise)
        loss.backward()
    except RuntimeError as e:
        if any(text in str(e) for text in ("No available kernel", "No viable backend", "not supported")):
            raise Unavailable(str(e).splitlines()[0][:160]) from None
        raise
    return loss.item(), {released: grad.float() for p in model.whole_model_parameters()
                         for released, grad in whole_released_tensors(p, p.param.grad)}


def compare(base, other, loss_tol: float = 1e-2, grad_tol: float = 5e-2) -> str:
    loss_err = abs(base[0] - other[0]) / abs(base[0])
    grad_err = max(((base[1][n] - other[1][n]).norm() / base[1][n].norm().clamp_min(1e-12)).item()
                   for n in base[1])
    detail = f"loss rel {loss_err:.1e}, worst grad rel {grad_err:.1e}"
    if loss_err > loss_tol or grad_err > grad_tol:
        raise AssertionError(detail)
    return detail


def check_switches() -> None:
    from parallel.attention import flash_attn_func

    config = small_config()
    base = loss_and_grads(config)
    check("compiled pointwise = eager")(lambda: compare(base, loss_and_grads(config, pointwise="compiled")))
    check("fused projections = unfused")(lambda: compare(base, loss_and_grads(config, fuse_projections=True)))
    for backend in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "sdpa"):
        check(f"attention {backend} = auto")(
            lambda b=backend: compare(base, loss_and_grads(config, attention_backend=b)))
    if flash_attn_func is not None:
        check("attention flash-attn = SDPA")(
            lambda: compare(loss_and_grads(config, attention_backend="sdpa"),
                            loss_and_grads(config, attention_backend="flash")))
    for mode in ("full", "selective"):
        check(f"{mode} checkpointing = none")(
            lambda m=mode: compare(base, loss_and_grads(config, activation_checkpointing=m)))
    check("chunked head (64) = whole")(lambda: compare(base, loss_and_grads(config, loss_chunk_tokens=64)))
    check("negative control: other weights differ")(
        lambda: _must_fail(lambda: compare(base, loss_and_grads(config, seed=1))))

    @check("fused AdamW = per-tensor loop (fp32, one step)")
    def _():
        weights = []
        for fused in (False, True):
            torch.manual_seed(0)
            layer = torch.nn.Linear(512, 512, device="cuda")
            layer.weight.grad = torch.randn_like(layer.weight)
            layer.bias.grad = torch.randn_like(layer.bias)
            torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=0.1, fused=fused).step()
            weights.append(layer.weight.detach().clone())
        diff = (weights[0] - weights[1]).abs().max().item()
        if diff > 1e-6:
            raise AssertionError(f"max difference {diff:.1e}")
        return f"max difference {diff:.1e}"


def _must_fail(fn) -> str:
    try:
        detail = fn()
    except AssertionError as e:
        return f"differs as it must ({e})"
    raise AssertionError(f"a different model compared equal ({detail})")


def check_reference() -> None:
    @check("reference Llama attends both ways (bf16)")
    def _():
        import importlib.util
        spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks" / "train_step.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.bidirectional_llama(small_config()).to("cuda", torch.bfloat16).eval()
        ids = torch.randint(0, 1000, (1, 64), device="cuda")
        later = ids.clone()
        later[0, -1] += 1
        with torch.no_grad():
            change = (model(input_ids=ids).logits[0, 0] - model(input_ids=later).logits[0, 0]).abs().max().item()
        if change == 0:
            raise AssertionError("a later token left the first position's logits unchanged: causal")
        return f"first position's logits moved by {change:.2e}"


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here: nothing to check (exit 0)")
        return 0
    print(f"gpu_smoke: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    check_imports()
    check_engine_steps()
    check_switches()
    check_reference()
    width = max(len(name) for name, _, _ in RESULTS)
    print(f"\n| {'check':<{width}} | result | detail |")
    print(f"|{'-' * (width + 2)}|--------|--------|")
    for name, result, detail in RESULTS:
        print(f"| {name:<{width}} | {result} | {detail} |")
    failed = [name for name, result, _ in RESULTS if result == "FAIL"]
    print(f"\n{len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Each fast-path switch leaves loss and gradients as they are and has an effect one can see.

- compiled pointwise ops (`fast.compile_pointwise`, parallel/fused_ops.py): loss and every
  gradient equal the eager model's within fp32 rounding, at three sequence lengths, with no
  recompilation after the first (dynamic shapes; a shape-specialised compile of the same
  function recompiles per length, the negative control);
- fused AdamW (`fast.fused_adamw`): the same updates as the per-tensor loop, and the profiler
  shows one `_fused_adamw_` kernel per parameter group where the loop runs its update
  arithmetic tensor by tensor;
- the SDPA kernel (`train.attention_backend: sdpa_*`): math and flash (CPU) give the same loss
  and gradients, and the profiler shows which kernel ran; the GPU-only kernels are skipped here;
- fused projections (`fast.fuse_projections`, parallel/fused_projections.py): the unfused
  model's weights, loss and (released) gradients with 4 matmuls per block instead of 7; whole
  weights leave and enter a fused model under the released names, through a KV cache too
  (tensor and pipeline parallelism and ZeRO-3 in test_parallel.py and test_pipeline.py);
- the benchmark's reference (transformers' Llama with the causal mask removed) really attends
  both ways: a later token changes an earlier position's logits, which the causal model's
  do not.
Every equivalence check is shown to fail on a model that differs slightly.
"""

import collections
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch._dynamo.utils import counters

from parallel import fused_ops
from parallel.attention import KVCache
from parallel.engine import full_state_dict
from parallel.fused_projections import whole_released_tensors
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from pretrain.checkpoint.hf_format import expected_tensors
from pretrain.checkpoint.safetensors_stream import read_header
from pretrain.checkpoint.weights import load_weights
from pretrain.diffusion.objectives import forward_process, pretrain_loss_from_ce
from pretrain.training.config import ConfigError, load_config
from pretrain.training.engine_setup import build_model, build_optimizer
from pretrain.training.layout import engine_config, resolve_layout

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                  vocab_size=50, max_sequence_length=64)
# Lengths equal to no other dimension of CFG (torch's duck sizing would tie them to it).
LENGTHS = (12, 17, 29)


def token_ids(seq_len: int) -> torch.Tensor:
    return torch.randint(0, 49, (2, seq_len), generator=torch.Generator().manual_seed(seq_len))


def loss_and_grads(model: LLaDAModel, seq_len: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and every gradient under its released name (fused projections split)."""
    ids = token_ids(seq_len)
    noise = forward_process(ids, 49, generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    loss = pretrain_loss_from_ce(model(noise.noisy, targets=ids, loss_mask=noise.masked), noise)
    loss.backward()
    return loss.detach(), {released: grad.clone() for p in model.whole_model_parameters()
                           for released, grad in whole_released_tensors(p, p.param.grad)}


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


def perturbed(model: LLaDAModel) -> LLaDAModel:
    with torch.no_grad():
        model.model.transformer.blocks[0].ff_norm.weight[0] += 1e-3
    return model


# ------------------------------------------------------------------ compiled pointwise ops

requires_cxx = pytest.mark.skipif(
    not torch.cuda.is_available() and shutil.which("g++") is None,
    reason="torch.compile on CPU generates C++: no g++ on this machine")


@requires_cxx
@pytest.mark.parametrize("mode", ["none", "selective"])
def test_compiled_pointwise_equals_eager_and_compiles_once_for_all_lengths(mode):
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    eager = LLaDAModel(CFG, init_seed=0, activation_checkpointing=mode)
    compiled = LLaDAModel(CFG, init_seed=0, activation_checkpointing=mode, pointwise="compiled")
    assert compiled.blocks[0].attn_norm.pointwise is fused_ops.pointwise_ops("compiled")
    graphs = []
    for seq_len in LENGTHS:
        assert_same(loss_and_grads(eager, seq_len), loss_and_grads(compiled, seq_len))
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs[0] == 3  # RMSNorm, RoPE, SwiGLU: one graph each ...
    assert graphs[-1] == graphs[0]  # ... for every length
    with pytest.raises(AssertionError):  # the comparison can fail
        assert_same(loss_and_grads(eager, LENGTHS[0]), loss_and_grads(perturbed(compiled), LENGTHS[0]))


def test_shape_specialised_compile_recompiles_per_length():
    """The negative control of the count above (dynamo's own backend: no code generation)."""
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    rotary = torch.compile(fused_ops.rotary, dynamic=False, backend="eager")
    for seq_len in LENGTHS:
        x, angles = torch.randn(2, seq_len, 4, 8), torch.randn(1, seq_len, 1, 8)
        rotary(x, angles.cos(), angles.sin())
    assert counters["stats"]["unique_graphs"] - before == len(LENGTHS)


def test_config_switches_reach_the_model_and_the_optimizer(tmp_path):
    cfg = load_config(None, ["fast.compile_pointwise=true", "fast.fused_adamw=true",
                             "fast.fuse_projections=true", "parallel.zero_stage=0"])
    layout = resolve_layout(cfg, 1)
    model, _ = build_model(cfg, engine_config(cfg, layout))
    assert {m.pointwise.name for m in model.modules() if hasattr(m, "pointwise")} == {"compiled"}
    assert model.blocks[0].rope.pointwise.name == "compiled"
    assert build_optimizer(model, cfg).defaults["fused"] is True
    assert all(block.fused for block in model.blocks)
    # the optimizer state's layout changes: a resume across the switch loads the weights only
    assert layout.checkpoint_key()["fused_projections"] is True
    assert "fused_projections" not in resolve_layout(load_config(None, []), 1).checkpoint_key()


# ------------------------------------------------------------------ fused AdamW

def adamw_run(fused: bool, lr: float = 1e-2) -> tuple[list[torch.Tensor], collections.Counter]:
    """Weights after 3 steps, and the aten ops of the last optimizer step."""
    cfg = load_config(None, [f"fast.fused_adamw={str(fused).lower()}", f"schedule.peak_lr={lr}"])
    model = LLaDAModel(CFG, init_seed=0)
    optimizer = build_optimizer(model, cfg)
    for step in range(3):
        loss_and_grads(model, LENGTHS[step])
        if step < 2:
            optimizer.step()
    with torch.profiler.profile() as prof:
        optimizer.step()
    ops = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    return [p.detach().clone() for p in model.parameters()], ops


def test_fused_adamw_gives_the_same_updates_in_one_kernel():
    loop_weights, loop_ops = adamw_run(fused=False)
    fused_weights, fused_ops_seen = adamw_run(fused=True)
    for a, b in zip(loop_weights, fused_weights):  # equal up to fp32 rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert fused_ops_seen["aten::_fused_adamw_"] == 2  # one per parameter group
    assert loop_ops["aten::_fused_adamw_"] == 0
    tensors = len(loop_weights)
    for update_op in ("aten::addcdiv_", "aten::lerp_", "aten::sqrt"):  # the loop's per-tensor math
        assert (loop_ops[update_op], fused_ops_seen[update_op]) == (tensors, 0), update_op
    other_lr, _ = adamw_run(fused=True, lr=1.1e-2)  # the comparison can fail
    assert any(not torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(loop_weights, other_lr))


# ------------------------------------------------------------------ SDPA kernels

def kernels_run(backend: str, causal: bool = False):
    config = ModelConfig(**{**CFG.__dict__, "causal": causal})
    model = LLaDAModel(config, init_seed=0, attention_backend=backend)
    with torch.profiler.profile() as prof:
        result = loss_and_grads(model, LENGTHS[1])
    return result, {e.name for e in prof.events()}


def test_sdpa_math_and_flash_kernels_agree_and_are_the_ones_that_ran():
    math, math_ops = kernels_run("sdpa_math")
    flash, flash_ops = kernels_run("sdpa_flash")
    assert_same(math, flash)
    cpu_flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert cpu_flash in flash_ops and cpu_flash not in math_ops
    assert "aten::_scaled_dot_product_attention_math" in math_ops
    causal, _ = kernels_run("sdpa_flash", causal=True)  # the comparison can fail
    with pytest.raises(AssertionError):
        assert_same(flash, causal)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN and memory-efficient SDPA kernels are CUDA-only")
@pytest.mark.parametrize("backend", ["sdpa_cudnn", "sdpa_efficient"])
def test_gpu_sdpa_kernels_agree_with_math(backend):
    math, _ = kernels_run("sdpa_math")
    other, _ = kernels_run(backend)
    assert_same(math, other, rtol=1e-4, atol=1e-5)


def test_unknown_attention_backend_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="train.attention_backend: 'sdpa_fast' is not one of"):
        load_config(None, ["train.attention_backend=sdpa_fast"])


# ------------------------------------------------------------------ fused projections

def matmuls_per_forward(model: LLaDAModel) -> int:
    with torch.profiler.profile() as prof, torch.no_grad():
        model(token_ids(LENGTHS[0]))
    return sum(e.name == "aten::mm" for e in prof.events())


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_fused_projections_give_the_same_loss_and_gradients_in_fewer_matmuls(mode):
    unfused = LLaDAModel(CFG, init_seed=0, activation_checkpointing=mode)
    fused = LLaDAModel(CFG, init_seed=0, activation_checkpointing=mode, fuse_projections=True)
    names = [n for n, _ in fused.named_parameters()]
    assert "model.transformer.blocks.0.qkv_proj.weight" in names
    assert not any(n.endswith((".q_proj.weight", ".up_proj.weight")) for n in names)
    for seq_len in LENGTHS:
        assert_same(loss_and_grads(unfused, seq_len), loss_and_grads(fused, seq_len))
    layers = CFG.n_layers  # q, k, v, attn_out, gate, up, ff_out per block, then the head
    assert matmuls_per_forward(unfused) == 7 * layers + 1
    assert matmuls_per_forward(fused) == 4 * layers + 1
    with pytest.raises(AssertionError):  # the comparison can fail
        assert_same(loss_and_grads(unfused, LENGTHS[0]), loss_and_grads(perturbed(fused), LENGTHS[0]))


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = token_ids(LENGTHS[1])
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0  # a left-padded row
    return ids, attention_mask


def cached_window_logits(model: LLaDAModel, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of positions 4..11 recomputed against a KV cache filled by a whole forward."""
    cache = KVCache()
    with torch.no_grad():
        model(ids, attention_mask=attention_mask, past_key_values=cache)
        return model(ids[:, 4:12], attention_mask=attention_mask, past_key_values=cache,
                     cache_position=torch.arange(4, 12))


def test_fused_model_writes_and_reads_the_released_tensors(tmp_path):
    fused = LLaDAModel(CFG, init_seed=0, fuse_projections=True)
    whole = full_state_dict(fused)
    assert list(whole) == list(expected_tensors(CFG))
    unfused_whole = full_state_dict(LLaDAModel(CFG, init_seed=0))
    assert all(torch.equal(whole[n], unfused_whole[n]) for n in whole)  # the same draws

    trained = LLaDAModel(CFG, init_seed=1)  # other weights, in the released format
    path = tmp_path / "model.safetensors"
    save_file(full_state_dict(trained), str(path))
    with torch.device("meta"):  # as pretrain.inference.loading builds it: to_empty re-creates every parameter
        loaded = LLaDAModel(CFG, init_seed=None, fuse_projections=True)
    loaded = loaded.to_empty(device="cpu")
    load_weights(loaded, read_header(path), str(path))
    ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected, got = trained(ids, attention_mask=attention_mask), loaded(ids, attention_mask=attention_mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached_window_logits(loaded, ids, attention_mask),
                               cached_window_logits(trained, ids, attention_mask), rtol=1e-5, atol=1e-5)

    # control: gate and up swapped in the file load without complaint and compute otherwise
    swapped = full_state_dict(trained)
    block = "model.transformer.blocks.0"
    swapped[f"{block}.ff_proj.weight"], swapped[f"{block}.up_proj.weight"] = (
        swapped[f"{block}.up_proj.weight"], swapped[f"{block}.ff_proj.weight"])
    save_file(swapped, str(path))
    load_weights(loaded, read_header(path), str(path))
    with torch.no_grad():
        assert (loaded(ids, attention_mask=attention_mask) - expected).abs().max() > 1e-3


# ------------------------------------------------------------------ the benchmark's reference

def load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_llama_attends_both_ways():
    model = load_benchmark().bidirectional_llama(CFG).eval()
    ids = torch.randint(0, 49, (1, 12), generator=torch.Generator().manual_seed(0))
    later = ids.clone()
    later[0, -1] = (ids[0, -1] + 1) % 49

    def first_position_change() -> float:
        with torch.no_grad():
            return (model(input_ids=ids).logits[0, 0] - model(input_ids=later).logits[0, 0]).abs().max().item()

    assert first_position_change() > 1e-3
    for layer in model.model.layers:  # transformers' own causal model: the negative control
        layer.self_attn.is_causal = True
    assert first_position_change() == 0.0

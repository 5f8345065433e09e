"""The FLOP convention, the device peak table and MFU (pretrain/runtime/flops.py).

MFU is only as honest as its numerator and denominator: the model FLOPs per token are pinned to
the literal the issue states for LLaDA 8B at 4096 (51.43 GFLOP, with the plausible wrong
conventions shown to give other literals), the executed FLOPs of a real forward and backward
are compared with torch's own FlopCounterMode for every activation-checkpointing mode and
for a chunked head (a meter that assumes the wrong mode is shown to disagree), and a device
without a known peak, a CPU included, gets MFU "unknown", never a guess.
"""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig, preset
from pretrain.diffusion.objectives import forward_process, next_token_targets
from pretrain.runtime.flops import (
    FlopMeter,
    device_peak,
    mfu,
    micro_batch_flops,
    model_flops_per_token,
    non_embedding_parameters,
    peak_tflops,
)

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                  vocab_size=50, max_sequence_length=32)
IDS = torch.randint(0, 49, (3, 16), generator=torch.Generator().manual_seed(0))
NOISE = forward_process(IDS, 49, generator=torch.Generator().manual_seed(1))


def test_llada_8b_costs_51_43_gflop_per_token_at_4096():
    config = preset("llada_8b")
    assert round(model_flops_per_token(config, 4096) / 1e9, 2) == 51.43
    assert non_embedding_parameters(config) == 7_497_584_640  # 8.02B minus the 0.52B embedding
    # the conventions this one is not: the head left out, the embedding counted, attention left out
    head = config.vocab_size * config.d_model
    attention = 12 * config.n_layers * config.d_model * 4096
    assert round((6 * (non_embedding_parameters(config) - head) + attention) / 1e9, 2) == 48.32
    assert round((6 * (non_embedding_parameters(config) + head) + attention) / 1e9, 2) == 54.54
    assert round(6 * non_embedding_parameters(config) / 1e9, 2) == 44.99
    assert round(model_flops_per_token(preset("llada_1b"), 4096) / 1e9, 2) == 9.58
    tied = dataclasses.replace(config, weight_tying=True)  # a tied head is still a head
    assert model_flops_per_token(tied, 4096) == model_flops_per_token(config, 4096)


def test_unknown_device_has_unknown_mfu():
    for name in ("cpu", "NVIDIA GeForce RTX 4090", "NVIDIA H100 NVL", "NVIDIA B200"):
        assert peak_tflops(name) is None, name
        assert mfu(123.0, peak_tflops(name)) is None
    assert peak_tflops("cpu", override=2.0) == 2.0
    assert mfu(1.0, peak_tflops("cpu", override=2.0)) == 0.5


@pytest.mark.parametrize("name, label, tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0), ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H800", "H800 SXM", 989.0), ("NVIDIA H800 PCIe", "H800 PCIe", 756.0),
    ("NVIDIA H200", "H200 SXM", 989.0), ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100-PCIE-40GB", "A100", 312.0), ("NVIDIA A100 80GB PCIe", "A100", 312.0),
])
def test_peak_table_reads_cuda_device_names(name, label, tflops):
    assert device_peak(name) == (label, tflops)
    assert peak_tflops(name, override=500.0) == 500.0  # the override wins


def counted_and_metered(config: ModelConfig, mode: str, chunk: int, meter_mode: str | None = None,
                        objective: str = "mdm") -> tuple[int, float]:
    """(FlopCounterMode's total, the meter's executed FLOPs) of one forward and backward."""
    model = LLaDAModel(config, attention_backend="sdpa_math", activation_checkpointing=mode,
                       loss_chunk_tokens=chunk)
    meter = FlopMeter(config, activation_checkpointing=meter_mode or mode,
                      loss_chunk_tokens=chunk).attach(model)
    with FlopCounterMode(display=False) as counter:
        if objective == "arm":  # positional targets and mask, as the training loop passes them
            ce = model(IDS, *next_token_targets(IDS))
        else:
            ce = model(NOISE.noisy, targets=IDS, loss_mask=NOISE.masked)
        ce.sum().backward()
    return counter.get_total_flops(), meter.take().executed


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
@pytest.mark.parametrize("chunk", [0, 7])
def test_executed_flops_equal_torch_flop_counter(mode, chunk):
    counted, executed = counted_and_metered(CFG, mode, chunk)
    assert executed == counted


@pytest.mark.parametrize("chunk", [0, 7])
def test_executed_flops_follow_zero3s_linear_under_full_checkpointing(chunk, monkeypatch):
    """DeepSpeed ZeRO-3 replaces torch.nn.functional.linear for the whole process; full
    checkpointing then recomputes each block to its end, and the meter counts that."""
    from parallel import engine as ds
    ds.import_deepspeed()
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    # torch's own linear first: a ZeRO-3 engine built earlier in this process has replaced it
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)
    plain = counted_and_metered(CFG, "full", chunk)
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    counted, executed = counted_and_metered(CFG, "full", chunk)
    assert executed == counted and counted > plain[0]


def test_causal_baseline_executed_flops_equal_torch_flop_counter():
    causal = dataclasses.replace(CFG, causal=True)
    counted, executed = counted_and_metered(causal, "full", 7, objective="arm")
    assert executed == counted


def test_meter_assuming_another_checkpointing_mode_disagrees_with_the_counter():
    counted, executed = counted_and_metered(CFG, "full", 0, meter_mode="none")
    assert executed != counted  # the comparison above can fail


def test_head_at_masked_positions_executes_fewer_flops_than_the_model_counts():
    scored = int(NOISE.masked.sum())
    assert 0 < scored < IDS.numel()
    flops = micro_batch_flops(CFG, *IDS.shape, scored, activation_checkpointing="none", loss_chunk_tokens=0)
    every = micro_batch_flops(CFG, *IDS.shape, IDS.numel(), activation_checkpointing="none",
                              loss_chunk_tokens=0)
    assert flops.model == every.model  # model FLOPs do not depend on the mask
    assert flops.executed < every.executed
    assert every.executed - flops.executed == 6 * CFG.d_model * CFG.vocab_size * (IDS.numel() - scored)


def test_meter_counts_training_forwards_only():
    model = LLaDAModel(CFG, attention_backend="sdpa_math")
    meter = FlopMeter(CFG, activation_checkpointing="none", loss_chunk_tokens=0).attach(model)
    with torch.no_grad():  # validation
        model(NOISE.noisy, targets=IDS, loss_mask=NOISE.masked)
    model(NOISE.noisy)  # logits only: sampling
    assert meter.take().executed == 0
    model(NOISE.noisy, targets=IDS, loss_mask=NOISE.masked)
    model(NOISE.noisy, targets=IDS, loss_mask=NOISE.masked)
    two = meter.take()
    one = micro_batch_flops(CFG, *IDS.shape, int(NOISE.masked.sum()), activation_checkpointing="none",
                            loss_chunk_tokens=0)
    assert (two.model, two.executed) == (2 * one.model, 2 * one.executed)
    assert meter.take().model == 0  # taken

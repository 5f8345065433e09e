"""The DeepSpeed engine trains the model it is given, whatever the stage and the accumulation.

At world size 1 on CPU (fp32): two optimizer steps of ZeRO-3 with 2 micro-batches of 2
accumulated must leave the same weights as ZeRO-0 with one batch of 4 (Algorithm 1 averages
over equal-length micro-batches, and DeepSpeed divides the loss by the accumulation count).
A negative control changes one micro-batch's masks and must move the weights past the
tolerance, so the comparison can fail. Also checks the engine config generated from the
run's parallel settings.
"""

import pytest
import torch

from data_pipeline.seeding import keyed_generator
from parallel import engine as ds
from parallel.engine_config import ParallelConfig, deepspeed_config
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig
from pretrain.diffusion.objectives import forward_process, pretrain_loss

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64,
                  vocab_size=64, max_sequence_length=16)
MASK_ID = 63
DATA = torch.randint(0, 63, (2, 4, 16), generator=keyed_generator(0, "data"))


def train(zero_stage: int, micro: int, perturb: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = LLaDAModel(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    accum = 4 // micro
    engine = ds.initialize(model, opt, deepspeed_config(
        ParallelConfig(zero_stage=zero_stage), micro_batch_size=micro, grad_accum_steps=accum,
        bf16=False, grad_clip=1.0))
    for step, batch in enumerate(DATA):
        # masks are drawn per row, so any split of the batch sees the same masks
        nb_full = forward_process(batch, MASK_ID, generator=keyed_generator(0, "noise", step))
        if perturb and step == 1:
            nb_full.masked[3] = ~nb_full.masked[3]
        for m in range(accum):
            rows = slice(m * micro, (m + 1) * micro)
            nb = type(nb_full)(noisy=torch.where(nb_full.masked[rows], MASK_ID, batch[rows]),
                               masked=nb_full.masked[rows], p_mask=nb_full.p_mask[rows])
            loss = pretrain_loss(engine(nb.noisy), batch[rows], nb)
            engine.backward(loss)
            engine.step()
    return {k: v.clone() for k, v in ds.full_state_dict(engine.module).items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_zero3_accumulation_matches_one_batch_and_control_fails():
    reference = train(zero_stage=0, micro=4)
    same, control = train(zero_stage=3, micro=2), train(zero_stage=3, micro=2, perturb=True)
    print(f"max weight difference: same run {max_diff(same, reference):.2e}, "
          f"control {max_diff(control, reference):.2e}")
    assert max_diff(same, reference) < 2e-5  # AdamW's g / sqrt(v) amplifies float summation order
    assert max_diff(control, reference) > 1e-3


def test_zero3_skips_a_step_whose_gradient_is_not_finite():
    """The trainer counts a step as skipped when the engine's gradient norm is not finite;
    this pins that ZeRO-3 then really leaves the weights untouched."""
    torch.manual_seed(0)
    model = LLaDAModel(CFG)
    engine = ds.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-2), deepspeed_config(
        ParallelConfig(zero_stage=3), micro_batch_size=4, grad_accum_steps=1, bf16=False,
        grad_clip=1.0))
    batch = DATA[0]
    before = ds.full_state_dict(engine.module)
    engine.backward(engine(batch).float().mean() * float("nan"))
    engine.step()
    assert not torch.isfinite(torch.as_tensor(engine.get_global_grad_norm()))
    assert max_diff(ds.full_state_dict(engine.module), before) == 0.0
    engine.backward(engine(batch).float().mean())
    engine.step()
    assert torch.isfinite(torch.as_tensor(engine.get_global_grad_norm()))
    assert max_diff(ds.full_state_dict(engine.module), before) > 0.0


@pytest.mark.parametrize("bf16", [False, True])
def test_engine_config_precision(bf16):
    cfg = deepspeed_config(ParallelConfig(), micro_batch_size=4, grad_accum_steps=8, bf16=bf16,
                           grad_clip=1.0)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["communication_data_type"] == "fp32"
    assert cfg["gradient_accumulation_steps"] == 8 and cfg["gradient_clipping"] == 1.0
    if bf16:
        assert cfg["bf16"] == {"enabled": True}
        assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    else:
        assert "bf16" not in cfg and "data_types" not in cfg


def test_precision_auto_is_fp32_on_cpu():
    assert ds.use_bf16("bf16") and not ds.use_bf16("fp32")
    assert ds.use_bf16("auto") == torch.cuda.is_available()


def test_engine_config_carries_zero3_settings_hpz_and_passthrough_keys():
    parallel = ParallelConfig(zero_stage=3, hpz_partition_size=8, prefetch_bucket_size=123,
                              communication_dtype="bf16",
                              deepspeed={"zero_optimization": {"stage3_max_reuse_distance": 7},
                                         "flops_profiler": {"enabled": True}})
    cfg = deepspeed_config(parallel, micro_batch_size=4, grad_accum_steps=1, bf16=True, grad_clip=1.0)
    zero = cfg["zero_optimization"]
    assert zero["zero_hpz_partition_size"] == 8 and zero["stage3_prefetch_bucket_size"] == 123
    assert zero["overlap_comm"] is True and zero["stage"] == 3
    assert zero["stage3_max_reuse_distance"] == 7  # passed-through key wins, siblings stay
    assert cfg["flops_profiler"] == {"enabled": True}
    assert cfg["communication_data_type"] == "bf16"
    stage1 = deepspeed_config(ParallelConfig(zero_stage=1), micro_batch_size=4, grad_accum_steps=1,
                              bf16=False, grad_clip=1.0)["zero_optimization"]
    assert not any(k.startswith("stage3") or k == "zero_hpz_partition_size" for k in stage1)

"""The per-GPU memory estimate against the model it describes and the 8B-on-80-GB layout.

The estimate is what a user reads before a multi-node launch, so its mistakes are expensive
either way: an undercount sends an 8B job out of memory, an overcount talks someone out of a
layout that fits. These tests pin the parameter count to the model module and the paper's
totals, the activation count to what autograd really saves for the model, the paper's layout
(ZeRO-3 over 64 ranks, 4 x 4096 tokens, full checkpointing, chunked loss) fitting 80 GiB and
its unchecked or unchunked variants not, the direction of every knob, and the argument checks.
Pipeline stages: each stage's parameters are the model's pieces it holds, and its activations
are those of the micro-batches the 1F1B schedule keeps in flight there.
"""

import dataclasses

import pytest
import torch

from parallel.memory_plan import (
    GiB,
    MemoryEstimate,
    estimate_memory,
    estimate_stages,
    parameter_count,
    stage_parameter_count,
)
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig, preset

GPU = 80 * GiB


def _layout(**overrides) -> dict:
    """The paper's 8B layout: ZeRO-3 over 64 data-parallel ranks, local batch 4 x 4096."""
    kw = dict(tensor_parallel=1, data_parallel=64, zero_stage=3, micro_batch_size=4,
              seq_len=4096, bf16=True, activation_checkpointing="full", loss_chunk_tokens=4096,
              prefetch_bucket_size=50_000_000, reduce_bucket_size=500_000_000)
    kw.update(overrides)
    return kw


def _estimate_8b(**overrides) -> MemoryEstimate:
    return estimate_memory(preset("llada_8b"), **_layout(**overrides))


def _states(e: MemoryEstimate) -> int:
    return e.params + e.gradients + e.optimizer


def test_parameter_count_matches_paper_and_model():
    assert parameter_count(preset("llada_8b")) == pytest.approx(8.02e9, rel=0.01)
    assert parameter_count(preset("llada_1b")) == pytest.approx(1.49e9, rel=0.02)
    for config in (preset("tiny"), dataclasses.replace(preset("tiny"), weight_tying=True)):
        model = LLaDAModel(config, init_seed=None)  # shapes only: skip the weight draw
        assert parameter_count(config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_activations_equal_what_autograd_saves(dtype):
    # GQA and an MLP width unlike d_model, so a swapped width or a missed tensor shows.
    config = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=96,
                         vocab_size=50, max_sequence_length=32)
    model = LLaDAModel(config, attention_backend="sdpa", init_seed=None).to(dtype)
    ids = torch.randint(0, config.vocab_size, (2, 32))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if t.is_floating_point() and ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    for table in model.blocks[0].rope.cos_sin(32, ids.device):  # constants, not activations
        saved.pop(table.untyped_storage().data_ptr())

    estimate = estimate_memory(config, tensor_parallel=1, data_parallel=1, zero_stage=0,
                               micro_batch_size=2, seq_len=32, bf16=dtype == torch.bfloat16,
                               activation_checkpointing="none", loss_chunk_tokens=0,
                               prefetch_bucket_size=0, reduce_bucket_size=0)
    assert estimate.activations == sum(saved.values())


def test_paper_8b_layout_fits_80gb_only_with_checkpointing():
    full = _estimate_8b()
    assert full.total < GPU and full.fits(GPU)
    none = _estimate_8b(activation_checkpointing="none")
    assert not none.fits(GPU)
    assert none.activations > GPU  # activations alone, not the other terms, break it


def test_unchunked_loss_head_is_the_problem_chunking_solves():
    whole = _estimate_8b(loss_chunk_tokens=0)
    assert whole.head > 6 * GiB  # 16k tokens x 126464 vocab in fp32, several copies
    assert _estimate_8b(loss_chunk_tokens=1024).head < 2 * GiB
    assert _estimate_8b().head * 4 == whole.head  # 4096 of 16384 tokens
    assert _estimate_8b(loss_chunk_tokens=1 << 20).head == whole.head  # a chunk past T is T


def test_8b_states_without_zero_partitioning_exceed_80gb():
    assert _states(_estimate_8b(data_parallel=1)) > GPU


@pytest.mark.parametrize("bf16, per_param", [(True, (2, 4, 12)), (False, (4, 4, 8))])
def test_model_states_bytes_per_parameter(bf16, per_param):
    # bf16: bf16 params, fp32 gradient accumulation, fp32 master + AdamW m, v; fp32: no master.
    e = _estimate_8b(zero_stage=0, data_parallel=1, bf16=bf16)
    n = parameter_count(preset("llada_8b"))
    assert (e.params, e.gradients, e.optimizer) == tuple(b * n for b in per_param)
    assert e.gathered_params == 0


def test_zero3_gathers_the_largest_module_and_buckets():
    config = preset("llada_8b")
    largest = config.vocab_size * config.d_model  # embedding / head, not a block's linear
    assert _estimate_8b().gathered_params == 2 * (largest + 50_000_000) + 4 * 500_000_000
    assert _estimate_8b(tensor_parallel=2).gathered_params == (
        2 * (largest // 2 + 50_000_000) + 4 * 500_000_000)


def test_zero_stages_partition_what_they_should():
    def split(stage: int) -> tuple[bool, bool, bool]:
        one, two = (_estimate_8b(zero_stage=stage, data_parallel=dp) for dp in (1, 2))
        return (two.params < one.params, two.gradients < one.gradients,
                two.optimizer < one.optimizer)

    assert split(0) == (False, False, False)
    assert split(1) == (False, False, True)
    assert split(2) == (False, True, True)
    assert split(3) == (True, True, True)
    assert _estimate_8b(zero_stage=2).gathered_params == 0
    hpz = _estimate_8b(hpz_partition_size=8)
    assert hpz.gathered_params > _estimate_8b().gathered_params


def test_knobs_move_memory_the_right_way():
    base = _estimate_8b()
    wider = _estimate_8b(data_parallel=128)
    for field in ("params", "gradients", "optimizer"):
        assert getattr(wider, field) < getattr(base, field), field
    assert _estimate_8b(tensor_parallel=2).optimizer == pytest.approx(base.optimizer / 2, rel=1e-6)
    acts = {mode: _estimate_8b(activation_checkpointing=mode).activations
            for mode in ("none", "selective", "full")}
    assert acts["full"] < acts["selective"] < acts["none"]


def test_table_lists_components_and_verdict():
    estimate = _estimate_8b()
    text = estimate.table(GPU)
    for name in ("params", "gradients", "optimizer", "gathered_params", "activations", "head",
                 "total"):
        assert name in text
    assert f"{estimate.total / GiB:.2f}" in text
    assert text.splitlines()[-1].startswith("fits 80.0 GiB: yes (headroom ")
    assert "NO (short by" in _estimate_8b(activation_checkpointing="none").table(GPU)
    assert "fits" not in estimate.table()


@pytest.mark.parametrize("argument, value", [("activation_checkpointing", "partial"),
                                             ("tensor_parallel", 0),
                                             ("tensor_parallel", 3),
                                             ("zero_stage", 4),
                                             ("loss_chunk_tokens", -1)])
def test_bad_arguments_name_themselves(argument, value):
    with pytest.raises(ValueError, match=argument):
        _estimate_8b(**{argument: value})


def test_pipeline_stages_hold_their_pieces_and_their_micro_batches_in_flight():
    config = preset("llada_8b")
    with torch.device("meta"):
        model = LLaDAModel(config, init_seed=None)
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    t = model.model.transformer
    block = numel(t.blocks[0])
    assert stage_parameter_count(config, 8, first=True, last=False) == numel(t.wte) + 8 * block
    assert stage_parameter_count(config, 8, first=False, last=True) == 8 * block + numel(t.ln_f) + numel(t.ff_out)
    for pp in (2, 3, 4):
        stages = estimate_stages(config, **_layout(zero_stage=1, pipeline_parallel=pp, grad_accum=8))
        assert sum(e.params for e in stages) == 2 * parameter_count(config)  # bf16: 2 B each

    one = _estimate_8b(zero_stage=1)
    tokens, d = 4 * 4096, config.d_model
    kept = tokens * 2 * d  # full checkpointing keeps each block's bf16 input per micro-batch
    first, *_, last = estimate_stages(config, **_layout(zero_stage=1, pipeline_parallel=4, grad_accum=8))
    # the last stage: 1 micro-batch of its 8 blocks in flight, the recompute working set, ln_f
    assert one.activations - last.activations == (32 - 8) * kept
    # the first: 4 micro-batches of its 8 blocks, no final norm (fp32 copy, rsqrt, two bf16 tensors)
    assert first.activations - last.activations == (4 - 1) * 8 * kept - tokens * (4 * d + 4 + 2 * 2 * d)
    assert (first.head, last.head) == (0, one.head)  # the head runs on the last stage only
    few = estimate_stages(config, **_layout(zero_stage=1, pipeline_parallel=4, grad_accum=2))[0]
    assert few.activations < first.activations  # only 2 micro-batches to keep in flight
    assert estimate_memory(config, **_layout(zero_stage=1, pipeline_parallel=4, grad_accum=8)) == max(
        estimate_stages(config, **_layout(zero_stage=1, pipeline_parallel=4, grad_accum=8)), key=lambda e: e.total)

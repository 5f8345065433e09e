"""The optimizer state under the released names, between engines of one process.

An engine trained two steps writes `optimizer.safetensors`; an engine of another ZeRO stage or
precision (ZeRO-3 bf16 -> ZeRO-1 bf16, ZeRO-0 fp32 -> ZeRO-3 fp32 with fused projections) loads
it, and gathering its state again gives every tensor back bit for bit, with the AdamW step; the
moments are real (nonzero). A model of another shape is refused with the tensors named.
"""

import pytest
import torch
from safetensors.torch import load_file
from support.training_runs import TINY

from pretrain.checkpoint.optimizer_state import OPTIMIZER_FILE, gather_optimizer_state, load_optimizer_state
from pretrain.checkpoint.store import CheckpointError
from pretrain.diffusion.objectives import pretrain_loss_from_ce
from pretrain.training.config import load_config
from pretrain.training.engine_setup import build_engine
from pretrain.training.layout import engine_config, resolve_layout
from pretrain.training.step_loss import draw_noise


def engine_of(*overrides: str):
    cfg = load_config(TINY, ["model.n_layers=1", *overrides])
    return build_engine(cfg, engine_config(cfg, resolve_layout(cfg, 1)))


def train_two_steps(engine) -> None:
    for step in range(2):
        ids = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(step))
        nb = draw_noise(ids, 1023, 0, step, 0)
        loss = pretrain_loss_from_ce(engine(nb.noisy, targets=ids, loss_mask=nb.masked), nb)
        engine.backward(loss)
        engine.step()


@pytest.mark.parametrize("saved, loaded", [
    (["parallel.zero_stage=3", "train.precision=bf16"], ["parallel.zero_stage=1", "train.precision=bf16"]),
    (["parallel.zero_stage=0", "train.precision=fp32"], ["parallel.zero_stage=3", "train.precision=fp32",
                                                         "fast.fuse_projections=true"]),
])
def test_state_moves_between_engines_bit_for_bit(tmp_path, saved, loaded):
    source = engine_of(*saved)
    train_two_steps(source)
    gathered = gather_optimizer_state(source)
    assert gathered.step == 2
    gathered.save(tmp_path)
    written = load_file(tmp_path / OPTIMIZER_FILE)
    assert all(written[k].abs().sum() > 0 for k in written if k.startswith(("exp_avg/", "exp_avg_sq/")))
    target = engine_of(*loaded)
    assert load_optimizer_state(target, tmp_path) == 2
    again = gather_optimizer_state(target)
    assert again.step == 2 and sorted(again.tensors) == sorted(written)
    assert all(torch.equal(again.tensors[k], written[k]) for k in written)
    # control: the fresh engine's own state differs
    fresh = gather_optimizer_state(engine_of(*loaded))
    assert fresh.step == 0 and not all(torch.equal(fresh.tensors[k], written[k]) for k in written)


def test_a_model_of_another_shape_is_refused_with_the_tensors_named(tmp_path):
    source = engine_of("parallel.zero_stage=0", "train.precision=fp32")
    train_two_steps(source)
    gathered = gather_optimizer_state(source)
    gathered.save(tmp_path)
    with pytest.raises(CheckpointError, match=r"does not fit the model being built: .*missing"):
        load_optimizer_state(engine_of("parallel.zero_stage=0", "train.precision=fp32", "model.n_layers=2"), tmp_path)

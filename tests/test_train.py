"""The training CLI end to end, the way the README's demo runs it, at a size CI can afford.

One real run of `python -m pretrain.train --config recipes/tiny.yaml` with a smaller model and
fewer steps (a DeepSpeed ZeRO-3 engine at world size 1, the BPE tokenizer trained on the
standard library, the corpus prepared as shards and streamed by 2 loader workers): held-out
loss falls by a clear margin, checkpoints publish completely with
`latest` naming the newest, the saved weights carry the released names, and the closing
sample contains no mask token. The run directory is shared by the tests of this module.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from data_pipeline.tokenizer import load_tokenizer
from parallel.model import LLaDAModel
from parallel.model_config import ModelConfig

STEPS = 40
OVERRIDES = [
    "model.n_layers=2", "model.vocab_size=500", "data.pad_vocab_to_multiple=64",
    "data.max_bytes=1500000", "data.heldout_fraction=0.1", f"train.steps={STEPS}", "train.micro_batch_size=8",
    "train.global_batch_size=16", "schedule.warmup_steps=5", "schedule.stable_tokens=30000",
    "schedule.mid_tokens=10000", "schedule.decay_tokens=5000", "validation.every=20",
    "validation.batches=2", "checkpoint.every=20", "logging.every=5", "logging.progress_bar=false",
    "sample.gen_length=16", "sample.steps=16", "sample.block_length=8",
    "validation.elbo_every=20", "validation.elbo_sequences=4", "validation.elbo_mc_num=8",
    "validation.elbo_batch_size=4",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, subprocess_env) -> Path:
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "--config", "recipes/tiny.yaml", *OVERRIDES,
         f"train.out_dir={out}"], capture_output=True, text=True, timeout=600, env=subprocess_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_heldout_loss_falls_clearly(run_dir):
    vals = [(r["step"], r["val/loss"]) for r in records(run_dir) if "val/loss" in r]
    assert [s for s, _ in vals] == [0, 20, 40]
    first, last = vals[0][1], vals[-1][1]
    assert last < first - 0.7, vals  # about 0.9 at this size; chance level is ln(512) = 6.2
    buckets = [k for k in records(run_dir)[0] if k.startswith("val/loss_t")]
    assert len(buckets) == 10


def test_algorithm_3_bound_is_logged_and_falls(run_dir):
    bound = [(r["step"], r["val/elbo_nll"]) for r in records(run_dir) if "val/elbo_nll" in r]
    assert [s for s, _ in bound] == [0, 20, 40]
    assert bound[-1][1] < bound[0][1] - 0.5, bound


def test_training_metrics_are_logged(run_dir):
    steps = [r for r in records(run_dir) if "loss" in r]  # every step: loss, grad norm, max logit
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["skipped_steps"] == 0 and r["grad_norm"] > 0 and r["max_logit"] > 0 for r in steps)
    train = [r for r in steps if "lr" in r]  # and every logging.every steps, the rest
    assert [r["data/train/tokens"] for r in train] == [r["tokens"] for r in train]
    assert [r["step"] for r in train] == list(range(5, STEPS + 1, 5))
    tokens = [r["tokens"] for r in train]
    assert tokens == sorted(tokens) and tokens[-1] <= STEPS * 16 * 64
    assert train[0]["lr"] > 0 and train[-1]["lr"] < train[2]["lr"]  # stepped down / decayed


def test_checkpoints_publish_complete(run_dir):
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step_00000040"
    assert not list(root.glob(".tmp-*"))
    for step in (20, 40):
        ckpt = root / f"step_{step:08d}"
        assert (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
        data_state = json.loads((ckpt / "data_state.json").read_text())
        assert data_state["steps"] == step and data_state["saved_layout"]["batch_size"] == 8
        assert (ckpt / "optimizer.safetensors").is_file()
        saved = yaml.safe_load((ckpt / "config.yaml").read_text())
        assert saved["train"]["steps"] == STEPS
    weights = load_file(str(root / "step_00000040" / "model.safetensors"))
    cfg = saved["model"]
    model = LLaDAModel(ModelConfig(**cfg), init_seed=None)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    assert "model.transformer.blocks.1.ff_out.weight" in weights
    # the 500-token BPE's vocabulary padded to a multiple of 64
    assert cfg["vocab_size"] == 512 and weights["model.transformer.wte.weight"].shape[0] == 512


def test_sample_has_no_mask_token(run_dir):
    sample = [r for r in records(run_dir) if "sample/ids" in r][-1]
    tok = load_tokenizer(run_dir / "data" / "tokenizer.json")
    assert 0 < len(sample["sample/ids"]) <= 16
    assert tok.mask_id not in sample["sample/ids"]
    prompt = yaml.safe_load(Path("recipes/tiny.yaml").read_text())["sample"]["prompt"]
    assert sample["sample/text"].startswith(prompt)
    assert f"sample (prompt {prompt!r})" in (run_dir / "stdout.txt").read_text()

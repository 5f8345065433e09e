"""The cluster recipes plan what the paper trained: `bash recipes/llada_8b.sh --dry-run` (the
shell half of the recipe, from another directory) prints the layout, a memory plan that fits an
80 GB GPU at the paper's 1280-sequence batch on 64 GPUs, and the DeepSpeed config; a layout that
cannot fit (one GPU holding all optimizer state) is reported as such with exit code 1."""

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def dry_run(recipe: str, world_size: int, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "recipes" / recipe), "--dry-run", "--world-size",
                           str(world_size)], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize("recipe", ["llada_8b.sh", "llada_1b.sh"])
def test_paper_layout_fits_80gb(recipe, tmp_path, subprocess_env):
    proc = dry_run(recipe, 64, tmp_path, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "world 64 = TP 1 x DP 64 | global batch 1280 = micro 4 x DP 64 x accumulation 5" in out
    assert "fits 80.0 GiB: yes" in out
    config = json.loads(out.split("deepspeed config:\n", 1)[1])
    assert config["zero_optimization"]["stage"] == 3
    assert config["bf16"] == {"enabled": True} and config["data_types"]["grad_accum_dtype"] == "fp32"
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 5


def test_8b_on_one_gpu_does_not_fit(tmp_path, subprocess_env):
    proc = dry_run("llada_8b.sh", 1, tmp_path, subprocess_env)
    assert proc.returncode == 1
    assert "fits 80.0 GiB: NO" in proc.stdout


@pytest.mark.parametrize("recipe", ["llada_8b_sft.sh", "llada_1b_sft.sh"])
def test_sft_recipes_plan_the_papers_sft_batch(recipe, tmp_path, subprocess_env):
    """The SFT recipes' shell half (recipes/sft_pipeline.sh) plans without importing anything:
    global batch 256 of local 2 over 64 GPUs; without --base/--data/--out it prints its usage."""
    conversations = tmp_path / "train.jsonl"
    conversations.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                             '{"role": "assistant", "content": "hello"}]}\n')
    script = str(REPO / "recipes" / recipe)
    proc = subprocess.run(["bash", script, "--base", str(tmp_path / "base"), "--data", str(conversations),
                           "--out", str(tmp_path / "run"), "--dry-run", "--world-size", "64"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=subprocess_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world 64 = TP 1 x DP 64 | global batch 256 = micro 2 x DP 64 x accumulation 2" in proc.stdout
    assert "fits 80.0 GiB: yes" in proc.stdout and not (tmp_path / "run" / "base").exists()
    usage = subprocess.run(["bash", script, "--data", str(conversations)], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60, env=subprocess_env)
    assert usage.returncode == 2 and usage.stderr.startswith(f"usage: bash {script} --base DIR")

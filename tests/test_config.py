"""The run config refuses bad input up front, with one line naming the field.

Covers YAML + override loading, the presets, and the validation the training CLI relies on
(an unknown key, heads not dividing d_model, a negative step count, a missing file), both as
`ConfigError` messages and as the CLI's non-zero exit. Every section checks itself (`problems()`,
reached by `load_config`); the sample section is the sampler's settings and checks.
"""

import subprocess
import sys

import pytest

from parallel.engine_config import ParallelConfig
from pretrain.diffusion.sampling import SamplerConfig
from pretrain.training.config import ConfigError, DataConfig, SampleConfig, TrainConfig, load_config
from pretrain.training.entry import main

TINY = "recipes/tiny.yaml"


def test_recipe_loads_and_overrides_apply():
    cfg = load_config(TINY, ["train.steps=7", "model.n_layers=2", "optim.betas=[0.8, 0.9]"])
    assert cfg.train.steps == 7
    assert cfg.model.n_layers == 2
    assert cfg.model.d_model == 128  # from the tiny preset
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.schedule.kind == "llada_pretrain"


def test_defaults_follow_the_paper():
    cfg = load_config(None, ["model.preset=llada_8b", "data.seq_len=4096"])
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.eps == 1e-8
    assert cfg.optim.weight_decay == 0.1
    assert cfg.schedule.peak_lr == 4e-4 and cfg.schedule.warmup_steps == 2000
    assert cfg.model.vocab_size == 126464 and cfg.model.n_layers == 32


@pytest.mark.parametrize("override, field", [
    ("train.stepz=3", "train.stepz"),
    ("model.n_heads=3", "model.n_heads"),
    ("train.steps=-1", "train.steps"),
    ("data.tokenizer=/no/such/tokenizer.json", "data.tokenizer"),
    ("data.paths=['/no/such/file.txt']", "data.paths"),
    ("train.micro_batch_size=3", "train.global_batch_size"),
    ("train.objective=arm", "model.causal"),
    ("model.preset=gpt5", "model.preset"),
    ("train.steps=ten", "train.steps"),
    ("sample.block_length=5", "sample.block_length"),
    ("schedule.kind=sft", "schedule.total_steps"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert str(err.value).startswith(field)


# One bad value per section, and the start of the line its own `problems()` gives.
SECTION_PROBLEMS = [
    ("model.n_heads=3", "model.n_heads: 3 does not divide model.d_model"),
    ("data.max_bytes=0", "data.max_bytes: must be positive, got 0"),
    ("optim.eps=0", "optim.grad_clip / optim.weight_decay must be >= 0 and optim.eps > 0"),
    ("schedule.lr_scale=0", "schedule.lr_scale: must be positive, got 0"),
    ("train.precision=fp16", "train.precision: 'fp16' is not auto, fp32 or bf16"),
    ("parallel.zero_stage=4", "parallel.zero_stage: 4 is not 0, 1, 2 or 3"),
    ("memory.gpu_memory_gib=0", "memory.gpu_memory_gib: must be positive"),
    ("validation.t_buckets=0", "validation.t_buckets: must be positive"),
    ("checkpoint.every=-1", "checkpoint.every: must be >= 0"),
    ("guard.spike_window=0", "guard.spike_window: must be >= 1, got 0"),
    ("logging.every=0", "logging.every: must be positive"),
    ("sample.temperature=-1", "sample.temperature"),
    ("profile.trace_steps=-1", "profile.trace_steps: must be >= 0, got -1"),
]


@pytest.mark.parametrize("override, line", SECTION_PROBLEMS)
def test_every_section_checks_itself_through_load_config(override, line):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert [problem for problem in str(err.value).splitlines() if problem.startswith(line)], str(err.value)


def test_all_sections_are_checked_in_one_pass():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override for override, _ in SECTION_PROBLEMS])
    problems = str(err.value).splitlines()
    for _, line in SECTION_PROBLEMS:
        assert sum(problem.startswith(line) for problem in problems) == 1, (line, problems)


def test_sections_check_themselves_without_the_run():
    assert DataConfig(paths=["/no/such/file.txt"]).problems(check_paths=False) == []
    assert DataConfig(paths=["/no/such/file.txt"]).problems() == [
        "data.paths: no such file or directory '/no/such/file.txt'"]
    assert TrainConfig(init_from="/no/such/dir").problems(check_paths=False) == []
    assert "set parallel.zero_stage: 1" in ParallelConfig(pipeline_parallel=2).problems()[0]
    assert ParallelConfig(tensor_parallel=3).problems() == []  # the model's split is the run's check


def test_the_sample_section_is_the_sampler_s_settings():
    cfg = load_config(TINY, ["sample.gen_length=32", "sample.steps=16", "sample.block_length=8"])
    sampler = cfg.sample.sampler()
    assert isinstance(sampler, SamplerConfig)
    assert (sampler.gen_length, sampler.steps, sampler.block_length, sampler.temperature) == (32, 16, 8, 1.0)
    assert sampler.problems() == []
    assert cfg.sample.problems() == []
    bad = SampleConfig(gen_length=8, block_length=4, steps=3)
    assert bad.problems() == [f"sample.{line}" for line in bad.sampler().problems()]
    assert bad.problems()[0].startswith("sample.steps 3 must be a multiple of the number of blocks 2")


SFT = ["train.objective=sft", "data.source=sft", "data.paths=[recipes/tiny.yaml]",
       "data.tokenizer=recipes/tiny.yaml", "validation.every=0"]


@pytest.mark.parametrize("overrides, field", [
    (["train.objective=sft"], "train.objective / data.source"),
    (["data.source=sft", "data.paths=[recipes/tiny.yaml]"], "train.objective / data.source"),
    ([*SFT, "validation.every=50"], "validation.every"),
    ([*SFT, "data.tokenizer=null"], "data.tokenizer"),
    ([*SFT, "validation.elbo_every=10"], "data.validation_path"),
    ([*SFT, "data.validation_path=/no/such.jsonl"], "data.validation_path"),
    ([*SFT, "data.sft_pairs=some"], "data.sft_pairs"),
    (["train.epochs=3"], "train.epochs"),
])
def test_bad_sft_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert field in str(err.value)


def test_sft_epochs_stand_in_for_the_schedule_length():
    cfg = load_config("recipes/llada_8b_sft.yaml", ["data.paths=[recipes/tiny.yaml]",
                                                    "data.tokenizer=recipes/tiny.yaml",
                                                    "data.validation_path=recipes/tiny.yaml"])
    assert (cfg.train.epochs, cfg.schedule.kind, cfg.schedule.total_steps) == (3, "sft", 0)
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.schedule.peak_lr) == (256, 2, 2.5e-5)
    with pytest.raises(ConfigError, match="schedule.total_steps"):
        load_config("recipes/llada_8b_sft.yaml", ["data.paths=[recipes/tiny.yaml]", "train.epochs=0",
                                                  "data.tokenizer=recipes/tiny.yaml", "validation.elbo_every=0"])


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_config("recipes/none.yaml")


def test_cli_exits_nonzero_with_one_line(capsys):
    assert main(["--config", TINY, "model.n_heads=3", "model.n_kv_heads=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["config error: model.n_heads: 3 does not divide model.d_model 128; "
                   "pick a head count that divides it"]


def test_cli_process_exit_code(subprocess_env):
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", TINY, "train.foo=1"],
                          capture_output=True, text=True, timeout=120, env=subprocess_env)
    assert proc.returncode == 2
    assert "train.foo: unknown key" in proc.stderr

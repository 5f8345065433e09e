"""The one typed run config: YAML in, `section.field=value` overrides on top, validated up front.

A run is described by a single `RunConfig` (model, data, optimizer and schedule, parallelism,
validation, checkpointing, logging, sampling). Loading refuses unknown keys, wrong types and
inconsistent values before anything is built, with one line per problem that names the field
and the fix; the CLI turns that into a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_pipeline.sft import OVERLONG_MODES, PAIR_MODES
from parallel.attention import ATTENTION_BACKENDS
from parallel.engine_config import ParallelConfig
from parallel.memory_plan import CHECKPOINTING
from parallel.model_config import ModelConfig, preset
from pretrain.diffusion.sampling import SamplerConfig
from pretrain.runtime.guard_rails import GuardConfig
from pretrain.runtime.throughput import FastConfig, ProfileConfig
from pretrain.runtime.trackers import MlflowConfig, WandbConfig
from pretrain.training.schedule import ScheduleConfig
from pretrain.training.typed_yaml import ConfigError, apply_mapping, parse_override

OBJECTIVES = ("mdm", "arm", "sft")


@dataclass
class DataSource:
    """A directory prepared by `python -m data_pipeline.prepare`, drawn with `weight`."""
    path: str = ""
    weight: float = 1.0
    name: str | None = None  # default: the directory's name


@dataclass
class DataConfig:
    # "shards": prepared `sources`; "stdlib" (the embedded corpus: this interpreter's standard
    # library) and "files" (`paths`) are prepared into the run directory at start; "sft":
    # conversations, `paths` being JSONL files of {"messages": [...]} (train.objective sft).
    source: str = "stdlib"
    sources: list[DataSource] = field(default_factory=list)
    # A prepared directory of held-out data ("shards"; stdlib and files hold out a share of
    # files), or a JSONL file of held-out conversations ("sft").
    validation_path: str | None = None
    paths: list[str] = field(default_factory=list)
    max_bytes: int = 6_000_000
    heldout_fraction: float = 0.02
    # A tokenizer.json; null trains a byte-level BPE of model.vocab_size on the corpus.
    tokenizer: str | None = None
    # > 0: model.vocab_size becomes the tokenizer's size rounded up to this multiple (what
    # tensor-parallel embedding splits need); 0: model.vocab_size as configured.
    pad_vocab_to_multiple: int = 0
    seq_len: int = 256
    num_workers: int = 2
    # The paper's 1%: a micro-batch cut to a length drawn from U[1, seq_len]; "carry" keeps the
    # cut tokens for the next batch, "discard" drops them as the reference code does.
    variable_length_prob: float = 0.01
    variable_length_mode: str = "carry"
    # "sft": the pairs of a multi-turn dialogue trained per epoch ("one" drawn at random, the
    # paper's choice, or "all"); a response too long for seq_len is cut ("truncate") or its pair
    # left out ("drop"); rows are EOS-padded to the micro-batch's longest row (the reference) or,
    # with sft_pad_to_seq_len, to seq_len.
    sft_pairs: str = "one"
    sft_overlong: str = "truncate"
    sft_pad_to_seq_len: bool = False

    def problems(self, check_paths: bool = True) -> list[str]:
        """One 'data.<field>: ...' line per invalid value; check_paths: the files named exist."""
        out = []
        if self.source not in ("stdlib", "files", "shards", "sft"):
            out.append(f"data.source: {self.source!r} is not 'stdlib', 'files', 'shards' or 'sft'")
        if self.source in ("files", "sft") and not self.paths:
            out.append(f"data.paths: data.source is {self.source!r} but no paths are given")
        for p in self.paths if check_paths else ():
            if not Path(p).exists():
                out.append(f"data.paths: no such file or directory {p!r}")
        if self.source == "shards":
            if not self.sources:
                out.append("data.sources: data.source is 'shards' but no sources are given; list "
                           "prepared directories as {path: DIR, weight: W}")
            if self.tokenizer is None:
                out.append("data.tokenizer: prepared shards need the tokenizer.json they were prepared with")
        for i, src in enumerate(self.sources):
            if check_paths and not Path(src.path, "manifest.json").is_file():
                out.append(f"data.sources[{i}].path: no manifest.json in {src.path!r}; prepare it with "
                           f"`python -m data_pipeline.prepare`")
            if src.weight <= 0:
                out.append(f"data.sources[{i}].weight: must be positive, got {src.weight}")
        names = [src.name or Path(src.path).name for src in self.sources]
        if len(set(names)) != len(names):
            out.append(f"data.sources: names {names} repeat; give each source a distinct name")
        if check_paths and self.validation_path is not None:
            if self.source != "sft" and not Path(self.validation_path, "manifest.json").is_file():
                out.append(f"data.validation_path: no manifest.json in {self.validation_path!r}")
            if self.source == "sft" and not Path(self.validation_path).is_file():
                out.append(f"data.validation_path: no such JSONL file {self.validation_path!r}")
        if self.pad_vocab_to_multiple < 0:
            out.append(f"data.pad_vocab_to_multiple: must be >= 0, got {self.pad_vocab_to_multiple}")
        if self.num_workers < 0:
            out.append(f"data.num_workers: must be >= 0, got {self.num_workers}")
        if self.variable_length_mode not in ("carry", "discard"):
            out.append(f"data.variable_length_mode: {self.variable_length_mode!r} is not 'carry' or 'discard'")
        if check_paths and self.tokenizer is not None and not Path(self.tokenizer).is_file():
            out.append(f"data.tokenizer: no such file {self.tokenizer!r}; give a tokenizer.json or null to train one")
        if self.source == "sft" and self.tokenizer is None:
            out.append("data.tokenizer: SFT needs the base model's tokenizer.json (the one "
                       "`python -m pretrain.import_hf` writes beside the weights)")
        if not 0 < self.heldout_fraction < 1:
            out.append(f"data.heldout_fraction: {self.heldout_fraction} must lie in (0, 1)")
        if not 0 <= self.variable_length_prob <= 1:
            out.append(f"data.variable_length_prob: {self.variable_length_prob} must lie in [0, 1]")
        if self.max_bytes <= 0:
            out.append(f"data.max_bytes: must be positive, got {self.max_bytes}")
        if self.sft_pairs not in PAIR_MODES:
            out.append(f"data.sft_pairs: {self.sft_pairs!r} is not one of {', '.join(PAIR_MODES)}")
        if self.sft_overlong not in OVERLONG_MODES:
            out.append(f"data.sft_overlong: {self.sft_overlong!r} is not one of {', '.join(OVERLONG_MODES)}")
        return out


@dataclass
class OptimConfig:
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def problems(self) -> list[str]:
        out = []
        lo, hi = self.betas
        if not (0 <= lo < 1 and 0 <= hi < 1):
            out.append(f"optim.betas: {self.betas} must lie in [0, 1)")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.eps <= 0:
            out.append("optim.grad_clip / optim.weight_decay must be >= 0 and optim.eps > 0")
        return out


@dataclass
class TrainConfig:
    # "mdm": masked diffusion (Algorithm 1); "arm": the autoregressive baseline; "sft": supervised
    # fine-tuning on conversations (Algorithm 2; data.source sft).
    objective: str = "mdm"
    steps: int = 100
    # SFT: > 0 sets train.steps (and schedule.total_steps) to this many passes over the
    # conversations, counted from the first epoch's plan; 0 trains train.steps.
    epochs: int = 0
    micro_batch_size: int = 4
    global_batch_size: int = 4
    seed: int = 1234
    # "auto": bf16 on GPU, fp32 on CPU.
    precision: str = "auto"
    attention_backend: str = "auto"
    out_dir: str = "runs/tiny"
    # Start from these weights instead of the seeded init: a checkpoint step directory or a
    # `pretrain.import_hf` output. Step count, optimizer and data start afresh; a resume wins.
    init_from: str | None = None

    def problems(self, check_paths: bool = True) -> list[str]:
        """One 'train.<field>: ...' line per invalid value; check_paths: init_from holds weights."""
        out = []
        if self.objective not in OBJECTIVES:
            out.append(f"train.objective: {self.objective!r} is not 'mdm', 'arm' or 'sft'")
        if self.epochs < 0 or (self.epochs and self.objective != "sft"):
            out.append(f"train.epochs: {self.epochs}; passes over the conversations are for "
                       f"train.objective sft (>= 1), 0 trains train.steps")
        for name in ("steps", "micro_batch_size", "global_batch_size"):
            if getattr(self, name) <= 0:
                out.append(f"train.{name}: must be positive, got {getattr(self, name)}")
        if self.micro_batch_size > 0 and self.global_batch_size % self.micro_batch_size:
            out.append(f"train.global_batch_size: {self.global_batch_size} is not a multiple of "
                       f"train.micro_batch_size {self.micro_batch_size}")
        if self.precision not in ("auto", "fp32", "bf16"):
            out.append(f"train.precision: {self.precision!r} is not auto, fp32 or bf16")
        if self.attention_backend not in ATTENTION_BACKENDS:
            out.append(f"train.attention_backend: {self.attention_backend!r} is not one of "
                       f"{', '.join(ATTENTION_BACKENDS)}")
        if check_paths and self.init_from and not Path(self.init_from, "model.safetensors").is_file():
            out.append(f"train.init_from: no model.safetensors in {self.init_from!r}; give a checkpoint "
                       f"step directory or a directory written by `python -m pretrain.import_hf`")
        return out


@dataclass
class MemoryConfig:
    """The memory plan: activation checkpointing, the chunked LM head, the device budget."""
    # "none", "full" (keep each block's input only) or "selective" (keep matmul/attention outputs).
    activation_checkpointing: str = "none"
    # Positions per LM-head / cross-entropy chunk; 0 runs the whole micro-batch at once.
    loss_chunk_tokens: int = 0
    # The device memory the launch-time estimate is checked against.
    gpu_memory_gib: float = 80.0

    def problems(self) -> list[str]:
        out = []
        if self.activation_checkpointing not in CHECKPOINTING:
            out.append(f"memory.activation_checkpointing: {self.activation_checkpointing!r} is not one of "
                       f"{', '.join(CHECKPOINTING)}")
        if self.loss_chunk_tokens < 0:
            out.append("memory.loss_chunk_tokens: must be >= 0 (0 runs the whole micro-batch at once)")
        if self.gpu_memory_gib <= 0:
            out.append("memory.gpu_memory_gib: must be positive")
        return out


@dataclass
class ValidationConfig:
    every: int = 50
    batches: int = 4
    batch_size: int = 8
    # t at the centres of `t_buckets` equal buckets of [0, 1]: a fixed grid, with fixed masks.
    t_buckets: int = 10
    seed: int = 0
    # The Algorithm 3 bound (empty prompt, each held-out row the answer) on the first
    # `elbo_sequences` held-out rows, every `elbo_every` steps (0: off), spread over the
    # data-parallel ranks; logged as val/elbo_nll (nats per token).
    elbo_every: int = 0
    elbo_sequences: int = 16
    elbo_mc_num: int = 32
    elbo_batch_size: int = 8

    def problems(self) -> list[str]:
        out = []
        for name in ("every", "elbo_every", "batches", "batch_size", "t_buckets", "elbo_sequences",
                     "elbo_mc_num", "elbo_batch_size"):
            if getattr(self, name) < (0 if name.endswith("every") else 1):
                out.append(f"validation.{name}: must be {'>= 0' if name.endswith('every') else 'positive'}")
        if self.elbo_every and self.elbo_mc_num % max(self.elbo_batch_size, 1):
            out.append(f"validation.elbo_mc_num: {self.elbo_mc_num} is not a multiple of "
                       f"validation.elbo_batch_size {self.elbo_batch_size}")
        return out


@dataclass
class CheckpointConfig:
    every: int = 0            # 0: only at the end
    dir: str | None = None    # default: <out_dir>/checkpoints
    keep_last: int = 3        # the newest N are kept (0: keep all) ...
    keep_every: int = 0       # ... and every step divisible by this (0: none)
    # false: no checkpoint (and so no closing sample) after the last step: profiling runs
    save_at_end: bool = True
    # Every N-th save (and every save at the end or on preemption) also writes the optimizer state
    # whole under the released names (`optimizer.safetensors`, 12 bytes per parameter), which a
    # resume in another layout needs; 0: never (such a resume is then refused).
    layout_free_every: int = 1
    # true: a resume in another layout from a checkpoint without that state loads the weights,
    # step and data position and restarts the optimizer (said in the log); false: refused.
    resume_without_optimizer: bool = False

    def problems(self) -> list[str]:
        out = []
        if self.every < 0:
            out.append("checkpoint.every: must be >= 0 (0 saves only at the end)")
        if self.layout_free_every < 0:
            out.append("checkpoint.layout_free_every: must be >= 0 (0: never write the layout-free optimizer state)")
        if self.keep_last < 0 or self.keep_every < 0:
            out.append("checkpoint.keep_last / checkpoint.keep_every: must be >= 0")
        return out


@dataclass
class LoggingConfig:
    every: int = 10
    jsonl: bool = True
    tensorboard: bool = True
    progress_bar: bool = True
    # Every rank tees its stdout and stderr into <out_dir>/logs/rank_XXXXX.log.
    per_rank_logs: bool = False
    # A warning names the slowest rank when its step time exceeds this many times the median
    # rank's (0: no warning; the straggler/* metrics are logged either way).
    straggler_factor: float = 1.5
    # Experiment trackers beside metrics.jsonl and TensorBoard (null: off), optional extras:
    # `wandb: {project, entity, name, mode}` (pip install -e .[wandb]) and
    # `mlflow: {tracking_uri, experiment}` (pip install -e .[mlflow]). A resume continues the
    # same tracker run (its id is kept in the checkpoint).
    wandb: WandbConfig | None = None
    mlflow: MlflowConfig | None = None

    def problems(self, check_packages: bool = True) -> list[str]:
        """check_packages: a configured tracker's package is installed."""
        out = []
        if self.every <= 0:
            out.append("logging.every: must be positive")
        if self.straggler_factor != 0 and not self.straggler_factor > 1:
            out.append(f"logging.straggler_factor: must be 0 (no warning) or > 1, got {self.straggler_factor}")
        for tracker in (self.wandb, self.mlflow):
            if tracker is not None:
                out += tracker.problems(check_packages)
        return out


@dataclass
class SampleConfig:
    """The closing sample: `prompt`, decoded by the sampler with these settings (the rest of
    `SamplerConfig` at its defaults), which also checks them."""
    prompt: str = "def "
    gen_length: int = 48
    steps: int = 48
    block_length: int = 48
    temperature: float = 0.0

    def sampler(self) -> SamplerConfig:
        return SamplerConfig(steps=self.steps, gen_length=self.gen_length, block_length=self.block_length,
                             temperature=self.temperature)

    def problems(self) -> list[str]:
        # the sampler's lines start with the field they name: 'block_length 5 must divide ...'
        return [f"sample.{line}" for line in self.sampler().problems()]


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | os.PathLike | None, overrides: list[str] = (),
                check_paths: bool = True) -> RunConfig:
    """Build and validate a RunConfig from a YAML file (or defaults) and overrides.

    check_paths=False skips the checks that data and tokenizer files exist and that configured
    trackers' packages are installed (a --dry-run plans a cluster launch on a machine that need
    not hold the data)."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file {str(p)!r}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {p}: not valid YAML ({e})".replace("\n", " ")) from e
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {p}: expected a mapping of sections at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value

    cfg = RunConfig()
    model_raw = dict(raw.pop("model", None) or {})
    preset_name = model_raw.pop("preset", "tiny")
    try:
        cfg.model = preset(preset_name)
    except KeyError as e:
        raise ConfigError(f"model.preset: {e.args[0]}") from None
    apply_mapping(cfg.model, model_raw, "model.")
    apply_mapping(cfg, raw, "")
    problems = config_problems(cfg, check_paths)
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


# ---------------------------------------------------------------- config problems

def config_problems(cfg: RunConfig, check_paths: bool = True) -> list[str]:
    """Every problem with the config, one line each naming the field and the fix: each section's
    own (`problems()`), then the checks that span sections."""
    t, d, v = cfg.train, cfg.data, cfg.validation
    out = [*cfg.model.problems(), *cfg.schedule.problems(total_steps_from_run=t.epochs > 0),
           *t.problems(check_paths), *d.problems(check_paths), *cfg.logging.problems(check_paths)]
    for section in (cfg.optim, cfg.memory, v, cfg.checkpoint, cfg.guard, cfg.sample, cfg.profile):
        out += section.problems()
    if t.objective in OBJECTIVES and cfg.model.causal != (t.objective == "arm"):
        out.append(f"model.causal: is {cfg.model.causal} but train.objective is {t.objective!r}; "
                   f"the AR baseline ('arm') needs a causal model and the MDM a bidirectional one")
    out += sft_problems(cfg) + parallel_problems(cfg)
    if d.seq_len <= 0 or d.seq_len > cfg.model.max_sequence_length:
        out.append(f"data.seq_len: {d.seq_len} must lie in [1, model.max_sequence_length "
                   f"{cfg.model.max_sequence_length}]")
    if d.source == "shards" and (v.every or v.elbo_every) and d.validation_path is None:
        out.append("data.validation_path: validation needs a prepared held-out directory "
                   "(or set validation.every=0 and validation.elbo_every=0)")
    if v.elbo_every and t.objective == "arm":
        out.append("validation.elbo_every: the Algorithm 3 bound scores the masked diffusion model; "
                   "set it to 0 for train.objective=arm")
    if v.elbo_every and d.source != "sft" and v.elbo_sequences > v.batches * v.batch_size:
        out.append(f"validation.elbo_sequences: {v.elbo_sequences} exceeds the held-out rows, "
                   f"validation.batches x validation.batch_size = {v.batches * v.batch_size}")
    if cfg.memory.activation_checkpointing == "selective" and cfg.parallel.zero_stage == 3:
        out.append("memory.activation_checkpointing: 'selective' (torch's selective checkpointing) "
                   "cannot replay the tensor operations ZeRO-3 runs inside each block to gather "
                   "parameters; use 'full' with parallel.zero_stage 3, or 'selective' with parallel.zero_stage <= 2")
    return out


def sft_problems(cfg: RunConfig) -> list[str]:
    """Problems of a supervised fine-tuning config (or of SFT settings in another run) that span
    sections; the data and train sections check their SFT fields themselves."""
    t, d, v = cfg.train, cfg.data, cfg.validation
    out = []
    if (t.objective == "sft") != (d.source == "sft"):
        out.append(f"train.objective / data.source: {t.objective!r} / {d.source!r}; supervised "
                   f"fine-tuning (Algorithm 2) trains on conversations: set both to 'sft', or neither")
    if d.source != "sft":
        return out
    if v.every:
        out.append("validation.every: the fixed-t held-out loss is for pretraining data; SFT "
                   "validates with the Algorithm 3 bound on held-out answers (validation.elbo_every "
                   "and data.validation_path): set validation.every=0")
    if v.elbo_every and d.validation_path is None:
        out.append("data.validation_path: validation.elbo_every scores held-out answers; give a "
                   "JSONL file of held-out conversations (or set validation.elbo_every=0)")
    return out


def parallel_problems(cfg: RunConfig) -> list[str]:
    """Problems with the parallel layout that do not depend on the world size: the parallel
    section's own, then the model, data and run against it."""
    p, m = cfg.parallel, cfg.model
    out = p.problems()
    tp = p.tensor_parallel
    if p.pipeline_parallel > 1:
        out += pipeline_problems(cfg)
    if tp < 1:
        return out
    if m.weight_tying and p.zero_stage == 3:
        out.append("model.weight_tying: the tied head reads the embedding's weight outside its "
                   "module, which ZeRO-3 keeps partitioned; use parallel.zero_stage <= 2")
    if tp == 1:
        return out
    split = {"n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads, "mlp_hidden_size": m.mlp_hidden_size}
    fitting = [k for k in range(1, 65) if all(v % k == 0 for v in split.values())]
    for field_name, value in split.items():
        if value % tp:
            out.append(f"model.{field_name}: {value} is not divisible by parallel.tensor_parallel "
                       f"{tp}; tensor parallelism splits it evenly: this model allows TP in {fitting}")
    if cfg.data.pad_vocab_to_multiple:
        if cfg.data.pad_vocab_to_multiple % tp:
            out.append(f"data.pad_vocab_to_multiple: {cfg.data.pad_vocab_to_multiple} is not a "
                       f"multiple of parallel.tensor_parallel {tp}; the vocabulary-parallel "
                       f"embedding and head need a vocabulary divisible by TP")
    elif m.vocab_size % tp:
        out.append(f"model.vocab_size: {m.vocab_size} is not divisible by parallel.tensor_parallel "
                   f"{tp}; pad it (data.pad_vocab_to_multiple: {128 * tp}) or change TP")
    if m.weight_tying:
        out.append("model.weight_tying: tied embeddings are supported at tensor_parallel 1 only")
    return out


def pipeline_problems(cfg: RunConfig) -> list[str]:
    """Problems of a pipeline-parallel run (DeepSpeed's PipelineEngine) that span sections (its
    ZeRO stage the parallel section checks). Blocks that the stages do not divide are balanced
    (the first stages take one more) and the plan is printed."""
    pp, n = cfg.parallel.pipeline_parallel, cfg.model.n_layers
    out = []
    if n < pp:
        out.append(f"parallel.pipeline_parallel: {pp} stages for model.n_layers {n}; every stage "
                   f"needs at least one block: use at most {n} stages")
    if cfg.model.weight_tying:
        out.append("model.weight_tying: a pipeline keeps the embedding and the head on different "
                   "stages; tied weights need parallel.pipeline_parallel 1")
    if cfg.train.objective != "mdm":
        out.append(f"train.objective: {cfg.train.objective!r} with parallel.pipeline_parallel {pp}; "
                   f"the pipeline trains the masked diffusion objective (mdm) only")
    if cfg.guard.inject_nan_at_steps:
        out.append("guard.inject_nan_at_steps: NaN injection is not wired into the pipeline's loss; "
                   "leave it empty with parallel.pipeline_parallel > 1")
    return out


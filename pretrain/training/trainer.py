"""The steps of one training run on this rank, each a method of `Trainer`.

`pretrain.training.loop.train` reads as the run's table of contents (restore, then per
optimizer step: step, log, validate, checkpoint; then the closing sample); this module holds
what each of those entries does, over the run's engine, data, objective
(`pretrain.training.objective`) and resumable state (`pretrain.training.state.TrainState`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from parallel import engine as ds
from parallel.memory_plan import parameter_count
from parallel.topology import coordinates
from pretrain.checkpoint.optimizer_state import OPTIMIZER_FILE, gather_optimizer_state, load_optimizer_state
from pretrain.checkpoint.store import (
    DATA_STATE,
    CheckpointError,
    find_resume,
    load_full_state,
    read_data_state,
    read_rank_state,
    save_checkpoint,
    set_rng_state,
)
from pretrain.runtime.flops import FlopMeter
from pretrain.runtime.guard_rails import GuardRails, HangWatchdog
from pretrain.runtime.metrics import MetricsLogger
from pretrain.runtime.preemption import PreemptionFlag
from pretrain.runtime.stragglers import StragglerMonitor
from pretrain.runtime.throughput import StepProfiler
from pretrain.runtime.trackers import open_trackers
from pretrain.training.config import ConfigError, RunConfig
from pretrain.training.data_setup import build_training_data
from pretrain.training.engine_setup import build_engine, init_from_weights
from pretrain.training.heldout import heldout_elbo
from pretrain.training.layout import Layout, deepspeed_config_text, engine_config, launch_report, memory_estimates
from pretrain.training.objective import objective_for
from pretrain.training.resume_plan import resume_plan
from pretrain.training.schedule import lr_at
from pretrain.training.state import TrainState
from pretrain.training.step_loss import first_global_row, pipeline_step


def source_metrics(counters: dict[str, dict[str, int]], ranks_per_replica: int) -> dict[str, float]:
    """Per-source tokens summed over data-parallel ranks (the tensor- and pipeline-parallel
    ranks of a replica read the same data: counted once), and each source's epoch on this rank."""
    names = sorted(counters)
    totals = ds.all_reduce([counters[n]["tokens"] for n in names])
    out = {f"data/{n}/tokens": t / ranks_per_replica for n, t in zip(names, totals)}
    out.update({f"data/{n}/epoch": counters[n]["epoch"] for n in names})
    return out


def resume_point(root: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from, as rank 0 sees it (every rank checks the argument, so a bad
    one fails everywhere instead of leaving ranks waiting)."""
    if not resume:
        return None
    choice = [str(find_resume(root, resume) or "")]
    torch.distributed.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def steps_for_epochs(cfg: RunConfig, stream, layout: Layout) -> int:
    """Optimizer steps in `train.epochs` passes over the SFT conversations (epoch 0's plan)."""
    micro_batches, _ = stream.first_epoch
    steps = cfg.train.epochs * micro_batches // layout.grad_accum
    if steps < 1:
        raise ConfigError(f"train.epochs: {cfg.train.epochs} epoch(s) of {micro_batches} "
                          f"micro-batches per rank make no optimizer step of {layout.grad_accum} "
                          f"micro-batches; give more conversations or a smaller train.global_batch_size")
    return steps


@dataclass
class StepOutcome:
    """One optimizer step's numbers, the same on every rank (summed over replicas)."""
    loss: float
    grad_norm: float | None
    max_logit: float
    lr: float
    tokens: float
    seconds: float
    preempted: bool
    halt: str | None  # the guard rails' message when they stop the run


class Trainer:
    """One run on this rank, in the steps `train` takes: `restore` builds the engine and continues
    a checkpoint, `step` runs one optimizer step, `log_step` records it, `validate` /
    `validate_elbo` score the held-out data, `checkpoint` saves, `closing_sample` samples."""

    def __init__(self, cfg: RunConfig, layout: Layout, rank: int, preemption: PreemptionFlag,
                 watchdog: HangWatchdog):
        self.cfg, self.layout, self.rank = cfg, layout, rank
        self.preemption, self.watchdog = preemption, watchdog
        grid = coordinates(rank, layout.world_size, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
        self.dp_rank, self.dp_size = grid.dp_rank, grid.dp_size
        self.ranks_per_replica = layout.world_size // self.dp_size
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir or self.out_dir / "checkpoints")
        self.device = ds.rank_device()
        self.objective = objective_for(cfg)
        self.data = build_training_data(cfg, self.out_dir, rank=rank, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                        grad_accum=layout.grad_accum, device=self.device)
        self.tok = self.data.tokenizer
        if cfg.train.epochs:
            cfg.train.steps = cfg.schedule.total_steps = steps_for_epochs(cfg, self.data.loader, layout)
        self.pipeline = layout.pipeline_parallel > 1
        self.state = TrainState(GuardRails(cfg.guard), layout.checkpoint_key())
        self.saves = 0  # checkpoints this process has written (`checkpoint.layout_free_every` counts them)

    def restore(self, resume: str | None) -> None:
        """Build the engine and continue the checkpoint `resume` names, if any (else start from
        `train.init_from`'s weights, if given); then open the metrics log (with the configured
        experiment trackers) and print the run's header. In the saved layout DeepSpeed restores its
        own files; in another, the whole weights, the layout-free optimizer state and the run's data
        position are loaded into the new layout, and the change is said (`resume_plan`)."""
        cfg, layout, rank = self.cfg, self.layout, self.rank
        ds_config = engine_config(cfg, layout)
        self.launch_report = ""
        if rank == 0:
            bf16 = ds.use_bf16(cfg.train.precision)
            self.launch_report = launch_report(cfg, layout, memory_estimates(cfg, layout, bf16=bf16))
            print(self.launch_report, flush=True)
            (self.out_dir / "deepspeed_config.json").write_text(deepspeed_config_text(ds_config))
        last_good = resume_point(self.ckpt_root, resume)
        plan = resume_plan(last_good, cfg, self.state.layout) if last_good is not None else None
        notes = []
        if plan is not None:  # the data position first: a stream that cannot continue stops before the engine
            notes = plan.notes + self._restore_data(last_good)
        weights = None
        if plan is not None and not plan.same_layout:
            weights = last_good
        elif plan is None and cfg.train.init_from:
            weights = init_from_weights(cfg)
            notes.append(f"initialised from the weights in {weights}")
        self.engine = build_engine(cfg, ds_config, weights)
        if self.engine.dp_world_size != self.dp_size:
            raise RuntimeError(f"DeepSpeed sees data-parallel size {self.engine.dp_world_size}, the layout "
                               f"has {self.dp_size}: the engine was built without the right mpu")
        if self.pipeline:  # validation and the closing sample run the whole model's forward over the stages
            from parallel.pipeline import PipelineForward
            self.model_fn = PipelineForward(self.engine.module)
        else:
            self.model_fn = self.engine
        if plan is not None:
            if plan.same_layout:
                load_full_state(self.engine, last_good)
                set_rng_state(read_rank_state(last_good, rank)["rng"])
            elif plan.optimizer:
                step = load_optimizer_state(self.engine, last_good)
                notes.insert(len(plan.notes), f"carried over: the weights, the optimizer state (fp32 master weights, "
                             f"both Adam moments, AdamW step {step}) from {last_good / OPTIMIZER_FILE}, and the data "
                             f"position")
            self.state.load_state_dict(plan.trainer_state)
            self.state.saved(last_good)
        self._open_log(notes)

    def _restore_data(self, checkpoint: Path) -> list[str]:
        """Continue the data stream from the checkpoint's position (any layout of the same global
        batch); what changed in the stream's layout, if anything."""
        data_state = read_data_state(checkpoint)
        try:
            change = self.data.loader.describe_change(data_state)
            self.data.loader.load_state_dict(data_state)
        except ValueError as error:
            raise CheckpointError(f"{checkpoint / DATA_STATE}: {error}; or start a new run from its weights with "
                                  f"train.init_from={checkpoint}") from None
        return [change] if change else []

    def _open_log(self, resume_notes: list[str]) -> None:
        cfg, state = self.cfg, self.state
        trackers = []
        if self.rank == 0:
            trackers = open_trackers(cfg.logging.wandb, cfg.logging.mlflow, self.out_dir, state.trackers,
                                     config={**cfg.to_dict(), "layout": state.layout},
                                     launch_report=self.launch_report, step=state.step, resume_notes=resume_notes)
            state.trackers = {tracker.name: tracker.run_id for tracker in trackers}
        self.log = MetricsLogger(self.out_dir, total_steps=cfg.train.steps, start_step=state.step,
                                 enabled=self.rank == 0, jsonl=cfg.logging.jsonl,
                                 tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar,
                                 trackers=trackers)
        self.log.print(f"model {parameter_count(cfg.model) / 1e6:.2f}M params | tokenizer {self.tok.vocab_size} | "
                       f"data {self.data.description} | {self.layout.describe()} | "
                       f"engine DP {self.engine.dp_world_size}")
        if cfg.train.epochs:
            self.log.print(f"{cfg.train.epochs} epoch(s) of {self.data.loader.first_epoch[0]} micro-batches "
                           f"per rank: {cfg.train.steps} optimizer steps")
        for note in resume_notes:
            self.log.print(note)
        if state.last_good is not None:
            self.log.log(state.step, {"resumed_from": str(state.last_good), "resume_notes": resume_notes})
            self.log.print(f"resumed from {state.last_good}: already at step {state.step} = train.steps, "
                           f"nothing to run" if state.step >= cfg.train.steps else
                           f"resumed from {state.last_good}: steps {state.step + 1}..{cfg.train.steps} to run")
        elif cfg.train.init_from:
            self.log.log(state.step, {"initialised_from": cfg.train.init_from})

    def start_meters(self) -> None:
        """The straggler, FLOP and step-time meters, started after the first validation (whose
        forwards they must not count)."""
        cfg = self.cfg
        self.stragglers = StragglerMonitor(self.rank, cfg.logging.straggler_factor)
        meter = None if self.pipeline else FlopMeter(
            cfg.model, activation_checkpointing=cfg.memory.activation_checkpointing,
            loss_chunk_tokens=cfg.memory.loss_chunk_tokens).attach(self.engine.module)
        self.perf = StepProfiler(cfg.profile, meter=meter, out_dir=self.out_dir, rank=self.rank,
                                 world_size=self.layout.world_size, ranks_per_replica=self.ranks_per_replica)

    def step(self) -> StepOutcome:
        """One optimizer step over `gradient accumulation` micro-batches, its numbers summed over
        the ranks, and the guard rails' verdict on it."""
        cfg, state, perf = self.cfg, self.state, self.perf
        step, done = state.step, state.step + 1
        lr = lr_at(cfg.schedule, step, state.tokens_seen)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        perf.start_step()
        losses, max_logits, tokens = self._pipeline_micro_batches(step) if self.pipeline else self._micro_batches(step)
        self.watchdog.beat(done, "all-reduce of the step metrics")
        loss_sum = torch.stack(losses).double().sum().item()
        if self.rank == cfg.guard.inject_delay_rank:
            time.sleep(cfg.guard.inject_delay_s)  # fault injection: a straggler
        self.stragglers.arrived(done)
        loss_sum, tokens, preempted = ds.all_reduce([loss_sum, tokens, self.preemption.raised])
        self.stragglers.released()
        [max_logit] = ds.all_reduce([torch.stack(max_logits).max().item()], op=torch.distributed.ReduceOp.MAX)
        perf.lap("communication")
        # every rank of a replica (its tensor- and pipeline-parallel ranks) reports the replica's
        # micro-batch losses and tokens: count each replica once
        step_loss = loss_sum / (self.layout.grad_accum * self.layout.world_size)
        tokens /= self.ranks_per_replica
        state.step, state.tokens_seen = done, state.tokens_seen + tokens
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        verdict = state.guard.observe(done, step_loss, grad_norm, str(state.last_good) if state.last_good else None)
        return StepOutcome(step_loss, grad_norm, max_logit, lr, tokens, perf.end_step(tokens), bool(preempted),
                           verdict.halt)

    def _micro_batches(self, step: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """(losses, largest logits, tokens) of this rank's micro-batches, each stepped by the engine
        (it applies the update at the last)."""
        cfg, engine, perf, done = self.cfg, self.engine, self.perf, step + 1
        losses, max_logits, tokens = [], [], 0  # device tensors: one host sync per step
        for micro_step in range(self.layout.grad_accum):
            self.watchdog.beat(done, f"micro-batch {micro_step} forward/backward")
            item = next(self.data.loader)
            batch = self.objective.device_batch(item, self.device)
            perf.lap("data")
            first_row = first_global_row(micro_step, self.dp_rank, self.dp_size, cfg.train.micro_batch_size)
            loss = self.objective.micro_batch_loss(engine, batch, self.tok.mask_id, step, first_row)
            if done in cfg.guard.inject_nan_at_steps:
                loss = loss * float("nan")
            perf.lap("forward")
            engine.backward(loss)
            perf.lap("backward")
            engine.step()
            perf.lap("optimizer")
            losses.append(loss.detach())
            tokens += item.input_ids.numel()
            max_logits.append(engine.module.max_logit)
        return losses, max_logits, tokens

    def _pipeline_micro_batches(self, step: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """The same for a pipeline: every stage reads the replica's micro-batches; the engine steps once."""
        self.watchdog.beat(step + 1, "pipeline forward/backward and optimizer step")
        batches = [next(self.data.loader).input_ids.to(self.device) for _ in range(self.layout.grad_accum)]
        self.perf.lap("data")
        loss, max_logit = pipeline_step(self.engine, self.cfg, batches, self.tok.mask_id, step,
                                        self.dp_rank, self.dp_size)
        self.perf.lap("pipeline")
        return [loss], [max_logit], sum(batch.numel() for batch in batches)

    def log_step(self, outcome: StepOutcome) -> None:
        """The step's record; every `logging.every` steps (and at the last) with the learning rate,
        throughput, per-source tokens, straggler and profiler figures."""
        cfg, done = self.cfg, self.state.step
        self.log.advance(outcome.loss, outcome.tokens / outcome.seconds)
        record = {"loss": outcome.loss, "grad_norm": outcome.grad_norm, "max_logit": outcome.max_logit,
                  "skipped_steps": self.state.guard.skipped_total}
        if done % cfg.logging.every == 0 or done == cfg.train.steps:
            straggler_metrics, straggler_warning = self.stragglers.report()
            record.update(lr=outcome.lr, tokens=self.state.tokens_seen, tokens_per_s=outcome.tokens / outcome.seconds,
                          **source_metrics(self.data.loader.counters(), self.ranks_per_replica),
                          **straggler_metrics)
            record.update(self.perf.report())
            if straggler_warning:
                self.log.print(straggler_warning)
        self.log.log(done, record)

    def due(self, every: int) -> bool:
        """Whether a task of period `every` (0: never) runs after this step (always after the last)."""
        return bool(every) and (self.state.step % every == 0 or self.state.step == self.cfg.train.steps)

    def checkpoint_due(self) -> bool:
        c, done = self.cfg.checkpoint, self.state.step
        return bool((c.every and done % c.every == 0) or (done == self.cfg.train.steps and c.save_at_end))

    def validate(self) -> dict:
        """The objective's held-out loss on the fixed batches, logged."""
        cfg, step = self.cfg, self.state.step
        self.watchdog.beat(step, "validation")
        self.engine.module.eval()
        result = self.objective.heldout_loss(self.model_fn, self.data.validation_batches, mask_id=self.tok.mask_id,
                                             t_buckets=cfg.validation.t_buckets, seed=cfg.validation.seed)
        self.engine.module.train()
        self.log.log(step, {"tokens": self.state.tokens_seen, **result})
        self.log.print(f"step {step}: held-out loss {result['val/loss']:.4f}")
        return result

    def validate_elbo(self) -> None:
        """The Algorithm 3 bound on the held-out answers, summed over ranks and logged."""
        v, step = self.cfg.validation, self.state.step
        self.watchdog.beat(step, "Algorithm 3 validation")
        self.engine.module.eval()
        nll, tokens = heldout_elbo(self.model_fn, self.data.elbo_examples, dp_rank=self.dp_rank,
                                   dp_size=self.dp_size, mask_id=self.tok.mask_id, mc_num=v.elbo_mc_num,
                                   batch_size=v.elbo_batch_size, seed=v.seed)
        self.engine.module.train()
        nll, tokens = ds.all_reduce([nll, tokens])
        self.log.log(step, {"tokens": self.state.tokens_seen, "val/elbo_nll": nll / tokens})
        self.log.print(f"step {step}: held-out Algorithm 3 bound {nll / tokens:.4f} nats/token")

    def checkpoint(self, preempted: bool = False) -> None:
        """Save the engine, the run's state and its data position (every rank's, merged); the new
        fallback. Every `checkpoint.layout_free_every`-th save, and the last or a preempted one,
        also writes the optimizer state whole, for a resume in another layout."""
        cfg, step = self.cfg, self.state.step
        self.watchdog.beat(step, "checkpoint save")
        start = time.time()
        self.saves += 1
        every = cfg.checkpoint.layout_free_every
        layout_free = bool(every) and (self.saves % every == 0 or preempted or step == cfg.train.steps)
        states = [None] * self.layout.world_size
        torch.distributed.all_gather_object(states, self.data.loader.state_dict())
        data_state = type(self.data.loader).merge(states) if self.rank == 0 else None
        gather_start = time.time()
        optimizer_state = gather_optimizer_state(self.engine) if layout_free else None
        gather_seconds = time.time() - gather_start
        path = save_checkpoint(
            self.engine, self.ckpt_root, step, config=cfg.to_dict(), tokenizer_path=self.tok.path,
            trainer_state=self.state.state_dict(), data_state=data_state, optimizer_state=optimizer_state,
            keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every)
        seconds = time.time() - start
        record = {"checkpoint/seconds": seconds}
        extra = ""
        if layout_free:
            size = (path / OPTIMIZER_FILE).stat().st_size if self.rank == 0 else 0
            record.update({"checkpoint/layout_free_gather_seconds": gather_seconds,
                           "checkpoint/layout_free_bytes": size})
            extra = f" (layout-free optimizer state {size / 2 ** 20:.1f} MiB, gathered in {gather_seconds:.1f} s)"
        self.log.log(step, record)
        self.log.print(f"step {step}: saved {path} in {seconds:.1f} s{extra}")
        self.state.saved(path)

    def closing_sample(self) -> None:
        """The objective's sample for `sample.prompt` from the final weights, logged and printed."""
        steps, s = self.cfg.train.steps, self.cfg.sample
        self.watchdog.beat(steps, "closing sample")
        model = self.model_fn if self.pipeline else self.engine.module
        sample_ids = self.objective.closing_sample(model, self.tok, s, self.device)
        text = s.prompt + self.tok.decode(sample_ids)
        self.log.log(steps, {"sample/ids": sample_ids, "sample/text": text})
        self.log.print(f"sample (prompt {s.prompt!r}):\n{text}")

    def close(self) -> None:
        self.data.loader.close()
        self.log.close()

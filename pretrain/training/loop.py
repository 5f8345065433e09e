"""The training loop: `python -m pretrain.train --config FILE [section.field=value ...]`.

One loop, always on a DeepSpeed engine (a single CPU process is a world of one), for the
masked diffusion objective and the autoregressive baseline, at any layout: the rank layout and
memory plan are resolved and printed before anything is allocated (`--dry-run` stops there),
the model and engine are built by `pretrain.training.engine_setup` (megatron-core tensor-parallel
shards, DeepSpeed pipeline stages, `zero.Init` partitions under ZeRO-3). Each optimizer step
runs `gradient accumulation` micro-batches (their loss: `pretrain.training.step_loss`); the data order
and 1% length cut are keyed on the data-parallel rank, t and the masks on (seed, step, row of
the global batch); the learning rate follows the configured
schedule keyed on tokens seen; held-out loss on a fixed t grid, checkpoints and a closing
sample come from the config. Supervised fine-tuning (`train.objective: sft`) is the same loop
on conversation batches with Algorithm 2, usually started from imported weights
(`train.init_from`), validated by the Algorithm 3 bound on held-out answers, and sampled
through the chat template."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import torch
import yaml

from data_pipeline.seeding import keyed_generator
from data_pipeline.sft import ChatTemplate
from parallel import engine as ds
from parallel.memory_plan import parameter_count
from parallel.topology import coordinates
from pretrain.checkpoint.store import (
    find_resume,
    load_full_state,
    read_rank_state,
    read_trainer_state,
    save_checkpoint,
    set_rng_state,
)
from pretrain.diffusion.sampling import SamplerConfig, all_ranks_agree, generate, generate_autoregressive, strip_at_eos
from pretrain.runtime.flops import FlopMeter
from pretrain.runtime.guard_rails import GuardRails, HangWatchdog
from pretrain.runtime.metrics import MetricsLogger
from pretrain.runtime.preemption import PreemptionFlag
from pretrain.runtime.rank_failures import exit_after_collective_failure, is_collective_failure, tee_to_rank_log
from pretrain.runtime.stragglers import StragglerMonitor
from pretrain.runtime.throughput import StepProfiler
from pretrain.training.config import ConfigError, RunConfig
from pretrain.training.data_setup import build_training_data
from pretrain.training.engine_setup import build_engine, init_from_weights
from pretrain.training.heldout import heldout_elbo, heldout_metrics
from pretrain.training.layout import (
    Layout,
    deepspeed_config_text,
    engine_config,
    gpu_budget_bytes,
    launch_report,
    memory_estimates,
    resolve_layout,
)
from pretrain.training.schedule import lr_at
from pretrain.training.step_loss import first_global_row, micro_batch_loss, pipeline_step


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\._.*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def source_metrics(counters: dict[str, dict[str, int]], ranks_per_replica: int) -> dict[str, float]:
    """Per-source tokens summed over data-parallel ranks (the tensor- and pipeline-parallel
    ranks of a replica read the same data: counted once), and each source's epoch on this rank."""
    names = sorted(counters)
    totals = ds.all_reduce([counters[n]["tokens"] for n in names])
    out = {f"data/{n}/tokens": t / ranks_per_replica for n, t in zip(names, totals)}
    out.update({f"data/{n}/epoch": counters[n]["epoch"] for n in names})
    return out


@torch.no_grad()
def closing_sample(model, cfg: RunConfig, tok, device) -> list[int]:
    """The generated ids (cut at the first EOS) for `sample.prompt`: the reverse process for the
    MDM, left-to-right decoding for the AR baseline; after SFT the prompt is a user turn of the
    chat template and the answer ends at its EoT."""
    model.eval()
    s = cfg.sample
    chat = ChatTemplate(tok) if cfg.train.objective == "sft" else None
    prompt_ids = chat.prompt([{"role": "user", "content": s.prompt}]) if chat else tok.encode(s.prompt)
    prompt = torch.tensor([prompt_ids], device=device)
    generator = keyed_generator(cfg.train.seed, "sample", device=device)
    if cfg.train.objective == "arm":
        out = generate_autoregressive(model, prompt, gen_length=s.gen_length,
                                      temperature=s.temperature, generator=generator)
        return strip_at_eos(out[0, prompt.shape[1]:].tolist(), tok.eos_id)
    config = SamplerConfig(steps=s.steps, gen_length=s.gen_length, block_length=s.block_length,
                           temperature=s.temperature)
    # every rank runs the same prompt; the early stop at EOS is still agreed, as the forwards are collective
    sample = generate(model, prompt, mask_id=tok.mask_id, eos_id=tok.eos_id, eot_id=tok.special_ids["eot"],
                      config=config, generator=generator, agree=all_ranks_agree)
    answer = sample.answers(tok.eos_id)[0]
    return strip_at_eos(answer, chat.eot_id) if chat else answer


def dry_run(cfg: RunConfig, world_size: int) -> int:
    layout = resolve_layout(cfg, world_size)
    ds_config = engine_config(cfg, layout)
    estimates = memory_estimates(cfg, layout, bf16=ds.use_bf16(cfg.train.precision))
    print(launch_report(cfg, layout, estimates))
    print("deepspeed config:\n" + deepspeed_config_text(ds_config))
    return 0 if all(e.fits(gpu_budget_bytes(cfg)) for e in estimates) else 1


class TrainingHalted(RuntimeError):
    """The guard rails stopped the run; the message names the last good checkpoint and the fix."""


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'section.field: old -> new' for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += config_changes(old, new, f"{prefix}{key}.")
        elif old != new and not (isinstance(old, (list, tuple)) and list(old) == list(new or [])):
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
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


def run(cfg: RunConfig, resume: str | None = None) -> None:
    quiet_libraries()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = resolve_layout(cfg, world_size)  # before any process group or allocation
    if cfg.logging.per_rank_logs:
        tee_to_rank_log(cfg.train.out_dir, int(os.environ.get("RANK", "0")))
    ds.init_distributed(cfg.parallel.rendezvous_timeout_s, cfg.parallel.collective_timeout_s)
    rank = torch.distributed.get_rank()
    Path(cfg.train.out_dir).mkdir(parents=True, exist_ok=True)
    preemption = PreemptionFlag()
    watchdog = HangWatchdog(cfg.guard.hang_timeout_s, rank).start()
    try:
        train(cfg, layout, rank, preemption, watchdog, resume)
    except Exception as error:
        if is_collective_failure(error):
            exit_after_collective_failure(error, rank, *watchdog.position)
        raise
    finally:
        watchdog.stop()
        preemption.close()


def train(cfg: RunConfig, layout: Layout, rank: int, preemption: PreemptionFlag,
          watchdog: HangWatchdog, resume: str | None) -> None:
    world_size = layout.world_size
    grid = coordinates(rank, world_size, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    dp_rank, dp_size = grid.dp_rank, grid.dp_size
    out_dir = Path(cfg.train.out_dir)
    ckpt_root = Path(cfg.checkpoint.dir or out_dir / "checkpoints")
    device = ds.rank_device()

    data = build_training_data(cfg, out_dir, rank=rank, dp_rank=dp_rank, dp_size=dp_size,
                               device=device)
    tok, mask_id = data.tokenizer, data.tokenizer.mask_id
    if cfg.train.epochs:
        cfg.train.steps = cfg.schedule.total_steps = steps_for_epochs(cfg, data.loader, layout)

    bf16 = ds.use_bf16(cfg.train.precision)
    ds_config = engine_config(cfg, layout)
    if rank == 0:
        print(launch_report(cfg, layout, memory_estimates(cfg, layout, bf16=bf16)), flush=True)
        (out_dir / "deepspeed_config.json").write_text(deepspeed_config_text(ds_config))
    this_layout = layout.checkpoint_key()
    guard = GuardRails(cfg.guard)
    start_step, tokens_seen = 0, 0.0
    last_good = resume_point(ckpt_root, resume)
    state = read_trainer_state(last_good) if last_good is not None else None
    same_layout = state is not None and state["layout"] == this_layout

    resume_notes, weights = [], None
    if state is not None and not same_layout:
        weights = last_good
        resume_notes.append(f"layout changed from {state['layout']} to {this_layout}: loaded the "
                            f"weights only; the optimizer state was dropped and the data stream "
                            f"starts afresh")
    elif state is None and cfg.train.init_from:
        weights = init_from_weights(cfg)
        resume_notes.append(f"initialised from the weights in {weights}")
    engine = build_engine(cfg, ds_config, weights)
    if engine.dp_world_size != dp_size:
        raise RuntimeError(f"DeepSpeed sees data-parallel size {engine.dp_world_size}, the layout "
                           f"has {dp_size}: the engine was built without the right mpu")
    grad_accum = layout.grad_accum
    micro = cfg.train.micro_batch_size
    sft = cfg.train.objective == "sft"
    pipeline = layout.pipeline_parallel > 1
    if pipeline:  # validation and the closing sample run the whole model's forward over the stages
        from parallel.pipeline import PipelineForward
        model_fn = PipelineForward(engine.module)
    else:
        model_fn = engine

    if state is not None:
        saved_cfg = yaml.safe_load((last_good / "config.yaml").read_text())
        resume_notes[:0] = [f"resume override {change}" for change in config_changes(saved_cfg, cfg.to_dict())]
        if same_layout:
            load_full_state(engine, last_good)
            rank_state = read_rank_state(last_good, rank)
            data.loader.load_state_dict(rank_state["data"])
            set_rng_state(rank_state["rng"])
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        guard.load_state_dict(state["guard"])

    log = MetricsLogger(out_dir, total_steps=cfg.train.steps, start_step=start_step, enabled=rank == 0,
                        jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
                        progress_bar=cfg.logging.progress_bar)
    log.print(f"model {parameter_count(cfg.model) / 1e6:.2f}M params | tokenizer {tok.vocab_size} | "
              f"data {data.description} | {layout.describe()} | engine DP {engine.dp_world_size}")
    if cfg.train.epochs:
        log.print(f"{cfg.train.epochs} epoch(s) of {data.loader.first_epoch[0]} micro-batches "
                  f"per rank: {cfg.train.steps} optimizer steps")
    for note in resume_notes:
        log.print(note)
    if last_good is not None:
        log.log(start_step, {"resumed_from": str(last_good), "resume_notes": resume_notes})
        log.print(f"resumed from {last_good}: steps {start_step + 1}..{cfg.train.steps} to run")
    elif cfg.train.init_from:
        log.log(start_step, {"initialised_from": cfg.train.init_from})

    def validate(step: int) -> dict:
        watchdog.beat(step, "validation")
        engine.module.eval()
        result = heldout_metrics(model_fn, data.validation_batches, objective=cfg.train.objective,
                                 mask_id=mask_id, t_buckets=cfg.validation.t_buckets,
                                 seed=cfg.validation.seed)
        engine.module.train()
        log.log(step, {"tokens": tokens_seen, **result})
        log.print(f"step {step}: held-out loss {result['val/loss']:.4f}")
        return result

    def validate_elbo(step: int) -> None:
        watchdog.beat(step, "Algorithm 3 validation")
        v = cfg.validation
        engine.module.eval()
        nll, tokens = heldout_elbo(model_fn, data.elbo_examples, dp_rank=dp_rank, dp_size=dp_size,
                                   mask_id=mask_id, mc_num=v.elbo_mc_num, batch_size=v.elbo_batch_size,
                                   seed=v.seed)
        engine.module.train()
        nll, tokens = ds.all_reduce([nll, tokens])
        log.log(step, {"tokens": tokens_seen, "val/elbo_nll": nll / tokens})
        log.print(f"step {step}: held-out Algorithm 3 bound {nll / tokens:.4f} nats/token")

    def due(every: int, step: int) -> bool:
        return bool(every) and (step % every == 0 or step == cfg.train.steps)

    def checkpoint(step: int) -> Path:
        watchdog.beat(step, "checkpoint save")
        start = time.time()
        path = save_checkpoint(
            engine, ckpt_root, step, config=cfg.to_dict(), tokenizer_path=tok.path,
            trainer_state={"tokens_seen": tokens_seen, "guard": guard.state_dict(), "layout": this_layout},
            rank_state={"data": data.loader.state_dict()},
            keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every)
        seconds = time.time() - start
        log.log(step, {"checkpoint/seconds": seconds})
        log.print(f"step {step}: saved {path} in {seconds:.1f} s")
        return path

    first_val = validate(start_step) if cfg.validation.every and start_step == 0 else None
    if cfg.validation.elbo_every and start_step == 0:
        validate_elbo(start_step)
    last_val = first_val
    saved_step = start_step if last_good is not None else None
    steps_run = 0
    stragglers = StragglerMonitor(rank, cfg.logging.straggler_factor)
    meter = None if pipeline else FlopMeter(
        cfg.model, activation_checkpointing=cfg.memory.activation_checkpointing,
        loss_chunk_tokens=cfg.memory.loss_chunk_tokens).attach(engine.module)
    perf = StepProfiler(cfg.profile, meter=meter, out_dir=out_dir, rank=rank, world_size=world_size,
                        ranks_per_replica=world_size // dp_size)
    for step in range(start_step, cfg.train.steps):
        done = step + 1
        lr = lr_at(cfg.schedule, step, tokens_seen)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        perf.start_step()
        losses, max_logits, tokens = [], [], 0  # device tensors: one host sync per step
        if pipeline:  # every stage reads the replica's micro-batches; the engine steps once
            watchdog.beat(done, "pipeline forward/backward and optimizer step")
            batches = [next(data.loader).tokens.to(device) for _ in range(grad_accum)]
            perf.lap("data")
            loss, max_logit = pipeline_step(engine, cfg, batches, mask_id, step, dp_rank, dp_size)
            perf.lap("pipeline")
            losses.append(loss)
            max_logits.append(max_logit)
            tokens += sum(batch.numel() for batch in batches)
        else:
            for micro_step in range(grad_accum):
                watchdog.beat(done, f"micro-batch {micro_step} forward/backward")
                item = next(data.loader)
                if sft:
                    batch, prompt_lengths = item.input_ids.to(device), item.prompt_lengths.to(device)
                else:
                    batch, prompt_lengths = item.tokens.to(device), None
                perf.lap("data")
                first_row = first_global_row(micro_step, dp_rank, dp_size, micro)
                loss = micro_batch_loss(engine, cfg, batch, mask_id, step, first_row, prompt_lengths)
                if done in cfg.guard.inject_nan_at_steps:
                    loss = loss * float("nan")
                perf.lap("forward")
                engine.backward(loss)
                perf.lap("backward")
                engine.step()
                perf.lap("optimizer")
                losses.append(loss.detach())
                tokens += batch.numel()
                max_logits.append(engine.module.max_logit)
        watchdog.beat(done, "all-reduce of the step metrics")
        loss_sum = torch.stack(losses).double().sum().item()
        if rank == cfg.guard.inject_delay_rank:
            time.sleep(cfg.guard.inject_delay_s)  # fault injection: a straggler
        stragglers.arrived(done)
        loss_sum, tokens, preempted = ds.all_reduce([loss_sum, tokens, preemption.raised])
        stragglers.released()
        [max_logit] = ds.all_reduce([torch.stack(max_logits).max().item()], op=torch.distributed.ReduceOp.MAX)
        perf.lap("communication")
        # every rank of a replica (its tensor- and pipeline-parallel ranks) reports the replica's
        # micro-batch losses and tokens: count each replica once
        step_loss = loss_sum / (grad_accum * world_size)
        tokens /= world_size // dp_size
        tokens_seen += tokens
        steps_run += 1
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        verdict = guard.observe(done, step_loss, grad_norm, str(last_good) if last_good else None)
        elapsed = perf.end_step(tokens)
        log.advance(step_loss, tokens / elapsed)
        record = {"loss": step_loss, "grad_norm": grad_norm, "max_logit": max_logit,
                  "skipped_steps": guard.skipped_total}
        if done % cfg.logging.every == 0 or done == cfg.train.steps:
            straggler_metrics, straggler_warning = stragglers.report()
            record.update(lr=lr, tokens=tokens_seen, tokens_per_s=tokens / elapsed,
                          **source_metrics(data.loader.counters(), world_size // dp_size), **straggler_metrics)
            record.update(perf.report())
            if straggler_warning:
                log.print(straggler_warning)
        log.log(done, record)
        if verdict.halt:
            log.print(verdict.halt)
            raise TrainingHalted(verdict.halt)
        if due(cfg.validation.every, done):
            last_val = validate(done)
        if due(cfg.validation.elbo_every, done):
            validate_elbo(done)
        if (preempted or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0)
                or (done == cfg.train.steps and cfg.checkpoint.save_at_end)):
            last_good, saved_step = checkpoint(done), done
        if preempted:
            log.print(f"preempted ({preemption.signal_name or 'signal on another rank'}): saved step "
                      f"{done}; continue with --resume auto")
            break
    perf.close()
    log.print(f"ran {steps_run} steps ({start_step + 1}..{start_step + steps_run})")

    if saved_step == cfg.train.steps:
        watchdog.beat(cfg.train.steps, "closing sample")
        sample_ids = closing_sample(model_fn if pipeline else engine.module, cfg, tok, device)
        text = cfg.sample.prompt + tok.decode(sample_ids)
        log.log(cfg.train.steps, {"sample/ids": sample_ids, "sample/text": text})
        log.print(f"sample (prompt {cfg.sample.prompt!r}):\n{text}")
    if first_val and last_val:
        log.print(f"held-out loss {first_val['val/loss']:.4f} -> {last_val['val/loss']:.4f}")
    data.loader.close()
    log.close()

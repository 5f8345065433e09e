"""The training loop: `python -m pretrain.train --config FILE [section.field=value ...]`.

One loop, always on a DeepSpeed engine (a single CPU process is a world of one), for the
masked diffusion objective and the autoregressive baseline. Each optimizer step runs
`gradient accumulation` micro-batches whose data, 1% length cut, t and masks come from
generators keyed by (seed, step, micro-step, data-parallel rank); the learning rate follows
the configured schedule keyed on tokens seen; held-out loss on a fixed t grid, checkpoints
and a closing sample come from the config.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from data_pipeline.seeding import keyed_generator
from parallel import engine as ds
from parallel.model import LLaDAModel, no_weight_decay
from pretrain.checkpoint import save_checkpoint
from pretrain.config import ConfigError, RunConfig, load_config
from pretrain.data_setup import build_training_data
from pretrain.metrics import MetricsLogger
from pretrain.objectives import ar_loss, forward_process, pretrain_loss
from pretrain.sampling import generate, generate_autoregressive, strip_at_eos
from pretrain.schedule import lr_at
from pretrain.validation import heldout_metrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (defaults to the tiny demo)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=20")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\._.*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.schedule.peak_lr, betas=cfg.optim.betas,
                             eps=cfg.optim.eps)


def source_metrics(counters: dict[str, dict[str, int]]) -> dict[str, float]:
    """Per-source tokens summed over data-parallel ranks, and each source's epoch on this rank."""
    names = sorted(counters)
    totals = all_reduce_sum([counters[n]["tokens"] for n in names])
    out = {f"data/{n}/tokens": t for n, t in zip(names, totals)}
    out.update({f"data/{n}/epoch": counters[n]["epoch"] for n in names})
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def micro_batch_loss(engine, cfg: RunConfig, batch: torch.Tensor, mask_id: int,
                     noise_gen: torch.Generator) -> torch.Tensor:
    if cfg.train.objective == "arm":
        return ar_loss(engine(batch), batch)
    nb = forward_process(batch, mask_id, generator=noise_gen)
    return pretrain_loss(engine(nb.noisy), batch, nb)


@torch.no_grad()
def closing_sample(model, cfg: RunConfig, tok, device) -> list[int]:
    """The generated ids (cut at the first EOS) for `sample.prompt`: the reverse process for the
    MDM, left-to-right decoding for the AR baseline."""
    model.eval()
    s = cfg.sample
    prompt = torch.tensor([tok.encode(s.prompt)], device=device)
    generator = keyed_generator(cfg.train.seed, "sample", device=device)
    if cfg.train.objective == "arm":
        out = generate_autoregressive(model, prompt, gen_length=s.gen_length,
                                      temperature=s.temperature, generator=generator)
    else:
        out = generate(model, prompt, mask_id=tok.mask_id, steps=s.steps, gen_length=s.gen_length,
                       block_length=s.block_length, temperature=s.temperature, generator=generator)
    return strip_at_eos(out[0, prompt.shape[1]:].tolist(), tok.eos_id)


def run(cfg: RunConfig) -> None:
    quiet_libraries()
    ds.init_distributed()
    rank = torch.distributed.get_rank()
    dp_rank, dp_size = ds.data_parallel_rank_and_size()
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    data = build_training_data(cfg, out_dir, rank=rank, dp_rank=dp_rank, dp_size=dp_size,
                               device=device)
    tok, mask_id = data.tokenizer, data.tokenizer.mask_id

    torch.manual_seed(cfg.train.seed)
    model = LLaDAModel(cfg.model, attention_backend=cfg.train.attention_backend)
    n_params = sum(p.numel() for p in model.parameters())
    per_step = cfg.train.micro_batch_size * dp_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size: {cfg.train.global_batch_size} is not a multiple "
                          f"of train.micro_batch_size x data-parallel size = {per_step}")
    grad_accum = cfg.train.global_batch_size // per_step
    engine = ds.initialize(model, build_optimizer(model, cfg), ds.deepspeed_config(
        micro_batch_size=cfg.train.micro_batch_size, grad_accum_steps=grad_accum,
        zero_stage=cfg.train.zero_stage, bf16=ds.use_bf16(cfg.train.precision),
        communication_dtype=cfg.train.communication_dtype, grad_clip=cfg.optim.grad_clip))

    log = MetricsLogger(out_dir, total_steps=cfg.train.steps, enabled=rank == 0,
                        jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
                        progress_bar=cfg.logging.progress_bar)
    log.print(f"model {n_params / 1e6:.2f}M params | tokenizer {tok.vocab_size} | data "
              f"{data.description} | dp {dp_size} x micro {cfg.train.micro_batch_size} x accum {grad_accum}")

    def validate(step: int) -> dict:
        engine.module.eval()
        result = heldout_metrics(engine.module, data.validation_batches, objective=cfg.train.objective,
                                 mask_id=mask_id, t_buckets=cfg.validation.t_buckets,
                                 seed=cfg.validation.seed)
        engine.module.train()
        log.log(step, {"tokens": tokens_seen, **result})
        log.print(f"step {step}: held-out loss {result['val/loss']:.4f}")
        return result

    def checkpoint(step: int) -> None:
        start = time.time()
        path = save_checkpoint(engine, cfg.checkpoint.dir or out_dir / "checkpoints", step,
                               client_state={"step": step, "tokens_seen": tokens_seen},
                               rank_state={"data": data.loader.state_dict()},
                               config=cfg.to_dict(), tokenizer_path=tok.path)
        log.log(step, {"checkpoint/seconds": time.time() - start})
        log.print(f"step {step}: saved {path}")

    tokens_seen = 0.0
    skipped = 0
    seed = cfg.train.seed
    first_val = validate(0) if cfg.validation.every else None
    last_val = first_val
    for step in range(cfg.train.steps):
        lr = lr_at(cfg.schedule, step, tokens_seen)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        start = time.time()
        loss_sum, tokens = 0.0, 0
        for micro in range(grad_accum):
            batch = next(data.loader).tokens.to(device)
            loss = micro_batch_loss(engine, cfg, batch, mask_id,
                                    keyed_generator(seed, "noise", step, micro, dp_rank, device=device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
            tokens += batch.numel()
        loss_sum, tokens = all_reduce_sum([loss_sum, tokens])
        step_loss = loss_sum / (grad_accum * dp_size)
        tokens_seen += tokens
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        if grad_norm is not None and not math.isfinite(grad_norm):
            skipped += 1
        elapsed = time.time() - start
        done = step + 1
        log.advance(step_loss, tokens / elapsed)
        if done % cfg.logging.every == 0 or done == cfg.train.steps:
            log.log(done, {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                           "tokens_per_s": tokens / elapsed, "skipped_steps": skipped,
                           **source_metrics(data.loader.counters())})
        if cfg.validation.every and (done % cfg.validation.every == 0 or done == cfg.train.steps):
            last_val = validate(done)
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != cfg.train.steps:
            checkpoint(done)
    checkpoint(cfg.train.steps)

    sample_ids = closing_sample(engine.module, cfg, tok, device)
    text = cfg.sample.prompt + tok.decode(sample_ids)
    log.log(cfg.train.steps, {"sample/ids": sample_ids, "sample/text": text})
    log.print(f"sample (prompt {cfg.sample.prompt!r}):\n{text}")
    if first_val and last_val:
        log.print(f"held-out loss {first_val['val/loss']:.4f} -> {last_val['val/loss']:.4f}")
    data.loader.close()
    log.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(load_config(args.config, args.overrides))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Turns the config's data section into the training stream and the fixed validation batches.

Pretraining has one data path: prepared webdataset shards read by the streaming loader. With
`data.source: shards` the config names prepared directories; with `stdlib` (the embedded
demo corpus) or `files`, rank 0 holds out every k-th file, trains the BPE tokenizer on the
rest when none is given, and prepares both parts into `<out_dir>/data/` before any rank reads.
Supervised fine-tuning (`data.source: sft`) reads JSONL conversations into Algorithm 2 batches
(`data_pipeline.sft`), and holds out the pairs of `data.validation_path` for the Algorithm 3
bound on their answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.corpus import split_heldout, stdlib_corpus
from data_pipeline.heldout import heldout_batches
from data_pipeline.prepare import expand_inputs, prepare
from data_pipeline.sft import SFTBatches, SFTStream, choose_pairs, fit_to_length, load_sft_pairs
from data_pipeline.shards import file_sha256
from data_pipeline.streaming import SourceSpec, TokenBatchLoader
from data_pipeline.tokenizer import TokenizerInfo, check_fits_model, load_tokenizer, padded_vocab_size, train_bpe
from pretrain.training.config import ConfigError, RunConfig

# Small shards for a few-MB corpus, so shard shuffling and the worker split have units to work on.
DEMO_TOKENS_PER_SHARD = 1 << 18


@dataclass
class TrainingData:
    tokenizer: TokenizerInfo
    loader: TokenBatchLoader | SFTStream
    validation_batches: list[torch.Tensor]  # the fixed-t held-out loss's batches (pretraining)
    # What the Algorithm 3 bound scores: (prompt + answer ids, prompt length) each; a held-out
    # row with an empty prompt in pretraining, a held-out conversation pair in SFT.
    elbo_examples: list[tuple[torch.Tensor, int]]
    description: str


def _prepare_corpus(cfg: RunConfig, data_dir: Path, rank: int) -> tuple[Path, list[SourceSpec], Path]:
    """(tokenizer path, training sources, held-out directory) for the stdlib / files corpora."""
    d = cfg.data
    tokenizer_path = Path(d.tokenizer) if d.tokenizer else data_dir / "tokenizer.json"
    if rank == 0:
        try:
            files = stdlib_corpus(data_dir, d.max_bytes) if d.source == "stdlib" else expand_inputs(d.paths)
            train_files, heldout_files = split_heldout(files, d.heldout_fraction)
            # Retrained every run (deterministic, seconds): a reused run directory keeps nothing stale.
            if d.tokenizer is None:
                train_bpe(train_files, cfg.model.vocab_size, tokenizer_path)
            for part, part_files in (("train", train_files), ("heldout", heldout_files)):
                prepare(part_files, tokenizer_path, data_dir / part, workers=1, overwrite=True,
                        progress=False, tokens_per_shard=DEMO_TOKENS_PER_SHARD)
        except ValueError as err:  # a file that is not UTF-8 text, too few files to hold out, a bad document
            raise ConfigError(f"data.{'paths' if d.source == 'files' else 'source'} ({d.source}): {err}") from None
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return tokenizer_path, [SourceSpec("train", str(data_dir / "train"), 1.0)], data_dir / "heldout"


def build_training_data(cfg: RunConfig, out_dir: Path, *, rank: int, dp_rank: int, dp_size: int,
                        grad_accum: int, device: torch.device) -> TrainingData:
    """The stream of this data-parallel rank's micro-batches (`grad_accum` per optimizer step: each
    row of the step's global batch reads a lane of its own, whatever the split) and the held-out data."""
    d = cfg.data
    if d.source == "sft":
        return _sft_data(cfg, dp_rank=dp_rank, dp_size=dp_size, grad_accum=grad_accum, device=device)
    if d.source == "shards":
        tokenizer_path = Path(d.tokenizer)
        sources = [SourceSpec(s.name or Path(s.path).name, s.path, s.weight) for s in d.sources]
        heldout_dir = Path(d.validation_path) if d.validation_path else None
    else:
        tokenizer_path, sources, heldout_dir = _prepare_corpus(cfg, out_dir / "data", rank)
    tok = load_tokenizer(tokenizer_path)
    if d.pad_vocab_to_multiple:
        cfg.model.vocab_size = padded_vocab_size(tok.vocab_size, d.pad_vocab_to_multiple)
    check_fits_model(tok, cfg.model.vocab_size)
    loader = TokenBatchLoader(
        sources, seq_len=d.seq_len, batch_size=cfg.train.micro_batch_size, grad_accum=grad_accum,
        seed=cfg.train.seed, dp_rank=dp_rank, dp_size=dp_size, num_workers=d.num_workers,
        vocab_size=cfg.model.vocab_size, tokenizer_sha256=tok.sha256, variable_length_prob=d.variable_length_prob,
        variable_length_mode=d.variable_length_mode)
    validation = []
    if cfg.validation.every or cfg.validation.elbo_every:
        validation = [b.to(device) for b in heldout_batches(
            heldout_dir, n_batches=cfg.validation.batches, batch_size=cfg.validation.batch_size,
            seq_len=d.seq_len, vocab_size=cfg.model.vocab_size, tokenizer_sha256=tok.sha256)]
    elbo_rows = torch.cat(validation)[:cfg.validation.elbo_sequences] if cfg.validation.elbo_every else []
    description = ", ".join(
        f"{s.name}: {sum(sh.tokens for sh in s.shards):,} tokens in {len(s.shards)} shards, weight {s.weight:g}"
        for s in loader.sources)
    return TrainingData(tok, loader, validation, [(row, 0) for row in elbo_rows], description)


def _sft_data(cfg: RunConfig, *, dp_rank: int, dp_size: int, grad_accum: int,
              device: torch.device) -> TrainingData:
    d, v = cfg.data, cfg.validation
    tok = load_tokenizer(d.tokenizer)
    check_fits_model(tok, cfg.model.vocab_size)
    dialogues = [pairs for path in d.paths for pairs in load_sft_pairs(path, tok)]
    batches = SFTBatches(dialogues, batch_size=cfg.train.micro_batch_size, seq_len=d.seq_len,
                         seed=cfg.train.seed, eos_id=tok.eos_id, overlong=d.sft_overlong, pairs=d.sft_pairs,
                         pad_to=d.seq_len if d.sft_pad_to_seq_len else "longest",
                         dp_rank=dp_rank, dp_size=dp_size, grad_accum=grad_accum)
    identity = {"tokenizer_sha256": tok.sha256,
                "conversations_sha256": ",".join(file_sha256(Path(path)) for path in d.paths)}
    loader = SFTStream(batches, identity)
    examples = []
    if v.elbo_every:
        heldout = [choose_pairs(pairs, d.sft_pairs, v.seed, index, 0)
                   for index, pairs in enumerate(load_sft_pairs(d.validation_path, tok))]
        kept, _ = fit_to_length([pair for pairs in heldout for pair in pairs], d.seq_len, "drop")
        if not kept:
            raise ValueError(f"data.validation_path: {d.validation_path} has no conversation pair "
                             f"that fits data.seq_len {d.seq_len}")
        examples = [(torch.tensor(pair.prompt + pair.response, device=device), len(pair.prompt))
                    for pair in kept[:v.elbo_sequences]]
    micro_batches, counts = loader.first_epoch
    description = (f"sft: {len(dialogues):,} conversations in {len(d.paths)} file(s), "
                   f"{micro_batches} micro-batches per rank and epoch "
                   f"({counts.truncated} truncated, {counts.dropped} dropped, {counts.left_over} left over "
                   f"in epoch 0), {len(examples)} held-out answers")
    return TrainingData(tok, loader, [], examples, description)

"""Shard checksums are checked as shards are read: a shard corrupted without changing its size
(4 KiB zeroed, a few bytes flipped inside the token array) is refused by the training stream
(DataLoader with and without worker processes) and the held-out batches with one line naming
the shard, the expected and found sha256 and "corrupted or modified since prepare"; the intact
data passes and, without the check, the corrupted shard would have been read silently.
SFT reads JSONL dialogues directly (no prepared shards), so it has no shard checksum to check.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.heldout import heldout_batches
from data_pipeline.shards import (
    Manifest,
    ShardError,
    file_sha256,
    read_manifest,
    read_shard,
    shard_name,
    write_manifest,
    write_shard,
)
from data_pipeline.streaming import SourceSpec, TokenBatchLoader

REPO = Path(__file__).resolve().parents[1]
SHA = "7" * 64
VOCAB = 5000
MESSAGE = "corrupted or modified since prepare"


def zero_4k(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[1024:1024 + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in (512 + 128 + 40, 512 + 128 + 41, 512 + 128 + 900):  # after tar and npy headers
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {"zeroed": zero_4k, "flipped": flip_bytes}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("clean") / "data"
    directory.mkdir()
    infos, next_id = [], 1
    for index in range(2):
        samples = []
        for _ in range(3):
            samples.append((np.arange(next_id, next_id + 1000) % (VOCAB - 1) + 1).astype(np.uint32))
            next_id += 1000
        infos.append(write_shard(directory / shard_name(index), samples, documents=3))
    write_manifest(directory, Manifest(tokenizer_sha256=SHA, vocab_size=VOCAB, eos_id=0, shards=infos))
    return directory


@pytest.fixture(params=sorted(CORRUPTIONS))
def corrupted(request, clean, tmp_path) -> Path:
    directory = tmp_path / "data"
    shutil.copytree(clean, directory)
    shard = directory / shard_name(0)
    size = shard.stat().st_size
    CORRUPTIONS[request.param](shard)
    assert shard.stat().st_size == size
    return directory


def loader(directory: Path, num_workers: int) -> TokenBatchLoader:
    return TokenBatchLoader([SourceSpec(name="web", path=str(directory), weight=1.0)], seq_len=64, batch_size=2,
                            grad_accum=1, seed=3, dp_rank=0, dp_size=1, num_workers=num_workers, vocab_size=VOCAB,
                            tokenizer_sha256=SHA, variable_length_prob=0.0)


def assert_one_line(error: ShardError, directory: Path) -> None:
    message = str(error)
    shard = directory / shard_name(0)
    expected = read_manifest(directory, verify_sizes=False).shards[0].sha256
    assert "\n" not in message and "Traceback" not in message
    assert str(shard) in message and MESSAGE in message
    assert expected in message and file_sha256(shard) in message


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_stream_refuses_a_corrupted_shard(corrupted, num_workers):
    stream = loader(corrupted, num_workers)
    with pytest.raises(ShardError) as caught:
        for _ in range(200):  # every shard is read within the first few batches
            next(stream)
    stream.close()
    assert_one_line(caught.value, corrupted)


def test_heldout_batches_refuse_a_corrupted_shard(corrupted):
    with pytest.raises(ShardError) as caught:
        heldout_batches(corrupted, n_batches=2, batch_size=2, seq_len=64, vocab_size=VOCAB, tokenizer_sha256=SHA)
    assert_one_line(caught.value, corrupted)


def test_intact_data_passes_and_unchecked_reads_are_silent(clean, tmp_path):
    for num_workers in (0, 1):
        stream = loader(clean, num_workers)
        for _ in range(200):
            next(stream)
        stream.close()
    assert len(heldout_batches(clean, n_batches=2, batch_size=2, seq_len=64, vocab_size=VOCAB,
                               tokenizer_sha256=SHA)) == 2
    # without the checksum the zeroed shard decodes without error (zeros are valid ids): only the check catches it
    zeroed = tmp_path / shard_name(0)
    shutil.copy(clean / shard_name(0), zeroed)
    zero_4k(zeroed)
    unchecked = read_shard(zeroed, VOCAB)
    assert [s.tolist() for s in unchecked] != [s.tolist() for s in read_shard(clean / shard_name(0), VOCAB)]
    assert sum(int(np.count_nonzero(s == 0)) for s in unchecked) > 500


def test_out_of_vocabulary_ids_in_a_corrupted_shard_report_corruption(clean, tmp_path):
    directory = tmp_path / "data"
    shutil.copytree(clean, directory)
    shard = directory / shard_name(0)
    data = bytearray(shard.read_bytes())
    data[512 + 128 + 40:512 + 128 + 44] = b"\xff\xff\xff\x7f"  # an id far above the vocabulary
    shard.write_bytes(bytes(data))
    info = read_manifest(directory).shards[0]
    with pytest.raises(ShardError, match=MESSAGE) as caught:
        read_shard(shard, VOCAB, info.sha256)
    assert "tokenizer" not in str(caught.value)


def test_training_on_a_corrupted_shard_exits_with_one_line(tmp_path, subprocess_env):
    base = [sys.executable, "-m", "pretrain.train", "--config", str(REPO / "recipes" / "tiny.yaml"),
            "train.micro_batch_size=4", "train.global_batch_size=4", "model.n_layers=2", "validation.every=0",
            "validation.elbo_every=0", "logging.progress_bar=false", "data.num_workers=1",
            "checkpoint.every=0", "sample.gen_length=4", "sample.steps=4", "sample.block_length=4"]
    prepare = tmp_path / "prepare"
    first = subprocess.run([*base, "train.steps=1", "data.max_bytes=1500000", "data.heldout_fraction=0.1",
                            f"train.out_dir={prepare}"],
                           capture_output=True, text=True, timeout=300, env=subprocess_env, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    data = prepare / "data"
    for info in read_manifest(data / "train").shards:
        zero_4k(data / "train" / info.name)
    proc = subprocess.run([*base, "train.steps=3", "data.source=shards", f"data.sources=[{{path: {data / 'train'}}}]",
                           f"data.tokenizer={data / 'tokenizer.json'}", f"train.out_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, env=subprocess_env, cwd=REPO)
    assert proc.returncode == 5, proc.stderr[-3000:]  # the README's "data error" code
    errors = [line for line in proc.stderr.splitlines() if line.startswith("data error: ")]
    assert len(errors) == 1 and MESSAGE in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr, proc.stderr[-3000:]

"""The shard format refuses bad data with messages that name the file and the fix, and the
held-out reader gives the same fixed validation windows every time."""

import numpy as np
import pytest
import webdataset as wds

from data_pipeline.heldout import heldout_batches
from data_pipeline.shards import (
    Manifest,
    ShardError,
    check_tokenizer,
    read_manifest,
    read_shard,
    shard_name,
    write_manifest,
    write_shard,
)

SHA = "cd" * 32


def make_dataset(directory, samples_per_shard, vocab=100_000):
    directory.mkdir(exist_ok=True)
    shards = [write_shard(directory / shard_name(i), samples, documents=len(samples))
              for i, samples in enumerate(samples_per_shard)]
    write_manifest(directory, Manifest(tokenizer_sha256=SHA, vocab_size=vocab, eos_id=0, shards=shards))
    return directory


def test_round_trip_keeps_ids_above_65535_and_is_real_webdataset(tmp_path):
    samples = [np.array([70_000, 99_999, 0], dtype=np.uint32), np.arange(5, dtype=np.uint32)]
    data = make_dataset(tmp_path / "d", [samples])
    assert [s.tolist() for s in read_shard(data / shard_name(0))] == [s.tolist() for s in samples]
    keys = [item["__key__"] for item in wds.WebDataset(str(data / shard_name(0)), shardshuffle=False)]
    assert keys == ["shard-000000-00000000", "shard-000000-00000001"]
    assert read_manifest(data).tokens == 8


def test_token_id_at_or_above_the_vocabulary_names_shard_and_offset(tmp_path):
    data = make_dataset(tmp_path / "d", [[np.array([1, 2], dtype=np.uint32),
                                          np.array([3, 500], dtype=np.uint32)]])
    with pytest.raises(ShardError, match=r"shard-000000\.tar at byte \d+ .*token 1\): id 500 >= vocabulary size 500"):
        read_shard(data / shard_name(0), vocab_size=500)
    assert len(read_shard(data / shard_name(0), vocab_size=501)) == 2


def test_corrupt_and_truncated_shards_are_named(tmp_path):
    data = make_dataset(tmp_path / "d", [[np.arange(4000, dtype=np.uint32)]])
    shard = data / shard_name(0)
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ShardError, match="shard-000000.tar at byte .*corrupt or truncated"):
        read_shard(shard)
    shard.write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(ShardError, match="shard-000000.tar"):
        read_shard(shard)


def test_manifest_that_does_not_match_its_shards_is_refused(tmp_path):
    data = make_dataset(tmp_path / "d", [[np.arange(10, dtype=np.uint32)], [np.arange(3, dtype=np.uint32)]])
    with open(data / shard_name(1), "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardError, match="shard-000001.tar: .* bytes but .*manifest.json records"):
        read_manifest(data)
    (data / shard_name(1)).unlink()
    with pytest.raises(ShardError, match="shard-000001.tar: listed in .* but missing"):
        read_manifest(data)
    (data / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest; prepare the data"):
        read_manifest(data)


def test_tokenizer_hash_mismatch_names_the_directory(tmp_path):
    data = make_dataset(tmp_path / "d", [[np.arange(3, dtype=np.uint32)]])
    check_tokenizer(data, read_manifest(data), SHA)
    with pytest.raises(ShardError, match=f"{data}: prepared with tokenizer sha256 cdcdcd"):
        check_tokenizer(data, read_manifest(data), "ef" * 32)


def test_heldout_batches_are_fixed_consecutive_windows(tmp_path):
    stream = np.arange(1000, dtype=np.uint32)
    data = make_dataset(tmp_path / "d", [[stream[:300], stream[300:650]], [stream[650:]]])
    batches = heldout_batches(data, n_batches=3, batch_size=2, seq_len=100, vocab_size=1000,
                              tokenizer_sha256=SHA)
    assert [b.shape for b in batches] == [(2, 100)] * 3
    assert np.array_equal(np.concatenate([b.numpy().ravel() for b in batches]), np.arange(600))
    with pytest.raises(ShardError, match="1000 held-out tokens, but .* = 1200"):
        heldout_batches(data, n_batches=6, batch_size=2, seq_len=100, vocab_size=1000,
                        tokenizer_sha256=SHA)

"""Data preparation (`data_pipeline.prepare`): raw text, JSONL and Parquet into shards and a manifest.

The trainer trusts a directory with a manifest completely, so these tests pin what it may
trust: every document comes back in input order as plain text followed by EOS, samples hold
whole documents, shards close at their size, the manifest agrees with the files, the bytes do
not depend on the worker count, and bad input either fails naming the file and line (leaving
nothing behind) or, with skip_bad, is skipped and counted.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_pipeline.prepare as prepare_module
from data_pipeline.corpus import read_text_document, stdlib_root
from data_pipeline.prepare import PrepareError, prepare
from data_pipeline.shards import MANIFEST, read_manifest, read_shard, verify_checksum
from data_pipeline.tokenizer import padded_vocab_size, train_bpe

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENS_PER_SHARD = 600
SAMPLE_TOKENS = 150
LITERAL_EOS_DOCUMENT = "a web page that quotes <|endoftext|> in its text\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    files = [stdlib_root() / "textwrap.py", stdlib_root() / "heapq.py"]
    return train_bpe(files, 512, tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Inputs of every kind and the documents they hold, in the order prepare must keep."""
    source = read_text_document(stdlib_root() / "textwrap.py")
    root = tmp_path_factory.mktemp("inputs")
    (root / "dir" / "nested").mkdir(parents=True)
    long_document = source[:3000]  # far longer than SAMPLE_TOKENS: a sample of its own
    (root / "dir" / "a.txt").write_bytes(long_document.encode())
    (root / "dir" / "nested" / "b.md").write_bytes("Zürich, 東京\r\nCRLF kept\n".encode())
    (root / "dir" / ".hidden.txt").write_text("hidden files are not inputs")
    jsonl_texts = [source[i : i + 40 + 7 * i] for i in range(0, 600, 50)] + [LITERAL_EOS_DOCUMENT]
    lines = [json.dumps({"id": i, "text": text}) for i, text in enumerate(jsonl_texts)]
    lines.insert(3, json.dumps({"text": "  \n\t"}))  # whitespace only: skipped, counted as empty
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n\n")
    parquet_texts = [source[5000 + 80 * i : 5000 + 80 * i + 30 + 11 * i] for i in range(25)]
    pq.write_table(pa.table({"text": parquet_texts, "n": list(range(25))}), root / "docs.parquet",
                   row_group_size=7)
    inputs = [root / "dir", root / "docs.jsonl", root / "docs.parquet"]
    documents = [long_document, "Zürich, 東京\r\nCRLF kept\n", *jsonl_texts, *parquet_texts]
    return inputs, documents


@pytest.fixture(scope="module")
def dataset(corpus, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset")
    manifest = prepare(corpus[0], tokenizer.path, out, tokens_per_shard=TOKENS_PER_SHARD,
                       sample_tokens=SAMPLE_TOKENS, workers=1, progress=False)
    return out, manifest


def shard_samples(out: Path) -> list[list[np.ndarray]]:
    return [read_shard(out / info.name) for info in read_manifest(out).shards]


def split_at_eos(sample: np.ndarray, eos_id: int) -> list[np.ndarray]:
    ends = np.flatnonzero(sample == eos_id)
    return np.split(sample, ends + 1)[:-1]


def decoded_documents(out: Path, tokenizer) -> list[str]:
    return [tokenizer.decode(doc[:-1].tolist()) for samples in shard_samples(out) for sample in samples
            for doc in split_at_eos(sample, tokenizer.eos_id)]


def test_documents_round_trip_in_input_order(dataset, corpus, tokenizer):
    out, manifest = dataset
    assert decoded_documents(out, tokenizer) == corpus[1]
    assert manifest.skipped == {"empty": 1}
    assert len(manifest.shards) > 2


def test_samples_hold_whole_documents_ending_with_eos(dataset, tokenizer):
    out, _ = dataset
    eos = tokenizer.eos_id
    for samples in shard_samples(out):
        for sample in samples:
            assert sample[-1] == eos
            if len(sample) > SAMPLE_TOKENS:  # only a document longer than a sample may exceed it
                assert np.count_nonzero(sample == eos) == 1


def test_shards_close_when_they_reach_tokens_per_shard(dataset):
    out, manifest = dataset
    all_samples = shard_samples(out)
    for info, samples in zip(manifest.shards[:-1], all_samples[:-1]):
        assert info.tokens >= TOKENS_PER_SHARD
        assert info.tokens - len(samples[-1]) < TOKENS_PER_SHARD
    assert 0 < manifest.shards[-1].tokens


def test_manifest_matches_shards_and_tokenizer(dataset, corpus, tokenizer):
    out, manifest = dataset
    assert read_manifest(out) == manifest
    assert (manifest.tokenizer_sha256, manifest.vocab_size, manifest.eos_id) == (
        tokenizer.sha256, tokenizer.vocab_size, tokenizer.eos_id)
    for info, samples in zip(manifest.shards, shard_samples(out)):
        verify_checksum(out, info)
        assert info.samples == len(samples)
        assert info.tokens == sum(len(s) for s in samples)
        assert info.documents == sum(int(np.count_nonzero(s == tokenizer.eos_id)) for s in samples)
    assert manifest.documents == len(corpus[1])
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [s.name for s in manifest.shards])


def test_literal_special_token_in_text_is_not_eos(dataset, tokenizer):
    [ids] = tokenizer.encode_text([LITERAL_EOS_DOCUMENT])
    assert tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == LITERAL_EOS_DOCUMENT
    assert tokenizer.eos_id in tokenizer.encode(LITERAL_EOS_DOCUMENT)  # `encode` keeps its behaviour
    assert LITERAL_EOS_DOCUMENT in decoded_documents(dataset[0], tokenizer)


def test_encode_text_survives_pickling_to_workers(tokenizer):
    tokenizer.encode_text(["warm the plain-text copy"])
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.encode_text([LITERAL_EOS_DOCUMENT]) == tokenizer.encode_text([LITERAL_EOS_DOCUMENT])


def test_output_bytes_do_not_depend_on_workers_or_time(corpus, tokenizer, dataset, tmp_path):
    time.sleep(1.01 - time.time() % 1)  # another wall-clock second than the dataset fixture's run
    prepare(corpus[0], tokenizer.path, tmp_path, tokens_per_shard=TOKENS_PER_SHARD,
            sample_tokens=SAMPLE_TOKENS, workers=2, progress=False)
    one_worker, two_workers = dataset[0], tmp_path
    names = sorted(p.name for p in one_worker.iterdir())
    assert names == sorted(p.name for p in two_workers.iterdir())
    differing = [n for n in names if (one_worker / n).read_bytes() != (two_workers / n).read_bytes()]
    assert differing == [], "shard bytes differ between runs: tar mtimes must be fixed in shards.write_shard"


def write_bad_jsonl(path: Path, bad_line: bytes) -> None:
    path.write_bytes(b'{"text": "good one"}\n' + bad_line + b'\n{"text": "good two"}\n')


BAD_INPUTS = {
    "non_utf8_text": ("bad.txt", lambda p: p.write_bytes(b"caf\xe9 au lait"),
                      r"bad\.txt: not valid UTF-8 at byte offset 3", "non_utf8", 1),
    "non_utf8_jsonl_line": ("bad.jsonl", lambda p: write_bad_jsonl(p, b'{"text": "caf\xe9"}'),
                            r"bad\.jsonl:2: not valid UTF-8 at byte offset 34", "non_utf8", 1),
    "not_json": ("bad.jsonl", lambda p: write_bad_jsonl(p, b'{"text": '), r"bad\.jsonl:2: not valid JSON",
                 "bad_json", 1),
    "not_an_object": ("bad.jsonl", lambda p: write_bad_jsonl(p, b'["text"]'), r"bad\.jsonl:2: a JSON list",
                      "bad_json", 1),
    "missing_field": ("bad.jsonl", lambda p: write_bad_jsonl(p, b'{"body": "x"}'),
                      r"bad\.jsonl:2: field 'text' is missing", "missing_field", 1),
    "field_not_a_string": ("bad.jsonl", lambda p: write_bad_jsonl(p, b'{"text": 7}'),
                           r"bad\.jsonl:2: field 'text' holds int", "missing_field", 1),
    "parquet_without_column": ("bad.parquet",
                               lambda p: pq.write_table(pa.table({"body": ["x", "y"]}), p),
                               r"bad\.parquet: no column 'text'", "missing_column", 2),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_fails_naming_the_place_or_is_skipped_and_counted(case, tokenizer, tmp_path):
    name, write, message, reason, count = BAD_INPUTS[case]
    good = tmp_path / "good.txt"
    good.write_text("a good document")
    write(tmp_path / name)
    inputs = [good, tmp_path / name]
    with pytest.raises(PrepareError, match=message):
        prepare(inputs, tokenizer.path, tmp_path / "out", workers=1, progress=False)
    assert list((tmp_path / "out").iterdir()) == []
    manifest = prepare(inputs, tokenizer.path, tmp_path / "out", workers=1, skip_bad=True, progress=False)
    assert manifest.skipped == {reason: count}
    good_documents = 1 + 2 * name.endswith(".jsonl")
    assert manifest.documents == good_documents


def test_missing_input_is_named(tokenizer, tmp_path):
    with pytest.raises(PrepareError, match=r"input not found: .*nowhere\.txt"):
        prepare([tmp_path / "nowhere.txt"], tokenizer.path, tmp_path / "out", skip_bad=True, progress=False)


def test_error_after_shards_were_written_leaves_no_shard_and_no_manifest(tokenizer, tmp_path, monkeypatch):
    written = []
    write_shard = prepare_module.write_shard

    def recording_write_shard(path, samples, documents):
        written.append(path)
        return write_shard(path, samples, documents)

    monkeypatch.setattr(prepare_module, "write_shard", recording_write_shard)
    source = read_text_document(stdlib_root() / "heapq.py")
    lines = [json.dumps({"text": source[i : i + 300]}) for i in range(0, 6000, 300)] + ["not json"]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    with pytest.raises(PrepareError, match=r"docs\.jsonl:21: not valid JSON"):
        prepare([tmp_path / "docs.jsonl"], tokenizer.path, tmp_path / "out", tokens_per_shard=200,
                sample_tokens=100, workers=1, progress=False)
    assert len(written) > 1
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_dataset_is_refused_unless_overwrite(corpus, tokenizer, tmp_path):
    out = tmp_path / "out"
    first = prepare(corpus[0], tokenizer.path, out, tokens_per_shard=TOKENS_PER_SHARD, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PrepareError, match="already holds a prepared dataset.*--overwrite"):
        prepare(corpus[0], tokenizer.path, out, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    second = prepare(corpus[0], tokenizer.path, out, workers=1, overwrite=True, progress=False)
    assert len(first.shards) > 1 and len(second.shards) == 1
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, second.shards[0].name]
    assert read_manifest(out).documents == first.documents


def test_arguments_are_checked(corpus, tokenizer, tmp_path):
    with pytest.raises(PrepareError, match="--sample-tokens must be a positive integer"):
        prepare(corpus[0], tokenizer.path, tmp_path, sample_tokens=0, progress=False)


def test_cli_reports_bad_input_in_one_line_and_exits_2(tokenizer, tmp_path, subprocess_env):
    write_bad_jsonl(tmp_path / "bad.jsonl", b"{oops")
    command = [sys.executable, "-m", "data_pipeline.prepare", "--input", str(tmp_path / "bad.jsonl"),
               "--tokenizer", str(tokenizer.path), "--out", str(tmp_path / "out"), "--workers", "1"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    visible_lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip()]
    assert re.fullmatch(r"prepare error: .*bad\.jsonl:2: not valid JSON.*--skip-bad.*", visible_lines[-1])
    assert sum("prepare error" in line for line in visible_lines) == 1
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_padded_vocab_size_rounds_up_to_the_multiple():
    assert padded_vocab_size(126464, 128) == 126464
    assert padded_vocab_size(126465, 128) == 126592
    assert padded_vocab_size(510, 8) == 512
    assert padded_vocab_size(7, 1) == 7
    with pytest.raises(ValueError, match="positive"):
        padded_vocab_size(100, 0)

"""The demo's data path: stdlib corpus, byte-level BPE contract, packed batches, the 1% variable length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.corpus import read_text_document, stdlib_corpus_files
from data_pipeline.packed import PackedTokens, tokenize_files
from data_pipeline.seeding import keyed_generator
from data_pipeline.tokenizer import SPECIAL_TOKENS, check_fits_model, load_tokenizer, train_bpe
from data_pipeline.variable_length import shorten_batch

SLICE_BYTES = 150_000
VOCAB = 512


@pytest.fixture(scope="module")
def corpus_slice(tmp_path_factory):
    """~300 KB of the corpus as two documents: the start of the prose and the start of the code."""
    files = stdlib_corpus_files(max_bytes=2_000_000)
    prose = read_text_document(files[0])[:SLICE_BYTES]
    code = "".join(read_text_document(path) for path in files[1:30])[:SLICE_BYTES]
    directory = tmp_path_factory.mktemp("corpus")
    paths = [directory / "prose.txt", directory / "code.py"]
    for path, text in zip(paths, (prose, code)):
        path.write_text(text, encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def tokenizer(corpus_slice, tmp_path_factory):
    return train_bpe(corpus_slice, VOCAB, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_corpus_is_deterministic_and_starts_with_prose():
    files = stdlib_corpus_files(max_bytes=3_000_000)
    assert files == stdlib_corpus_files(max_bytes=3_000_000)
    assert len(files) > 10
    assert files[0].as_posix().endswith("pydoc_data/topics.py")
    assert files[1:] == sorted(files[1:])
    assert sum(path.stat().st_size for path in files) <= 3_000_000
    assert not any(part in ("test", "tests", "__pycache__") for path in files for part in path.parts)


def test_corpus_respects_max_bytes():
    small, large = stdlib_corpus_files(max_bytes=1_000_000), stdlib_corpus_files(max_bytes=2_000_000)
    assert large[: len(small)] == small and len(large) > len(small)
    with pytest.raises(ValueError, match="max_bytes"):
        stdlib_corpus_files(max_bytes=1000)


def test_non_utf8_document_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.py"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1\.py.*byte offset 5"):
        read_text_document(path)
    with pytest.raises(FileNotFoundError, match="missing.py"):
        read_text_document(tmp_path / "missing.py")


def test_trained_tokenizer_contract(tokenizer, corpus_slice):
    assert tokenizer.vocab_size <= VOCAB
    ids = tokenizer.special_ids
    assert set(ids) == set(SPECIAL_TOKENS)
    assert len(set(ids.values())) == len(ids)
    assert all(0 <= i < tokenizer.vocab_size for i in ids.values())
    assert (tokenizer.mask_id, tokenizer.eos_id, tokenizer.bos_id) == (ids["mask"], ids["eos"], ids["bos"])
    reloaded = load_tokenizer(tokenizer.path)
    assert reloaded.special_ids == ids and reloaded.sha256 == tokenizer.sha256


def test_roundtrip_of_python_source(tokenizer):
    source = read_text_document(stdlib_corpus_files(max_bytes=2_000_000)[40])[:20_000]
    source += "\n\tdef f(x):\r\n        return  x  # tabs, CRLF, runs of spaces, é ü 漢字\n\n\n"
    encoded = tokenizer.encode(source)
    assert tokenizer.decode(encoded) == source
    assert tokenizer.encode_batch([source, "x = 1\n"]) == [encoded, tokenizer.encode("x = 1\n")]
    assert tokenizer.eos_id not in encoded


def test_decode_can_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("hello") + [tokenizer.mask_id]
    assert tokenizer.decode(ids) == "hello" + SPECIAL_TOKENS["mask"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello"


def test_tokenizer_without_mask_token_is_refused(tokenizer, tmp_path):
    broken = tmp_path / "tokenizer.json"
    broken.write_text(tokenizer.path.read_text().replace("<|mdm_mask|>", "<|not_mask|>"))
    with pytest.raises(ValueError, match=r"<\|mdm_mask\|>.*LLaDA tokenizer\.json") as err:
        load_tokenizer(broken)
    assert str(broken) in str(err.value)


def test_check_fits_model(tokenizer):
    check_fits_model(tokenizer, tokenizer.vocab_size)
    with pytest.raises(ValueError, match="model.vocab_size"):
        check_fits_model(tokenizer, tokenizer.vocab_size - 1)


def test_tokenize_files_ends_each_document_with_one_eos(tokenizer, tmp_path):
    documents = ["def f():\n    return 1\n", "Plain English prose.\n\n", "x = [1, 2]\n"]
    paths = []
    for i, text in enumerate(documents):
        paths.append(tmp_path / f"doc{i}.py")
        paths[-1].write_text(text, encoding="utf-8")
    for workers in (1, 2):
        stream = tokenize_files(tokenizer, paths, workers=workers)
        assert stream.dtype == np.uint32
        eos_positions = np.flatnonzero(stream == tokenizer.eos_id)
        assert len(eos_positions) == len(documents) and eos_positions[-1] == len(stream) - 1
        pieces = np.split(stream, eos_positions[:-1] + 1)
        assert [tokenizer.decode(piece[:-1].tolist()) for piece in pieces] == documents


def make_packed(seq_len=16, heldout_fraction=0.1, n_tokens=10_000):
    return PackedTokens(np.arange(n_tokens, dtype=np.uint32), heldout_fraction, seq_len)


def test_train_batch_is_keyed():
    packed = make_packed()
    batch = packed.train_batch(8, seed=1, step=3, micro_step=0, dp_rank=0)
    assert batch.dtype == torch.int64 and batch.shape == (8, 16)
    assert torch.equal(batch, packed.train_batch(8, seed=1, step=3, micro_step=0, dp_rank=0))
    for other in ({"step": 4, "micro_step": 0, "dp_rank": 0}, {"step": 3, "micro_step": 1, "dp_rank": 0},
                  {"step": 3, "micro_step": 0, "dp_rank": 1}):
        assert not torch.equal(batch, packed.train_batch(8, seed=1, **other))
    assert torch.all(batch[:, 1:] - batch[:, :-1] == 1)  # contiguous windows of the stream


def test_heldout_batches_are_fixed_and_apart_from_training():
    packed = make_packed()
    batches = packed.heldout_batches(n_batches=3, batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(batches, packed.heldout_batches(n_batches=3, batch_size=4)))
    heldout = torch.cat(batches).flatten()
    assert heldout.unique().numel() == heldout.numel()
    first_heldout = int(heldout.min())
    for step in range(50):
        assert int(packed.train_batch(8, seed=0, step=step, micro_step=0, dp_rank=0).max()) < first_heldout
    with pytest.raises(ValueError, match="data.heldout_fraction"):
        packed.heldout_batches(n_batches=100, batch_size=4)


def test_too_short_parts_are_refused():
    with pytest.raises(ValueError, match=r"data\.heldout_fraction.*data\.seq_len"):
        make_packed(seq_len=16, heldout_fraction=0.001)
    with pytest.raises(ValueError, match=r"training part.*data\.seq_len"):
        make_packed(seq_len=2000, heldout_fraction=0.9)


def test_shorten_batch_extremes():
    batch = torch.arange(4 * 32).reshape(4, 32)
    for key in range(50):
        cut = shorten_batch(batch, keyed_generator(0, "len", key), prob=1.0)
        assert 1 <= cut.shape[1] <= 32 and torch.equal(cut, batch[:, : cut.shape[1]])
        assert shorten_batch(batch, keyed_generator(0, "len", key), prob=0.0) is batch


def test_shorten_batch_rate_and_spread():
    seq_len, draws = 64, 20_000
    batch = torch.zeros(1, seq_len, dtype=torch.long)
    lengths = [shorten_batch(batch, keyed_generator(7, "len", i), prob=0.01).shape[1] for i in range(draws)]
    shortened = [length for length in lengths if length < seq_len]
    # ~1% of draws (expected 200, sd 14); a cut to L itself is indistinguishable and rare.
    assert 130 <= len(shortened) <= 270
    quarters = np.histogram(shortened, bins=4, range=(1, seq_len))[0]
    assert all(count >= 20 for count in quarters)

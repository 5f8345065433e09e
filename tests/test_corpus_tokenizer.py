"""The embedded corpus (this interpreter's standard library), its held-out split, and the tokenizer contract."""

from __future__ import annotations

import pytest

from data_pipeline.corpus import read_text_document, split_heldout, stdlib_corpus, stdlib_corpus_files
from data_pipeline.tokenizer import SPECIAL_TOKENS, check_fits_model, load_tokenizer, train_bpe

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
    # special-token-free text: the batched plain-text encoder gives `encode`'s ids
    assert tokenizer.encode_text([source, "x = 1\n"]) == [encoded, tokenizer.encode("x = 1\n")]
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


def test_heldout_files_are_spread_and_disjoint():
    files = stdlib_corpus_files(2_000_000)
    train, heldout = split_heldout(files, 0.1)
    assert heldout == files[9::10]
    assert set(train).isdisjoint(heldout) and len(train) + len(heldout) == len(files)
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_heldout(files[:3], 0.1)


def test_stdlib_corpus_writes_the_prose_as_plain_text(tmp_path):
    files = stdlib_corpus(tmp_path, 2_000_000)
    assert files[0] == tmp_path / "pydoc_topics.txt"
    prose = files[0].read_text()
    assert prose.startswith('The "assert" statement')  # not the Python source that holds it
    assert "topics = {" not in prose
    assert len(prose) > 100_000
    assert files[1:] == stdlib_corpus_files(2_000_000)[1:]

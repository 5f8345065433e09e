"""The tokenizer contract: special tokens are found by their strings, never by hard-coded ids.

The released LLaDA tokenizer.json and a byte-level BPE trained here for the demo are used the
same way: `load_tokenizer` reads the special ids from the file by the released strings, the
trainer checks them against `model.vocab_size` at start (`check_fits_model`), and shard
manifests carry `sha256` so data tokenized with one tokenizer is never trained with another.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.corpus import read_text_document

SPECIAL_TOKENS = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "mask": "<|mdm_mask|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eot": "<|eot_id|>",
}
BYTE_ALPHABET_SIZE = 256


class TokenizerInfo:
    """A loaded tokenizer.json with its special ids, size and content hash."""

    def __init__(self, tokenizer: Tokenizer, path: pathlib.Path, sha256: str):
        self.tokenizer = tokenizer
        self.path = path
        self.sha256 = sha256
        self.special_ids = _read_special_ids(tokenizer, path)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.max_id = max(tokenizer.get_vocab(with_added_tokens=True).values())

    @property
    def mask_id(self) -> int:
        return self.special_ids["mask"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["eos"]

    @property
    def bos_id(self) -> int:
        return self.special_ids["bos"]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS or other special token is added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_text(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of raw corpus texts, in parallel inside the tokenizers library: special-token
        strings in them (a literal "<|endoftext|>" on a web page) are encoded as the plain text
        they are, never as special ids."""
        return [enc.ids for enc in self._plain_text_tokenizer.encode_batch_fast(list(texts),
                                                                                add_special_tokens=False)]

    @functools.cached_property
    def _plain_text_tokenizer(self) -> Tokenizer:
        """A copy of the tokenizer with `encode_special_tokens` on, so `encode` keeps its behaviour."""
        tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        tokenizer.encode_special_tokens = True
        return tokenizer

    def __getstate__(self) -> dict:
        """Pickle (e.g. to worker processes) without the plain-text copy: the tokenizers library
        does not serialize `encode_special_tokens`, so the copy is rebuilt after unpickling."""
        state = dict(self.__dict__)
        state.pop("_plain_text_tokenizer", None)
        return state


    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | os.PathLike) -> TokenizerInfo:
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file not found: {path}") from None
    tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    return TokenizerInfo(tokenizer, path, hashlib.sha256(data).hexdigest())


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple`, so an embedding table (or LM head)
    splits evenly over tensor-parallel ranks (and keeps aligned, e.g. multiple = 128 x TP)."""
    if vocab_size < 1 or multiple < 1:
        raise ValueError(f"vocab_size and multiple must be positive, got {vocab_size} and {multiple}")
    return -(-vocab_size // multiple) * multiple


def check_fits_model(info: TokenizerInfo, model_vocab_size: int) -> None:
    """Refuse a model whose embedding has no row for some of the tokenizer's ids."""
    if info.max_id >= model_vocab_size:
        raise ValueError(
            f"tokenizer {info.path} has ids up to {info.max_id} but model.vocab_size is "
            f"{model_vocab_size}: set model.vocab_size >= {info.max_id + 1} or use a smaller tokenizer"
        )


def train_bpe(files: Sequence[str | os.PathLike], vocab_size: int, out_path: str | os.PathLike) -> TokenizerInfo:
    """Train a byte-level BPE on `files`, write it atomically to `out_path`, and load it back.

    Byte level (pre-tokenizer and decoder) with the full 256-byte alphabet makes every text
    encodable and `decode(encode(text)) == text`, whitespace and newlines included. The six
    special tokens count towards `vocab_size`, which bounds the total.
    """
    minimum = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE: need at least {minimum}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    documents = (read_text_document(path) for path in files)
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(files))
    out_path = pathlib.Path(out_path)
    _save_atomically(tokenizer, out_path)
    return load_tokenizer(out_path)


def _save_atomically(tokenizer: Tokenizer, out_path: pathlib.Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        tokenizer.save(str(tmp_path))
        os.replace(tmp_path, out_path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _read_special_ids(tokenizer: Tokenizer, path: pathlib.Path) -> dict[str, int]:
    special_ids = {}
    for role, token in SPECIAL_TOKENS.items():
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"{path}: special token {token!r} ({role}) is missing; expected the released "
                "LLaDA tokenizer.json or one written by data_pipeline.tokenizer.train_bpe"
            )
        special_ids[role] = token_id
    return special_ids

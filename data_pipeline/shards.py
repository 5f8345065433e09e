"""The on-disk format of tokenized pretraining data: webdataset tar shards plus a manifest.

A dataset directory holds `shard-000000.tar`, `shard-000001.tar`, ... and `manifest.json`.
Each shard is a plain webdataset tar: one sample per group of whole documents, its member
`<key>.tokens.npy` a 1-D uint32 array (ids above 65535 fit) in which every document is
followed by EOS. The manifest names every shard with its byte size, sha256, sample, document
and token counts, and the tokenizer's sha256, vocabulary size and EOS id, so a reader can
check the data against the files and against the tokenizer it trains with before it starts.

Shards and the manifest are written under temporary names and renamed into place, and the
manifest is written last: a directory with a manifest is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

FORMAT = "llada-shards/1"
MANIFEST = "manifest.json"
TOKENS_MEMBER = "tokens.npy"


class ShardError(ValueError):
    """Bad data on disk; the message names the file (and offset) and the fix."""


@dataclass
class ShardInfo:
    name: str
    bytes: int
    sha256: str
    samples: int
    documents: int
    tokens: int


@dataclass
class Manifest:
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _npy_bytes(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tokens, dtype=np.uint32), allow_pickle=False)
    return buf.getvalue()


def write_shard(path: Path, samples: Sequence[np.ndarray], documents: int) -> ShardInfo:
    """Write `samples` (uint32 token arrays) as one webdataset tar, atomically."""
    import webdataset as wds

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with wds.TarWriter(str(tmp), mtime=0) as sink:  # no timestamps: same data, same bytes
            for i, tokens in enumerate(samples):
                sink.write({"__key__": f"{path.stem}-{i:08d}", TOKENS_MEMBER: _npy_bytes(tokens)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ShardInfo(name=path.name, bytes=path.stat().st_size, sha256=file_sha256(path),
                     samples=len(samples), documents=documents,
                     tokens=int(sum(len(s) for s in samples)))


def write_manifest(directory: Path, manifest: Manifest) -> None:
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(asdict(manifest), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(directory: str | os.PathLike, *, verify_sizes: bool = True) -> Manifest:
    """Load and check a dataset directory's manifest (every shard present, sizes as recorded)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: no manifest; prepare the data with `python -m data_pipeline.prepare` "
                         f"(a directory without a manifest is incomplete)")
    try:
        raw = json.loads(path.read_text())
        shards = [ShardInfo(**s) for s in raw.pop("shards")]
        manifest = Manifest(shards=shards, **raw)
    except (ValueError, TypeError, KeyError) as e:
        raise ShardError(f"{path}: not a valid manifest ({e}); prepare the data again") from None
    if manifest.format != FORMAT:
        raise ShardError(f"{path}: format {manifest.format!r}, expected {FORMAT!r}")
    if verify_sizes:
        for s in manifest.shards:
            shard = directory / s.name
            if not shard.is_file():
                raise ShardError(f"{shard}: listed in {path} but missing; restore it or prepare the data again")
            if shard.stat().st_size != s.bytes:
                raise ShardError(f"{shard}: {shard.stat().st_size} bytes but {path} records {s.bytes}; "
                                 f"the shard or the manifest is stale or truncated: prepare the data again")
    return manifest


def checksum_error(shard: Path, expected: str, found: str) -> ShardError:
    return ShardError(f"{shard}: sha256 {found} but the manifest records {expected}; the shard was "
                      f"corrupted or modified since prepare: restore it or prepare the data again")


def verify_checksum(directory: Path, info: ShardInfo) -> None:
    shard = Path(directory) / info.name
    actual = file_sha256(shard)
    if actual != info.sha256:
        raise checksum_error(shard, info.sha256, actual)


def read_shard(path: str | os.PathLike, vocab_size: int | None = None,
               sha256: str | None = None) -> list[np.ndarray]:
    """Every sample of one shard, in order, as uint32 arrays; errors name the shard and the
    byte offset. With `vocab_size`, a token id at or above it is an error. With `sha256`, the
    file's bytes (read once, hashed, then decoded) must have that digest before any is decoded."""
    path = Path(path)
    samples: list[np.ndarray] = []
    offset = 0
    try:
        data = path.read_bytes()
        if sha256 is not None:
            found = hashlib.sha256(data).hexdigest()
            if found != sha256:
                raise checksum_error(path, sha256, found)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for member in tar:
                offset = member.offset
                if not member.isfile():
                    continue
                if not member.name.endswith("." + TOKENS_MEMBER):
                    raise ShardError(f"{path} at byte {offset}: unexpected member {member.name!r}; "
                                     f"shards hold only '<key>.{TOKENS_MEMBER}' arrays")
                tokens = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                if tokens.dtype != np.uint32 or tokens.ndim != 1:
                    raise ShardError(f"{path} at byte {offset} ({member.name}): expected a 1-D uint32 "
                                     f"array, got {tokens.dtype} with shape {tokens.shape}")
                if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
                    bad = int(np.argmax(tokens >= vocab_size))
                    raise ShardError(f"{path} at byte {offset} ({member.name}, token {bad}): id "
                                     f"{int(tokens[bad])} >= vocabulary size {vocab_size}; the data was "
                                     f"tokenized with another tokenizer: prepare it again")
                samples.append(tokens)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if isinstance(e, ShardError):
            raise
        raise ShardError(f"{path} at byte {offset}: corrupt or truncated shard ({e}); restore it "
                         f"or prepare the data again") from None
    return samples


def iter_shards(directory: Path, manifest: Manifest, vocab_size: int | None = None, *, verify: bool = True
                ) -> Iterator[tuple[ShardInfo, list[np.ndarray]]]:
    """Each shard's samples in manifest order; with `verify`, each shard's sha256 is checked first."""
    for info in manifest.shards:
        yield info, read_shard(Path(directory) / info.name, vocab_size, info.sha256 if verify else None)


def check_tokenizer(directory: str | os.PathLike, manifest: Manifest, tokenizer_sha256: str) -> None:
    """Refuse data prepared with another tokenizer than the one training uses."""
    if manifest.tokenizer_sha256 != tokenizer_sha256:
        raise ShardError(f"{directory}: prepared with tokenizer sha256 {manifest.tokenizer_sha256}, "
                         f"but training uses {tokenizer_sha256}; prepare the data again with "
                         f"the training tokenizer (or point data.tokenizer at the one it was prepared with)")

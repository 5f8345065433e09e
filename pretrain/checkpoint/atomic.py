"""Files that are complete or absent: written under a temporary name, then renamed.

A checkpoint's small files (`latest`, trainer and rank states), streamed safetensors and the
denoising pictures are all read by other processes or by a later run, which must never see half
a file. Each is written to a hidden temporary sibling (`.NAME.tmp-PID`: per process, never
mistaken for the file), flushed to disk, and moved over `path` with `os.replace`, atomic on one
file system; a failed write leaves no temporary behind. It lives with the checkpoint code, whose
convention it is, below the inference code that also uses it; `data_pipeline` (which may not
import `pretrain`) keeps its own.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """An open temporary sibling of `path` to write; flushed, fsynced and renamed to `path` when
    the block completes, removed if it fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (text or bytes) to `path` through `atomic_file`; returns the path."""
    with atomic_file(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
    return Path(path)

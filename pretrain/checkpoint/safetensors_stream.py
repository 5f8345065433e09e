"""Safetensors files read and written one tensor at a time, without a memory map.

Export, import and weights-only loading move whole models (16 GB at 8B in bf16) between
layouts. `safetensors.safe_open` maps the file, and every page a read touches stays in the
process's resident set until the file is closed; `safetensors.torch.save_file` needs every
tensor of a file in memory at once. Here a file's header is read (or planned) first, then
each tensor is read into, or written from, a buffer of its own size, so a conversion holds
about one tensor at a time. The files are the standard format (8-byte little-endian header
length, JSON header, raw little-endian data) and load with any safetensors reader.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from pretrain.checkpoint.atomic import atomic_file

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
          "F16": torch.float16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 2 ** 20


class SafetensorsError(ValueError):
    """A file that is not valid safetensors, or a directory whose index does not match its files."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype name, shape and absolute byte range."""
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _read_json_header(path: Path) -> tuple[dict, int, int]:
    """(the JSON header, its length, the file size) of one .safetensors file, checked."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"{path}: header length {header_len} does not fit the file "
                                   f"({size} bytes); the file is truncated or not safetensors")
        try:
            return json.loads(f.read(header_len)), header_len, size
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: unreadable header ({e})") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` strings of one .safetensors file ({} when it has none)."""
    return _read_json_header(Path(path))[0].get("__metadata__", {})


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """The tensors of one .safetensors file, in file order, without reading their data."""
    path = Path(path)
    header, header_len, size = _read_json_header(path)
    data_start = 8 + header_len
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
        begin, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        expected = _numel(shape) * DTYPES[meta["dtype"]].itemsize
        if end - begin != expected or data_start + end > size:
            raise SafetensorsError(f"{path}: tensor {name!r} byte range {begin}..{end} does not match "
                                   f"its shape {list(shape)} or lies past the end of the file")
        entries[name] = TensorEntry(name, path, meta["dtype"], shape, data_start + begin, data_start + end)
    return dict(sorted(entries.items(), key=lambda item: item[1].begin))


def read_directory(directory: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of a Hugging Face weights directory: the files its
    `model.safetensors.index.json` lists, or its single `model.safetensors`."""
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if not index_path.is_file():
        if not (directory / SINGLE_NAME).is_file():
            raise SafetensorsError(f"{directory}: neither {INDEX_NAME} nor {SINGLE_NAME}; expected a "
                                   f"directory of safetensors weights")
        return read_header(directory / SINGLE_NAME)
    weight_map = json.loads(index_path.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise SafetensorsError(f"{index_path}: no 'weight_map' object")
    entries = {}
    for file_name in sorted(set(weight_map.values())):
        if not (directory / file_name).is_file():
            raise SafetensorsError(f"{index_path}: lists {file_name}, which is missing")
        for name, entry in read_header(directory / file_name).items():
            if weight_map.get(name) == file_name:
                entries[name] = entry
    missing = sorted(set(weight_map) - set(entries))
    if missing:
        raise SafetensorsError(f"{index_path}: tensors not found in the files it names: "
                               f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return entries


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """One tensor, read into a fresh buffer of exactly its size."""
    buffer = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
    with open(entry.file, "rb") as f:
        f.seek(entry.begin)
        got = f.readinto(memoryview(buffer.numpy()))
    if got != entry.end - entry.begin:
        raise SafetensorsError(f"{entry.file}: tensor {entry.name!r} is truncated")
    return buffer.view(entry.torch_dtype).reshape(entry.shape)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def write_file(path: str | os.PathLike, plan: Iterable[PlannedTensor],
               tensor_of: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write the planned tensors in order, asking `tensor_of(name)` for each one only when its turn
    comes; the file appears under its name only once complete."""
    path = Path(path)
    plan = list(plan)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in plan:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for t in plan:
            tensor = tensor_of(t.name)
            if tensor.dtype != t.dtype or tuple(tensor.shape) != t.shape:
                raise SafetensorsError(f"{path}: tensor {t.name!r} is {tensor.dtype} "
                                       f"{list(tensor.shape)}, planned {t.dtype} {list(t.shape)}")
            f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del tensor


def shard_plan(plan: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors grouped into files of at most `max_shard_bytes` (a larger tensor gets a
    file of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_sharded(directory: str | os.PathLike, plan: list[PlannedTensor],
                  tensor_of: Callable[[str], torch.Tensor], max_shard_bytes: int) -> dict:
    """Hugging Face's sharded layout: `model-0000i-of-0000n.safetensors` files and
    `model.safetensors.index.json` (written last); returns the index."""
    directory = Path(directory)
    shards = shard_plan(plan, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_file(directory / file_name, shard, tensor_of)
        weight_map.update({t.name: file_name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return index


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "KB": 10 ** 3, "MB": 10 ** 6,
             "GB": 10 ** 9, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            number = upper[: -len(unit)].strip()
            break
    else:
        number, factor = upper, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"size {text!r}: expected a number with an optional unit (e.g. 5GB, 500MB)") from None
    if value <= 0:
        raise ValueError(f"size {text!r}: must be positive")
    return value


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n

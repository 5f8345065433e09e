"""Generators keyed by what a draw belongs to, never by global RNG state.

Every random draw in training (masking, t, the 1% length, data order) comes from
`keyed_generator(seed, step, micro_step, dp_rank, ...)`: a resumed run replays bit for bit, the
tensor/pipeline ranks of one data-parallel replica draw the same values, and replicas differ.
"""

from __future__ import annotations

import hashlib

import torch


def keyed_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed mixing `seed` and the keys (stable across processes and platforms)."""
    text = ":".join(str(k) for k in (seed, *keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def keyed_generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(keyed_seed(seed, *keys))
    return gen

"""Benchmark bodies: large files on disk and small in-memory bodies, all unique.

Files are built from one random 1 MiB block, each MiB stamped with its index
and the first 16 bytes with a nonce, so no two MiB are alike, no server can
deduplicate, and restamping the nonce makes a "new" file without rewriting
it. BLAKE3 addresses (needed by blobd's PUT) are computed here, before any
timing starts.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import blake3

MIB = 1024 * 1024


def write_payload(path: Path, size: int) -> None:
    """Write size bytes of incompressible, non-repeating data to path."""
    block = bytearray(os.urandom(MIB))
    with open(path, "wb") as f:
        for index, offset in enumerate(range(0, size, MIB)):
            block[:16] = uuid.uuid4().bytes if index == 0 else block[:16]
            block[16:24] = index.to_bytes(8, "little")
            f.write(block[: min(MIB, size - offset)])


def restamp(path: Path) -> str:
    """Give the file new content (a fresh nonce in its first 16 bytes); return its BLAKE3 hex."""
    with open(path, "r+b") as f:
        f.write(uuid.uuid4().bytes)
    return blake3_file(path)


def blake3_file(path: Path) -> str:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update_mmap(path)
    return hasher.hexdigest()


def small_bodies(count: int, size: int) -> list[tuple[str, bytes, str]]:
    """count unique bodies as (key, body, blake3 hex)."""
    block = os.urandom(size - 16)
    out = []
    for _ in range(count):
        key = uuid.uuid4()
        body = key.bytes + block
        out.append((key.hex, body, blake3.blake3(body).hexdigest()))
    return out

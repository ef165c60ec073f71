"""Local files as S3 bodies: part sizes, parts read and hashed in a thread,
a download streamed to disk and made durable, or through a consumer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Any, BinaryIO, Callable

from .s3errors import S3Error

MiB = 1024 * 1024
MAX_PARTS = 10_000  # S3's ceiling on parts per upload
DOWNLOAD_BUFFER = 1 * MiB  # bytes gathered before one write in a thread


def b64_digest(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


def part_size_for(size: int, part_size: int) -> int:
    """`part_size`, grown in whole MiB when `size` would need over MAX_PARTS."""
    needed = -(-size // MAX_PARTS)
    if needed <= part_size:
        return part_size
    return -(-needed // MiB) * MiB


def open_sized(path: str | os.PathLike[str], size: int) -> BinaryIO:
    """Open `path` for reading, refusing a file whose size is not `size`."""
    source = open(path, "rb")
    actual = os.fstat(source.fileno()).st_size
    if actual != size:
        source.close()
        raise S3Error(f"{path} is {actual} bytes, expected {size}; not uploaded",
                      retryable=False, code="BadDigest")
    return source


def read_part(source: BinaryIO, length: int, whole: Any) -> tuple[bytes, str]:
    """Read up to `length` bytes, fold them into `whole`, and return them with
    their own base64 SHA-256. Runs in a thread."""
    data = source.read(length)
    whole.update(data)
    return data, base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


class ObjectTooLarge(S3Error):
    """An object longer than its reader allowed: never stored whole."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the object is larger than the {limit} bytes expected",
                         retryable=False)


async def stream_to_file(body: Any, path: str | os.PathLike[str],
                         limit: int | None = None) -> int:
    """Copy a response body to `path`, one thread call per DOWNLOAD_BUFFER;
    :class:`ObjectTooLarge` as soon as it passes ``limit`` bytes (a bucket
    that serves more than the blob's size cannot fill the disk)."""
    target = await asyncio.to_thread(open, path, "wb")
    try:
        written, rest = await _pump(body, target.write, limit)
        written += await asyncio.to_thread(_finish_file, target, rest)
    finally:
        await asyncio.to_thread(target.close)
    return written


async def stream_through(body: Any, consume: Callable[[bytearray], object],
                         limit: int | None = None) -> int:
    """Hand a response body to ``consume`` piece by piece (each at most
    about DOWNLOAD_BUFFER bytes, in a thread; the buffer is reused once it
    returns) and return its length; :class:`ObjectTooLarge` past ``limit``."""
    read, rest = await _pump(body, consume, limit)
    if rest:
        await asyncio.to_thread(consume, rest)
    return read + len(rest)


async def _pump(body: Any, consume: Callable[[bytearray], object],
                limit: int | None) -> tuple[int, bytearray]:
    """Gather the body into DOWNLOAD_BUFFER pieces, each handed to
    ``consume`` in a thread, so the event loop never touches them whole.
    Returns the bytes consumed and the last, shorter piece, not consumed
    (the caller finishes with it)."""
    consumed = 0
    buffer = bytearray()
    while chunk := await body.read(DOWNLOAD_BUFFER):
        buffer += chunk
        if limit is not None and consumed + len(buffer) > limit:
            raise ObjectTooLarge(limit)
        if len(buffer) >= DOWNLOAD_BUFFER:
            await asyncio.to_thread(consume, buffer)
            consumed += len(buffer)
            buffer.clear()
    return consumed, buffer


def _finish_file(target: BinaryIO, rest: bytearray) -> int:
    written = target.write(rest)
    target.flush()
    os.fsync(target.fileno())
    return written

"""Local files as S3 bodies: part sizes, parts read and hashed in a thread,
a download streamed to disk and made durable."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Any, BinaryIO

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
    written = 0
    try:
        buffer = bytearray()
        while chunk := await body.read(DOWNLOAD_BUFFER):
            buffer += chunk
            if limit is not None and written + len(buffer) > limit:
                raise ObjectTooLarge(limit)
            if len(buffer) >= DOWNLOAD_BUFFER:
                written += await asyncio.to_thread(target.write, buffer)
                buffer.clear()
        written += await asyncio.to_thread(_finish_file, target, buffer)
    finally:
        await asyncio.to_thread(target.close)
    return written


def _finish_file(target: BinaryIO, rest: bytearray) -> int:
    written = target.write(rest)
    target.flush()
    os.fsync(target.fileno())
    return written

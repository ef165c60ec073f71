"""Serving a blob file: conditional requests, one byte range, sendfile.

``web.FileResponse`` is close, but its ETag is ``mtime-size`` (ours must be
the hash, and stable across restores and heals) and its 416 has no JSON
body; so this module does the RFC 9110 logic itself (the preconditions in
:mod:`blobd.http.conditional`) and then hands the open file to
``loop.sendfile`` exactly as FileResponse does, falling back to
chunked reads in a thread where sendfile is unavailable (TLS, where the
kernel cannot encrypt).

Small blobs (up to ``INLINE_MAX``) are read whole in the same thread call
that opens them and go out with the headers in one write: for them,
sendfile's set-up (a second thread call to close the file, pausing reads,
waiting for the headers to drain) costs more CPU than copying the bytes.
Memory stays bounded: at most ``INLINE_MAX`` per request in flight.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from ..errors import BlobdError
from ..metrics import BODY_BYTES_SENT
from .conditional import Selected, evaluate, range_applies
from .keys import STORE

CACHE_CONTROL = "public, max-age=31536000, immutable"
# Blobs are user content served from the API's origin: never let a browser
# guess a more dangerous type, nor run a stored HTML page's scripts here.
SAFETY_HEADERS = {"X-Content-Type-Options": "nosniff",
                  "Content-Security-Policy": "sandbox"}
INLINE_MAX = 128 * 1024
_FALLBACK_CHUNK = 256 * 1024
_BEYOND = 10 ** 18
_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")


@dataclass(frozen=True)
class BlobFile:
    path: Path
    digest: str
    size: int
    content_type: str
    created_at: float


@functools.lru_cache(maxsize=4096)
def http_date(timestamp: float) -> str:
    """RFC 9110 date of a blob's creation; cached, as a hot blob's never changes."""
    return email.utils.formatdate(timestamp, usegmt=True)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (start, count) of a single byte range, per RFC 9110 section 14.1.2.

    None means "send the whole blob": no header, or one we may ignore
    (another unit, several ranges, bad syntax). Unsatisfiable ranges raise
    416 with ``Content-Range: bytes */size`` (section 15.5.17).
    """
    if not header:
        return None
    unit, equals, range_set = header.strip().partition("=")
    if not equals or unit.lower() != "bytes":  # units are case-insensitive
        return None
    # A list may hold empty elements, which count for nothing (section
    # 5.6.1): "bytes=0-9," is the one range 0-9.
    specs = [spec.strip() for spec in range_set.split(",") if spec.strip()]
    if len(specs) != 1:
        return None
    match = _RANGE_SPEC.fullmatch(specs[0])
    if match is None or (not match[1] and not match[2]):
        return None
    first, last = match[1], match[2]
    if first:
        start = _position(first)
        end = min(_position(last), size - 1) if last else size - 1
        if last and _position(last) < start:
            return None  # an invalid range-spec: ignore the header
        if start >= size:
            raise _unsatisfiable(size)
        return start, end - start + 1
    suffix = _position(last)
    if suffix == 0:
        raise _unsatisfiable(size)
    if size == 0:
        # A non-zero suffix is satisfiable (RFC 9110 section 14.1.1), but no
        # Content-Range can name a part of nothing: the whole (empty) blob.
        return None
    count = min(suffix, size)
    return size - count, count


def _position(digits: str) -> int:
    """A byte position; past 18 digits it is past the end of any blob, and
    int() of thousands of digits would be slow, or refused (a 500)."""
    return int(digits) if len(digits) <= 18 else _BEYOND


def _unsatisfiable(size: int) -> BlobdError:
    return BlobdError("bad_range", f"range not satisfiable for a {size}-byte blob",
                      headers={"Content-Range": f"bytes */{size}"})


@dataclass(frozen=True)
class BlobBody:
    """What a GET sends: the bytes of a small blob (its file already closed)
    or the open file of a larger one, which the caller closes."""
    data: bytes = field(default=b"", repr=False)
    fobj: BinaryIO | None = None


async def send_blob(request: web.Request, blob: BlobFile,
                    body: BlobBody) -> web.StreamResponse:
    """Answer GET/HEAD from a loaded blob; the caller closes ``body.fobj``."""
    selected = Selected.of_blob(blob.digest, blob.created_at)
    headers = {
        "ETag": selected.etag, "Cache-Control": CACHE_CONTROL, "Accept-Ranges": "bytes",
        "Last-Modified": http_date(blob.created_at),
        **SAFETY_HEADERS,
    }
    if not request.app[STORE].config.auth.anonymous_read:
        # The answer depends on the token: a shared cache (CACHE_CONTROL
        # says public) must not hand it to a request without one.
        headers["Vary"] = "Authorization"
    if not evaluate(request.headers, request.method, selected):
        return web.Response(status=304, headers=headers)
    wanted = None
    if range_applies(request.headers, selected):
        wanted = parse_range(request.headers.get("Range"), blob.size)
    start, count = wanted if wanted is not None else (0, blob.size)
    status = 200
    if wanted is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{start + count - 1}/{blob.size}"
    if body.fobj is None and request.method != "HEAD":
        headers["Content-Type"] = blob.content_type
        return web.Response(status=status, headers=headers,
                            body=body.data[start:start + count])
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = blob.content_type
    response.content_length = count
    await response.prepare(request)
    if body.fobj is not None and request.method != "HEAD" and count:
        await _send_bytes(request, response, body.fobj, start, count)
        request[BODY_BYTES_SENT] = count
    await response.write_eof()
    return response


async def _send_bytes(request: web.Request, response: web.StreamResponse,
                      fobj: BinaryIO, start: int, count: int) -> None:
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    # Under TLS the kernel cannot encrypt, and asyncio's own fallback reads
    # 16 KiB per thread hop and seeks on the event loop: use ours instead.
    if transport.get_extra_info("sslcontext") is None and await _sendfile(
            request, transport, fobj, start, count):
        return
    offset = start
    while count > 0:
        chunk = await asyncio.to_thread(os.pread, fobj.fileno(),
                                        min(_FALLBACK_CHUNK, count), offset)
        if not chunk:
            raise OSError(f"{blob_name(fobj)} ended early")
        await response.write(chunk)
        offset += len(chunk)
        count -= len(chunk)


async def _sendfile(request: web.Request, transport: asyncio.Transport, fobj: BinaryIO,
                    start: int, count: int) -> bool:
    """Send with sendfile(2); False where the event loop has none (uvloop)."""
    try:
        await asyncio.get_running_loop().sendfile(transport, fobj, start, count)
    except NotImplementedError:
        return False
    # sendfile bypasses the response writer; count the bytes so the access
    # log's "out" is what went on the wire.
    request.writer.output_size += count
    return True


def blob_name(fobj: BinaryIO) -> str:
    return os.path.basename(getattr(fobj, "name", "blob"))


def load_blob(path: Path, size: int, *, head: bool = False) -> BlobBody | None:
    """Open a blob for a GET (``head``: only check it): a small one is read
    whole and closed, a larger one stays open. None when the file is
    missing or the wrong size. Runs in a thread."""
    fobj = open_blob(path, size)
    if fobj is None:
        return None
    if not head and size > INLINE_MAX:
        return BlobBody(fobj=fobj)
    with fobj:
        data = b"" if head else fobj.read()
    if len(data) != (0 if head else size):
        return None  # shrank between the size check and the read
    return BlobBody(data)


def open_blob(path: Path, size: int) -> BinaryIO | None:
    """Open a blob file for serving; None when it is missing or the wrong
    size (damage the caller reports or heals). Runs in a thread."""
    try:
        fobj = open(path, "rb")
    except FileNotFoundError:
        return None
    if os.fstat(fobj.fileno()).st_size != size:
        fobj.close()
        return None
    return fobj

"""Reading request parameters and JSON bodies; writing timestamps."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any, Callable, Sequence, TypeVar

from aiohttp import web

from ..errors import BlobdError
from ..ingest import body_chunks
from .keys import STORE

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# ASCII digits only (str.isdigit() also takes "²", which int() refuses), and
# few enough that every value fits SQLite's 64-bit integers.
_UINT = re.compile(r"[0-9]{1,18}")
T = TypeVar("T")


def parse_uint(raw: str, what: str) -> int:
    """A non-negative integer from a header, path or query value, or 400."""
    if not _UINT.fullmatch(raw):
        raise BlobdError("bad_request", f"{what}: expected a non-negative integer")
    return int(raw)


def page_params(request: web.Request) -> tuple[int, str | None]:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    limit = int(raw) if _UINT.fullmatch(raw) else 0
    if not 1 <= limit <= MAX_LIMIT:
        raise BlobdError("bad_request", f"limit: expected an integer from 1 to {MAX_LIMIT}")
    return limit, request.query.get("after") or None


def one_page(rows: Sequence[T], limit: int, cursor: Callable[[T], str]
             ) -> tuple[Sequence[T], str | None]:
    """The page out of ``limit + 1`` rows fetched, and the cursor of the
    next page: None when there is none, also when this page is exactly full."""
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], cursor(rows[limit - 1])


def iso(timestamp: float) -> str:
    """ISO 8601 UTC with a Z, as every timestamp in the API."""
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def read_json(request: web.Request, fields: Sequence[str],
                    max_bytes: int = 64 * 1024) -> dict[str, Any]:
    """The request's JSON object, with no field but ``fields``: one a
    client misspelt ("reference" for "ref") would otherwise be ignored,
    losing what it asked for without a word."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise BlobdError("too_large", f"a JSON body is at most {max_bytes} bytes")
    raw = await _read_body(request, max_bytes)
    try:
        body = json.loads(raw or b"null")
    except ValueError:
        raise BlobdError("bad_request", "the body is not valid JSON") from None
    except RecursionError:
        # Thousands of nested brackets fit in 64 KiB.
        raise BlobdError("bad_request", "the body's JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise BlobdError("bad_request", "the body must be a JSON object")
    unknown = [name for name in body if name not in fields]
    if unknown:
        raise BlobdError("bad_request", f"unknown field {unknown[0]!r}; expected some of"
                         f" {', '.join(fields)}")
    return body


async def _read_body(request: web.Request, max_bytes: int) -> bytes:
    """The whole body, however many pieces it comes in (one read returns
    only what has arrived so far, found by review: a body split over two
    packets was 'not valid JSON'), stopping past ``max_bytes``. A body that
    goes silent ends after ``[uploads] idle_timeout_seconds``, as an upload's
    does; before, it held its connection and task for as long as the client
    liked."""
    idle = request.app[STORE].config.uploads.idle_timeout_seconds
    raw = bytearray()
    async for chunk in body_chunks(request.content, idle):
        raw += chunk
        if len(raw) > max_bytes:
            raise BlobdError("too_large", f"a JSON body is at most {max_bytes} bytes")
    return bytes(raw)

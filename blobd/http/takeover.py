"""Taking a large request body away from aiohttp, to read it off the socket.

Which requests qualify, and what that costs the connection; the reading
itself is :mod:`blobd.sockbody`. Once a body is taken, aiohttp's parser
never sees the rest of it, so it could not find where the next request on
the connection starts: the response goes out with ``Connection: close``
(see :func:`close_after`), and the client opens a new connection for its
next request, which for a multi-megabyte upload costs nothing measurable.
"""

from __future__ import annotations

import os
import socket

from aiohttp import web
from aiohttp.web_request import BaseRequest

from .. import sockbody
from ..sockbody import SocketBody
from .keys import STORE

# Bodies at least this long are taken: smaller ones are over before the
# threads would pay for themselves, and most fit in aiohttp's buffers.
MIN_SIZE = 8 << 20
_TAKEN = web.RequestKey("body_taken", SocketBody)


def take_body(request: web.Request) -> SocketBody | None:
    """The request's body to read from its socket, or None when it must go
    through aiohttp (no declared length, too short, content-encoded, TLS,
    not a TCP socket, or sockbody.MAX_BODIES being read already)."""
    length = request.content_length
    if (length is None or length < MIN_SIZE or "Transfer-Encoding" in request.headers
            or content_encoded(request)):
        return None
    transport = request.transport
    if transport is None or transport.is_closing():
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM:
        return None
    content = request.content
    if content.exception() is not None or content.is_eof():
        return None
    if not sockbody.reserve():
        return None
    try:
        fd = os.dup(sock.fileno())
    except OSError:  # out of descriptors: aiohttp can still receive it
        sockbody.unreserve()
        return None
    # Whatever aiohttp already holds, then no more reads by the event loop.
    # Draining its stream can resume its paused parser, which then moves
    # bytes it held into the stream at once: drain until nothing comes.
    # Marking the stream ended (so aiohttp does not linger reading it after
    # the response) resumes the transport too, so pause it only then.
    # Nothing arrives from the socket meanwhile: there is no await.
    pieces = []
    while piece := content.read_nowait(-1):
        pieces.append(piece)
    content.feed_eof()
    transport.pause_reading()
    body = SocketBody(fd, b"".join(pieces), length, holds_slot=True,
                      idle=request.app[STORE].config.uploads.idle_timeout_seconds)
    request[_TAKEN] = body
    return body


def content_encoded(request: web.Request) -> bool:
    """Whether the body comes with a Content-Encoding (gzip, deflate, br),
    which aiohttp decodes while it receives."""
    return request.headers.get("Content-Encoding", "identity").strip().lower() != "identity"


def close_after(request: web.Request, response: web.StreamResponse) -> None:
    """Make the response to a request whose body was taken the last one on
    its connection (success and error responses alike)."""
    if request.get(_TAKEN) is not None:
        response.force_close()


def received_bytes(request: BaseRequest) -> int:
    """How many body bytes the request has received, wherever they went."""
    taken = request.get(_TAKEN)
    if taken is not None:
        return taken.received
    return getattr(request.content, "total_bytes", 0)

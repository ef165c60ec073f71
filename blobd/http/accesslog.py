"""The request log: one line per request.

    PUT /blobs/9f2c… 201 52.3ms in=4012345 out=312 owner=alice from=192.168.1.20

``in`` is the request body bytes received, ``out`` the bytes written for
the response (status line and headers included). A request cut off before
it was answered (the client hung up, or the shutdown timeout came) is
logged with ``-`` for the status and ``aborted`` at the end. A request
the HTTP parser refused has its line from :mod:`blobd.http.protocolerrors`
instead, with the reason (this log would only know it as ``UNKNOWN /``).

Never a secret: tokens travel only in the Authorization header, which is not
logged, and the query string is left out (a client may put anything there).
The path is logged as received, percent-encoded, with anything outside
printable ASCII escaped, so one request can never split or forge a line.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

from .keys import PRINCIPAL
from .middleware import Handler
from .takeover import received_bytes

log = logging.getLogger("blobd.access")
_ACCESS_LOG = web.AppKey("access_log", bool)
_LOGGED_ABORTED = web.RequestKey("logged_aborted", bool)
# Set on a request whose one line another module wrote (a malformed request:
# see blobd.http.protocolerrors).
LOGGED = web.RequestKey("logged", bool)


def _safe(text: str) -> str:
    return "".join(c if "!" <= c <= "~" else f"%{ord(c):02X}" for c in text)


def format_line(request: BaseRequest, status: str, seconds: float, sent: int) -> str:
    principal = request.get(PRINCIPAL)
    received = received_bytes(request)
    return (f"{_safe(request.method)} {_safe(request.rel_url.raw_path)} {status} "
            f"{seconds * 1000:.1f}ms in={received} out={sent} "
            f"owner={_safe(principal.owner) if principal else '-'} "
            f"from={request.remote or '-'}")


class AccessLogger(AbstractAccessLogger):
    """aiohttp calls this once a response is complete (or the client left
    while it was written)."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.get(_LOGGED_ABORTED):
            return  # aiohttp's stand-in 500 for a client that is gone
        if request.get(LOGGED):
            return
        self.logger.info("%s", format_line(request, str(response.status), time,
                                           response.body_length))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


@web.middleware
async def log_aborted(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Log a request cut off before its answer: cancelled by the shutdown
    (aiohttp logs nothing then), or its client gone (aiohttp would log a
    500 that was never sent)."""
    started = asyncio.get_running_loop().time()
    try:
        return await handler(request)
    except asyncio.CancelledError:
        _log_aborted(request, started)
        raise
    except ConnectionError:
        if request.transport is None or request.transport.is_closing():
            _log_aborted(request, started)
            request[_LOGGED_ABORTED] = True
        raise


def _log_aborted(request: web.Request, started: float) -> None:
    if request.app[_ACCESS_LOG] and log.isEnabledFor(logging.INFO):
        elapsed = asyncio.get_running_loop().time() - started
        log.info("%s aborted", format_line(request, "-", elapsed, request.writer.output_size))


class QuietClientErrors(logging.Filter):
    """aiohttp logs a malformed request, or a client hanging up mid-request,
    at ERROR with a traceback; for a malformed one it echoes the raw request
    line or header, which may carry a token. Both are the client's doing and
    already logged (by :mod:`blobd.http.protocolerrors`, or as ``aborted``),
    so keep one debug line naming only the kind of error. (The first never
    comes here while protocolerrors' hook is in place: this is for an
    aiohttp without it.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, (HttpProcessingError, ConnectionError)):
            return True
        record.msg, record.args = "%s: %s", (record.getMessage(), type(exc).__name__)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def setup(app: web.Application, access_log: bool) -> None:
    app[_ACCESS_LOG] = access_log
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietClientErrors) for f in server_log.filters):
        server_log.addFilter(QuietClientErrors())

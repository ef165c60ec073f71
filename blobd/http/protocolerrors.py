"""The JSON body for the answers aiohttp gives on its own, outside the middlewares.

Three kinds of answer leave aiohttp without passing the error middleware:

- a request its HTTP parser cannot read (a header line over 8190 bytes, a
  bad ``Content-Length``, TLS sent to the plain port): aiohttp answers
  ``RequestHandler.handle_error``'s plain-text 400, which echoes the
  client's bytes, and logs a traceback for each;
- an ``HTTPException`` raised before the middlewares run: the default
  ``Expect`` handler of a path no route has (or a method it lacks) answers
  ``Expect: foo`` with a plain-text 417;
- an exception that escapes the middlewares: a plain-text 500.

aiohttp has no public hook for the first (its issue #3287, open since 2018),
so this module overrides private parts of aiohttp 3.9 to 3.14, here alone:

- ``Application._make_handler`` builds the app's ``web.Server``, whichever
  runner serves it (``blobd serve``, a worker, a test's client): wrapped on
  this one app, so other aiohttp servers in the process keep their ways;
- ``web.Server.__call__`` makes one ``RequestHandler`` per connection: the
  server becomes a :class:`JsonErrorServer`, which makes ours, and its
  ``request_handler`` (the app's) is wrapped to catch the ``HTTPException``;
- ``RequestHandler.handle_error(request, status, exc, message)`` makes the
  parser's 400 and the 500: :class:`JsonErrorHandler` answers JSON instead,
  with aiohttp's status, closing the connection as aiohttp does.

It fails safe: should a later aiohttp lack one of these (or change
``handle_error``'s parameters), :func:`install` logs a warning and leaves
aiohttp's own answers, and the server starts and serves as before;
tests/test_protocol_errors.py then fails on :func:`missing_hooks`.
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import (BadHttpMessage, BadHttpMethod, BadStatusLine,
                                     ContentEncodingError, HttpProcessingError, InvalidHeader,
                                     InvalidURLError, LineTooLong)
from aiohttp.web_protocol import RequestHandler

from ..errors import BlobdError
from .accesslog import LOGGED
from .middleware import Handler, code_for_status, error_response, http_error_response

log = logging.getLogger("blobd.http")
_HANDLE_ERROR_PARAMETERS = ["self", "request", "status", "exc", "message"]
_SERVER_ATTRIBUTES = ("_loop", "_kwargs", "request_handler")
# llhttp's own words before the echo of the client's bytes:
# "Invalid header value char:\n\n  b'X: a\\x01b'\n        ^".
_PARSER_REASON = re.compile(r"([^\n]+):\n\n  ")
_REASON_CHARS = 60


def missing_hooks() -> list[str]:
    """The private parts of aiohttp this module needs and cannot find."""
    missing = []
    if not callable(getattr(web.Application, "_make_handler", None)):
        missing.append("Application._make_handler")
    if "__call__" not in vars(web.Server):
        missing.append("Server.__call__")
    handle_error = getattr(RequestHandler, "handle_error", None)
    if (handle_error is None
            or list(inspect.signature(handle_error).parameters) != _HANDLE_ERROR_PARAMETERS):
        missing.append("RequestHandler.handle_error(request, status, exc, message)")
    return missing


def install(app: web.Application) -> bool:
    """Make the servers built for ``app`` answer JSON; False (and a
    warning) where this aiohttp lacks the hooks."""
    missing = missing_hooks()
    if missing:
        _cannot(", ".join(missing))
        return False
    make_handler = app._make_handler

    def make_server(*args: Any, **kwargs: Any) -> web.Server:
        return _adopt(make_handler(*args, **kwargs))

    # On the instance: aiohttp discourages subclassing Application (a
    # DeprecationWarning), and under python -X dev warns of this too.
    app._make_handler = make_server  # type: ignore[method-assign]
    return True


def _cannot(what: str) -> None:
    log.warning("aiohttp %s has no %s: requests it cannot parse get its own plain-text"
                " answers, not the JSON error body", aiohttp.__version__, what)


def _adopt(server: web.Server) -> web.Server:
    if type(server) is not web.Server or not all(hasattr(server, name)
                                                 for name in _SERVER_ATTRIBUTES):
        _cannot("web.Server with " + ", ".join(_SERVER_ATTRIBUTES))
        return server
    # JsonErrorServer adds no state, only how a connection's handler is made.
    server.__class__ = JsonErrorServer
    server.request_handler = _outermost(server.request_handler)
    return server


class JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        try:
            return JsonErrorHandler(self, loop=self._loop, **self._kwargs)
        except TypeError:
            # A handler argument this aiohttp does not take: its own
            # fallback (which filters them) rather than no connection.
            return super().__call__()


def _outermost(handler: Handler) -> Handler:
    """The app's handler, with an ``HTTPException`` raised before the
    middlewares (the router's default ``Expect`` handler) answered JSON."""
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return http_error_response(exc)
    return handle


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, with the JSON body on its own errors."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):
            # The client left mid-request; the request log has it as aborted.
            log.debug("%s %r: client went away (%s)", request.method,
                      request.rel_url.raw_path, exc)
            error = BlobdError("internal", "internal server error", status=status)
        elif status >= 500:
            # A bug: the one kind that keeps its traceback.
            log.error("%s %r failed outside the error middleware (from %s)",
                      request.method, request.rel_url.raw_path, request.remote,
                      exc_info=exc)
            error = BlobdError(code_for_status(status), "internal server error", status=status)
        else:
            # The client's doing: one line, never its bytes beyond a short
            # printable piece, and no traceback (a LAN scanner sends these
            # by the thousand).
            error = BlobdError(code_for_status(status), describe(exc), status=status)
            log.info("%d %s from %s: %s", status, error.code, request.remote or "-",
                     error.message)
            # This is its line: the request log would only add "UNKNOWN / 400".
            request[LOGGED] = True
        if request.writer.output_size > 0:
            # As aiohttp: part of another answer went out already.
            raise ConnectionError("Response is sent already, cannot send another response"
                                  " with the error message")
        response = error_response(error)
        # What follows on the connection cannot be read as a next request.
        response.force_close()
        return response


def describe(exc: BaseException | None) -> str:
    """A short message for a request the parser refused, in words of our
    own or the parser's, never more than a few printable characters of
    what the client sent."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if isinstance(limit, int):
            return f"a request line or header field is over {limit} bytes"
        return "a request line or header field is too long"
    if isinstance(exc, BadHttpMethod):
        if exc.message.startswith("Received HTTPS traffic"):
            return "TLS (https) sent to a plain-HTTP port"
        return "not an HTTP request: malformed method"
    if isinstance(exc, BadStatusLine):
        return _with_reason("malformed request line", exc)
    if isinstance(exc, InvalidURLError):
        return "malformed request target"
    if isinstance(exc, InvalidHeader):
        return "malformed header field"
    if isinstance(exc, ContentEncodingError):
        return "a Content-Encoding this server cannot decode; send gzip, deflate or none"
    if isinstance(exc, HttpProcessingError):
        return _with_reason("malformed request", exc)
    return "malformed request"


def _with_reason(what: str, exc: HttpProcessingError) -> str:
    found = _PARSER_REASON.search(exc.message)
    if found:
        reason = found.group(1)
    elif type(exc) is BadHttpMessage:
        # aiohttp's own words ("Too many headers received"); its subclasses'
        # messages (the pure-Python parser's) may quote the request line.
        reason = exc.message.partition("\n")[0]
    else:
        return what
    reason = "".join(c if " " <= c <= "~" else "?" for c in reason.strip()).rstrip(".")
    if len(reason) > _REASON_CHARS:
        reason = reason[:_REASON_CHARS] + "..."
    first = reason.partition(" ")[0]
    if first.isalpha() and first[1:].islower():   # "Invalid", not "Transfer-Encoding"
        reason = reason[0].lower() + reason[1:]
    return f"{what}: {reason}" if reason else what

"""Request plumbing shared by every route: errors, auth, ``Expect``.

Handlers declare what they need with :func:`requires`; the auth middleware
enforces it and leaves the caller's :class:`Principal` on the request. The
error middleware is the only place that turns failures into responses.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestPayloadError

from .. import auth, files
from ..errors import STATUS, BlobdError
from . import takeover
from .keys import PRINCIPAL, STORE

log = logging.getLogger("blobd.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CONTINUE_SENT = web.RequestKey("continue_sent", bool)
# Request body codings aiohttp decodes (br only with the Brotli package, which
# the parser refuses without it); identity is no coding at all.
DECODED = frozenset({"identity", "gzip", "deflate"})
_CODE_BY_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "too_large",
                   415: "unsupported_media_type", 416: "bad_range", 412: "precondition_failed",
                   417: "expectation_failed", 503: "unavailable"}


def requires(scope: str | None, *, anonymous_read: bool = False,
             anonymous_metrics: bool = False,
             defer_continue: bool = False) -> Callable[[Handler], Handler]:
    """Declare a handler's scope (None = public). ``anonymous_read`` lets
    ``[auth] anonymous_read`` waive the token (``anonymous_metrics`` the same
    with its own flag); ``defer_continue`` means the handler answers
    ``Expect: 100-continue`` itself."""
    flag = ("anonymous_read" if anonymous_read
            else "anonymous_metrics" if anonymous_metrics else None)

    def mark(handler: Handler) -> Handler:
        handler.blobd_scope = scope  # type: ignore[attr-defined]
        handler.blobd_anonymous_flag = flag  # type: ignore[attr-defined]
        handler.blobd_defer_continue = defer_continue  # type: ignore[attr-defined]
        return handler
    return mark


def principal(request: web.Request) -> auth.Principal:
    return request[PRINCIPAL]


async def no_expect_handler(request: web.Request) -> None:
    """Route-level expect handler: 100 Continue is sent only after auth
    (see :func:`send_continue`), so a rejected upload is never sent."""


def check_expectation(request: web.Request) -> None:
    """417 for an expectation other than ``100-continue`` (RFC 9110 10.1.1);
    for handlers that must refuse it before they change anything."""
    expect = request.headers.get("Expect", "")
    if expect and expect.strip().lower() != "100-continue":
        raise BlobdError("expectation_failed", f"cannot meet Expect: {expect}")


async def send_continue(request: web.Request) -> None:
    """Tell a client waiting on ``Expect: 100-continue`` to send the body."""
    if request.get(_CONTINUE_SENT) or not request.headers.get("Expect", ""):
        return
    check_expectation(request)
    if request.version < HttpVersion11:
        return  # RFC 9110 section 10.1.1: ignored in HTTP/1.0; the body just comes
    request[_CONTINUE_SENT] = True
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0


def expects_continue(request: web.Request) -> bool:
    """The client waits for ``100 Continue`` before it sends the body."""
    return (request.headers.get("Expect", "").strip().lower() == "100-continue"
            and request.version >= HttpVersion11 and not request.get(_CONTINUE_SENT))


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await _respond(request, handler)
    takeover.close_after(request, response)
    if expects_continue(request) and request.body_exists:
        # Answered without inviting the body: should the client send it
        # anyway, it must not be read as the connection's next request.
        response.force_close()
    return response


async def _respond(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BlobdError as exc:
        return error_response(exc)
    except RequestPayloadError as exc:
        if request.transport is None or request.transport.is_closing():
            # The client hung up mid-body: nobody to answer (the request
            # log and metrics have it as aborted).
            raise ConnectionResetError("client went away") from exc
        # The body broke off mid-way in a way the parser noticed: a gzip
        # that does not decode, a malformed chunk. The rest of it can be
        # read neither as body nor as a next request: the connection closes
        # after the answer, and the body counts as ended (aiohttp would
        # otherwise read on after the answer, meet the error again and log
        # it as an unhandled exception).
        request.content.feed_eof()
        response = error_response(BlobdError("bad_request", f"unreadable request body: {exc}"))
        response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_error_response(exc)
    except OSError as exc:
        if files.is_disk_full(exc):
            # A full disk met somewhere no layer mapped it: still the
            # contract's 507, never a 500.
            log.warning("%s %r: %s", request.method, request.rel_url.raw_path, exc)
            return error_response(BlobdError("insufficient_storage", "the disk is full"))
        if request.transport is None or request.transport.is_closing():
            # The request log has it as "aborted" (see accesslog.log_aborted).
            log.debug("%s %r: client went away (%s)", request.method, request.rel_url.raw_path, exc)
            raise
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            # Out of file descriptors (a crowd of listeners, a low ulimit):
            # transient, and a traceback per request buried the log.
            _out_of_descriptors(exc)
            return error_response(BlobdError(
                "unavailable", "the server has too many files open; try again shortly",
                headers={"Retry-After": "1"}))
        log.exception("%s %r failed", request.method, request.rel_url.raw_path)
        return error_response(BlobdError("internal", "internal server error"))
    except Exception:
        log.exception("%s %r failed", request.method, request.rel_url.raw_path)
        return error_response(BlobdError("internal", "internal server error"))


_descriptors_warned_at = -math.inf


def _out_of_descriptors(exc: OSError) -> None:
    """One warning a minute at most, however many requests meet it."""
    global _descriptors_warned_at
    now = time.monotonic()
    if now - _descriptors_warned_at >= 60:
        _descriptors_warned_at = now
        log.warning("out of file descriptors (%s); answering 503 until some are free"
                    " (raise LimitNOFILE / ulimit -n)", exc)


def code_for_status(status: int) -> str:
    """The contract's code for an error status aiohttp chose (a 404 of
    the router, a 400 of its parser)."""
    return _CODE_BY_STATUS.get(status, "internal" if status >= 500 else "bad_request")


def http_error_response(exc: web.HTTPException) -> web.Response:
    """The JSON answer for an error aiohttp raised (404 and 405 of the
    router, 417 of its default ``Expect`` handler): its status, the
    contract's code."""
    return error_response(BlobdError(
        code_for_status(exc.status), exc.reason, status=exc.status,
        headers={k: v for k, v in exc.headers.items() if k == "Allow"}))


def error_response(exc: BlobdError) -> web.Response:
    response = web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="blobd"'
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route_handler: Any = request.match_info.handler
    scope = getattr(route_handler, "blobd_scope", None)
    if scope is not None:
        store = request.app[STORE]
        token = auth.bearer_token(request.headers.get("Authorization"))
        found = (await auth.authenticate(store.db.reader, token, store.tokens)
                 if token else None)
        if found is None:
            flag = getattr(route_handler, "blobd_anonymous_flag", None)
            anonymous_ok = (flag is not None and getattr(store.config.auth, flag)
                            and token is None)
            if not anonymous_ok:
                raise BlobdError("unauthorized", "a valid bearer token is required")
            found = auth.Principal("anonymous", frozenset({scope}))
        if not found.allows(scope):
            raise BlobdError("forbidden", f"this token lacks the {scope!r} scope")
        request[PRINCIPAL] = found
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in DECODED and request.body_exists:
        # aiohttp would hand such a body over still encoded, to be stored
        # as if it were the blob.
        raise BlobdError("unsupported_media_type",
                         f"Content-Encoding {coding!r}: only gzip and deflate are decoded")
    if not getattr(route_handler, "blobd_defer_continue", False):
        await send_continue(request)
    return await handler(request)


assert set(_CODE_BY_STATUS.values()) <= set(STATUS)

"""CORS for the browser origins in ``[server] cors_origins``.

Browser apps (Uppy, tus-js-client, an ``<audio>`` player on another port)
may call the API from those origins only. Preflights (``OPTIONS`` with
``Access-Control-Request-Method``) are answered here, before routing and
auth, since a browser never sends credentials on them, and allow every
request header the API reads (``Content-Encoding`` too: gzip uploads are
documented). Every other response to an allowed origin, errors included,
says which headers the page may read: a tus client must see
``Upload-Offset`` and ``Location``, any client ``Retry-After`` (a busy
upload) and ``WWW-Authenticate`` (a 401). ``"*"`` in the list allows any
origin. Bearer tokens travel in a header, not a cookie, so credentials mode
is never needed.
"""

from __future__ import annotations

from aiohttp import web

from .keys import STORE
from .middleware import Handler

ALLOW_METHODS = "GET, HEAD, PUT, POST, PATCH, DELETE, OPTIONS"
ALLOW_HEADERS = (
    "Authorization, Content-Type, Content-Encoding, Content-MD5, Content-Digest, Blob-Ref, "
    "Range, If-Match, If-None-Match, If-Modified-Since, If-Unmodified-Since, If-Range, "
    "Tus-Resumable, Upload-Length, Upload-Defer-Length, "
    "Upload-Offset, Upload-Metadata, Upload-Checksum, Upload-Concat, "
    "X-HTTP-Method-Override, X-Requested-With")
EXPOSE_HEADERS = (
    "Location, ETag, Content-Range, Content-Length, Accept-Ranges, Blob-Hash, "
    "Tus-Resumable, Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm, "
    "Upload-Offset, Upload-Length, Upload-Defer-Length, Upload-Metadata, "
    "Upload-Expires, Upload-Concat, Retry-After, WWW-Authenticate")
MAX_AGE = "86400"


def allowed_origin(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if not origin:
        return None
    origins = request.app[STORE].config.server.cors_origins
    return origin if origin in origins or "*" in origins else None


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer preflights of allowed origins; everything else passes."""
    origin = allowed_origin(request)
    if (origin is None or request.method != "OPTIONS"
            or "Access-Control-Request-Method" not in request.headers):
        return await handler(request)
    return web.Response(status=204, headers={
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Allow-Headers": ALLOW_HEADERS,
        "Access-Control-Max-Age": MAX_AGE,
        "Vary": "Origin"})


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: runs for every response, streamed blobs and
    errors included, just before its headers go out."""
    if "Access-Control-Allow-Origin" in response.headers:
        return
    if not request.app[STORE].config.server.cors_origins:
        return
    # The answer depends on Origin whether or not this one is allowed: a
    # cache must not hand a copy made for a plain <audio> request (no CORS
    # headers, cached for a year) to a page's fetch() from an allowed origin.
    vary = response.headers.get("Vary")
    # One field, "Authorization, Origin", where the answer varies on both.
    response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
    origin = allowed_origin(request)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS

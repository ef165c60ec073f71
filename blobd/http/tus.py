"""``/tus/``: the tus resumable upload protocol 1.0.0 over upload sessions.

Core protocol plus the ``creation``, ``creation-with-upload``,
``creation-defer-length``, ``termination``, ``checksum``, ``expiration`` and
``concatenation`` extensions (https://tus.io/protocols/resumable-upload),
enough for stock clients (tuspy, tus-js-client, Uppy) to work unchanged.

``Upload-Metadata`` keys understood: ``filename`` (kept), ``filetype`` (the
content type), ``ref`` (a reference name), ``hash`` (the address the bytes
must have). When the last byte arrives the file goes through the one commit
pipeline and the response carries ``Blob-Hash``; so does every later HEAD.

Every response carries ``Tus-Resumable``, errors and OPTIONS included (the
spec exempts OPTIONS *requests* from sending it; its own example answer
has it): :func:`add_marks` adds it, and :func:`middleware` refuses a
request of another protocol version with 412.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import logging
from dataclasses import replace
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from .. import sessionconcat, sessions
from ..address import parse_address, parse_ref_name
from ..describe import normalise_type
from ..errors import BlobdError
from ..sessions import TUS, NewSession, Session
from ..sessionwrite import FINAL_TAKES_NO_PATCH, Check, check_room, receive_at_offset
from ..store import Store, shielded
from .keys import STORE
from .middleware import Handler, check_expectation, principal, requires, send_continue
from .params import parse_uint

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
EXTENSIONS = ("creation,creation-with-upload,creation-defer-length,termination,"
              "checksum,expiration,concatenation")
# Upload-Checksum algorithm -> (hashlib name, digest size); sha1 is mandatory.
CHECKSUMS = {"sha1": ("sha1", 20), "md5": ("md5", 16), "sha256": ("sha256", 32)}
OFFSET_STREAM = "application/offset+octet-stream"
CHECKSUM_MISMATCH = 460  # the checksum extension's own status
PREFIX = "/tus"
# What each kind of target answers (RFC 9110 section 10.2.1: Allow lists
# the methods the target resource supports); POST to an upload is the
# X-HTTP-Method-Override one.
COLLECTION_METHODS = "POST, OPTIONS"
UPLOAD_METHODS = "HEAD, PATCH, DELETE, POST, OPTIONS"


def _is_tus(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if (_is_tus(request.path) and request.method != "OPTIONS"
            and request.headers.get("Tus-Resumable") != TUS_VERSION):
        raise BlobdError("precondition_failed", "this server speaks tus 1.0.0; send"
                         " Tus-Resumable: 1.0.0", headers={"Tus-Version": TUS_VERSION})
    return await handler(request)


async def add_marks(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every answer under /tus/ says which tus it
    speaks, errors of any kind included (a 500 too)."""
    if _is_tus(request.path):
        response.headers["Tus-Resumable"] = TUS_VERSION


@requires(None)
async def options(request: web.Request) -> web.Response:
    store = request.app[STORE]
    return web.Response(status=204, headers={
        "Tus-Version": TUS_VERSION, "Tus-Extension": EXTENSIONS,
        "Tus-Max-Size": str(store.config.limits.max_blob_size),
        "Tus-Checksum-Algorithm": ",".join(CHECKSUMS)})


# -- creation ----------------------------------------------------------------

@requires("write", defer_continue=True)
async def create(request: web.Request) -> web.Response:
    store = request.app[STORE]
    spec = _spec_from_metadata(request)
    concat = _concat(request)
    if concat is not None and concat.startswith("final;"):
        session = await sessionconcat.concatenate(
            store, replace(spec, size=None, concat=concat), _part_ids(concat[6:]))
        return await _created(request, session, has_body=False)
    if concat is not None and concat != "partial":
        raise BlobdError("bad_request", "Upload-Concat: expected partial or final;<urls>")
    size = _length(request)
    if size is not None and size > store.config.limits.max_blob_size:
        raise BlobdError("too_large", f"Upload-Length {size} is over the maximum"
                         f" ({store.config.limits.max_blob_size} bytes)")
    has_body = _has_body(request)
    if has_body:
        # Whatever can refuse the body without reading it, before the upload
        # exists: an error answer leaves nothing behind.
        _require_offset_stream(request)
        _checksums(request)
        check_expectation(request)
    session = await sessions.create_session(store, replace(spec, size=size, concat=concat))
    return await _created(request, session, has_body)


async def _created(request: web.Request, session: Session, has_body: bool) -> web.Response:
    headers = {"Location": f"{PREFIX}/{session.id}"}
    store = request.app[STORE]
    if has_body:
        try:
            await check_room(store, session, request.content_length)
        except BlobdError:
            # Refused before any byte (found by review: the upload stayed,
            # reserving its length, though the answer was an error).
            await sessions.abort_session(store, session)
            raise
    try:
        if has_body:
            session = await receive_at_offset(
                store, session, 0, request.content.iter_any(),
                length=request.content_length, checks=_checksums(request),
                status_on_mismatch=CHECKSUM_MISMATCH,
                invite=functools.partial(send_continue, request))
            headers["Upload-Offset"] = str(session.upload_offset)
        headers.update(await _finish(request, session))
    except _Removed:
        raise
    except BlobdError as exc:
        exc.headers.update(headers)  # the upload exists; the client may resume it
        raise
    except BaseException:
        # No answer, or one without Location (a cut connection, a body the
        # parser could not read, a 500): nobody can ever reach this upload,
        # and tus uploads cannot be listed, so it goes now rather than hold
        # its reservation until it expires.
        await shielded(_forget(store, session))
        raise
    return web.Response(status=201, headers=headers)


async def _forget(store: Store, session: Session) -> None:
    try:
        await sessions.abort_session(store, session)
    except Exception as exc:  # the request has failed already; the sweeper is left
        log.warning("upload %s: could not remove it after its creation failed: %s",
                    session.id, exc)


def _spec_from_metadata(request: web.Request) -> NewSession:
    raw = request.headers.get("Upload-Metadata")
    meta = parse_metadata(raw)
    text = {k: _utf8(k, v) for k, v in meta.items() if k in ("filetype", "ref", "hash")}
    return NewSession(
        owner=principal(request).owner, protocol=TUS, size=None,
        expected=parse_address(text["hash"]) if text.get("hash") else None,
        content_type=normalise_type(text.get("filetype")) or None,
        ref=parse_ref_name(text["ref"]) if text.get("ref") else None,
        metadata=raw if raw and raw.strip() else None)


def parse_metadata(raw: str | None) -> dict[str, bytes]:
    """``key base64,key2 base64,key3``; an empty header is no metadata."""
    meta: dict[str, bytes] = {}
    if raw is None or not raw.strip():
        return meta
    if not raw.isascii():
        # Keys are ASCII and values base64 (the tus spec): anything else in
        # the header is not metadata, and could not be stored as text either.
        raise BlobdError("bad_request", "Upload-Metadata: only ASCII keys and base64 values")
    for pair in raw.split(","):
        parts = pair.strip().split(" ")
        if not parts[0] or len(parts) > 2 or parts[0] in meta:
            raise BlobdError("bad_request", "Upload-Metadata: expected comma-separated"
                             " 'key base64' pairs with distinct keys")
        try:
            meta[parts[0]] = base64.b64decode(parts[1], validate=True) if len(parts) == 2 \
                else b""
        except (binascii.Error, ValueError):
            raise BlobdError("bad_request", f"Upload-Metadata: the value of {parts[0]}"
                             " is not base64") from None
    return meta


def _utf8(key: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BlobdError("bad_request", f"Upload-Metadata: {key} is not UTF-8") from None


def _length(request: web.Request) -> int | None:
    length = request.headers.get("Upload-Length")
    deferred = request.headers.get("Upload-Defer-Length")
    if length is not None and deferred is not None:
        raise BlobdError("bad_request", "send Upload-Length or Upload-Defer-Length, not both")
    if deferred is not None:
        if deferred.strip() != "1":
            raise BlobdError("bad_request", "Upload-Defer-Length: the only value is 1")
        return None
    if length is None:
        raise BlobdError("bad_request", "Upload-Length (or Upload-Defer-Length: 1) is"
                         " required")
    return _non_negative("Upload-Length", length)


def _non_negative(name: str, value: str) -> int:
    return parse_uint(value.strip(), name)


def _concat(request: web.Request) -> str | None:
    """The Upload-Concat header, kept as sent and answered back by HEAD.
    URLs in it are ASCII; a header with other bytes (aiohttp hands them
    over as surrogates) could be neither stored as text nor sent back
    (found by review: a valid part URL followed by such bytes was a 500)."""
    concat = request.headers.get("Upload-Concat")
    if concat is not None and not (concat.isascii() and concat.isprintable()):
        raise BlobdError("bad_request", "Upload-Concat: only printable ASCII")
    return concat


def _part_ids(urls: str) -> list[str]:
    ids = []
    for url in urls.split():
        try:
            path = urlsplit(url).path.rstrip("/")
        except ValueError:  # "http://[x/" and the like
            raise BlobdError("bad_request", f"Upload-Concat: {url} is not a URL") from None
        head, _, upload_id = path.rpartition("/")
        if head != PREFIX or not upload_id:
            raise BlobdError("bad_request", f"Upload-Concat: {url} is not an upload here")
        ids.append(upload_id)
    return ids


def _has_body(request: web.Request) -> bool:
    if request.content_length is not None:
        return request.content_length > 0
    return "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def _require_offset_stream(request: web.Request) -> None:
    if normalise_type(request.headers.get("Content-Type")) != OFFSET_STREAM:
        raise BlobdError("unsupported_media_type",
                         f"upload bytes need Content-Type: {OFFSET_STREAM}")


def _checksums(request: web.Request) -> list[Check]:
    header = request.headers.get("Upload-Checksum")
    if header is None:
        return []
    algorithm, _, encoded = header.strip().partition(" ")
    known = CHECKSUMS.get(algorithm.lower())
    if known is None:
        raise BlobdError("bad_request", f"Upload-Checksum: {algorithm} is not supported;"
                         f" use one of {', '.join(CHECKSUMS)}")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != known[1]:
        raise BlobdError("bad_request", f"Upload-Checksum: not a base64 {algorithm} digest")
    return [Check(known[0], digest)]


# -- one upload --------------------------------------------------------------

async def _session(request: web.Request) -> Session:
    return await sessions.find_session(request.app[STORE], request.match_info["id"],
                                       principal(request).owner, TUS)


def _expires(session: Session) -> dict[str, str]:
    return {"Upload-Expires": email.utils.formatdate(session.expires_at, usegmt=True)}


def _complete(session: Session) -> bool:
    return (not session.is_partial and session.size is not None
            and session.upload_offset >= session.size)


# Commit failures no retry can mend: the bytes, all here, are not the
# declared blob, or are refused as such.
FINAL_FAILURES = frozenset({"digest_mismatch", "unsupported_media_type", "too_large"})


class _Removed(BlobdError):
    """A commit failed for good and its upload was removed (see _finish)."""


async def _finish(request: web.Request, session: Session) -> dict[str, str]:
    """Commit an upload whose last byte is here (again, if a commit was cut
    short); the headers every answer about the upload carries.

    A commit that can never succeed removes the upload before the error is
    answered: tus has no way to list uploads, so one left behind would hold
    its bytes against the owner's quota until it expired."""
    headers = _expires(session)
    if _complete(session):
        store = request.app[STORE]
        try:
            stored = await sessions.commit_session(store, session)
        except BlobdError as exc:
            if exc.code not in FINAL_FAILURES:
                raise
            await sessions.abort_session(store, session)
            raise _Removed(exc.code, f"{exc.message}; the upload is removed",
                           extra=exc.extra, headers=exc.headers,
                           status=exc.status) from exc
        headers["Blob-Hash"] = stored.blob.hash
    return headers


@requires("write")
async def head(request: web.Request) -> web.Response:
    session = await _session(request)
    headers = {"Cache-Control": "no-store", "Upload-Offset": str(session.upload_offset)}
    if session.size is None:
        headers["Upload-Defer-Length"] = "1"
    else:
        headers["Upload-Length"] = str(session.size)
    if session.metadata is not None:
        headers["Upload-Metadata"] = session.metadata
    if session.concat is not None:
        headers["Upload-Concat"] = session.concat
    if session.committed:
        headers["Blob-Hash"] = session.result_hash or ""
        headers.update(_expires(session))
    else:
        headers.update(await _finish(request, session))
    return web.Response(status=200, headers=headers)


@requires("write", defer_continue=True)
async def patch(request: web.Request) -> web.Response:
    _require_offset_stream(request)
    offset = _non_negative("Upload-Offset", request.headers.get("Upload-Offset", ""))
    session = await _session(request)
    checks = _checksums(request)
    new_length = request.headers.get("Upload-Length")
    length = _non_negative("Upload-Length", new_length) if new_length else None
    if session.is_final:  # committed at its creation, but no PATCH is "complete already"
        raise BlobdError("forbidden", FINAL_TAKES_NO_PATCH)
    if length is not None and session.size is not None and length != session.size:
        # tus: "once set, the length MUST NOT be changed"; the same value
        # again is no change. (Checked again under the lock: _fix_length.)
        raise BlobdError("bad_request", f"Upload-Length is {session.size} already;"
                         " once set it cannot change")
    if session.committed:
        if offset != session.upload_offset or _has_body(request):
            raise BlobdError("conflict", "this upload is complete already")
    else:
        if offset != session.upload_offset:  # checked again under the lock
            raise BlobdError("conflict", f"Upload-Offset is {offset}, but the upload"
                             f" stands at {session.upload_offset}")
        await check_room(request.app[STORE], session, request.content_length, length)
        # Invited once the upload is this request's: a body another request
        # holds the upload against is never sent for nothing.
        session = await receive_at_offset(
            request.app[STORE], session, offset, request.content.iter_any(),
            length=request.content_length, checks=checks, new_length=length,
            status_on_mismatch=CHECKSUM_MISMATCH,
            invite=functools.partial(send_continue, request))
    headers = {"Upload-Offset": str(session.upload_offset)}
    if session.committed:
        headers["Blob-Hash"] = session.result_hash or ""
        headers.update(_expires(session))
    else:
        headers.update(await _finish(request, session))
    return web.Response(status=204, headers=headers)


@requires("write")
async def delete(request: web.Request) -> web.Response:
    session = await _session(request)
    await sessions.abort_session(request.app[STORE], session)
    return web.Response(status=204)


@requires("write", defer_continue=True)
async def post_override(request: web.Request) -> web.StreamResponse:
    """``X-HTTP-Method-Override``, for clients that cannot send PATCH or DELETE."""
    method = request.headers.get("X-HTTP-Method-Override", "").upper()
    handlers: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
        "PATCH": patch, "DELETE": delete, "HEAD": head}
    if method not in handlers:
        raise BlobdError("method_not_allowed", "POST to an upload needs"
                         " X-HTTP-Method-Override: PATCH, DELETE or HEAD",
                         headers={"Allow": UPLOAD_METHODS})
    return await handlers[method](request)


@requires(None)
async def other(request: web.Request) -> web.Response:
    """Whatever no route above matched: another method on the collection
    or on an upload URL (405), or a path that is neither (404)."""
    tail = request.match_info.get("tail", "")
    if "/" in tail:
        raise BlobdError("not_found", f"nothing at {request.path}")
    allow = UPLOAD_METHODS if tail else COLLECTION_METHODS
    raise BlobdError("method_not_allowed", f"{request.method} is not part of tus here",
                     headers={"Allow": allow})


def setup(app: web.Application, add: Any) -> None:
    for endpoint in (PREFIX, PREFIX + "/"):
        add("OPTIONS", endpoint, options)
        add("POST", endpoint, create)
        add("*", endpoint, other)
    upload = PREFIX + "/{id}"
    add("OPTIONS", upload, options)
    add("HEAD", upload, head)
    add("PATCH", upload, patch)
    add("DELETE", upload, delete)
    add("POST", upload, post_override)
    add("*", PREFIX + "/{tail:.*}", other)

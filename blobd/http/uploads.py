"""``/uploads``: resumable upload sessions, chunk by chunk.

A client declares the size (and ideally the hash) of a file, sends its
chunks in any order and in parallel, asks what is missing after a network
failure, and completes the session, which commits the file exactly as a
``PUT /blobs/<hash>`` would and answers with the same body.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import time
from dataclasses import replace
from typing import Any

from aiohttp import web

from .. import index_sessions, sessions
from ..address import Address, parse_address, parse_ref_name
from ..describe import normalise_type
from ..errors import BlobdError
from ..sessions import NATIVE, NewSession, Session
from ..sessionwrite import Check, check_chunk, receive_chunk
from ..store import Store
from .blobs import resolve_any, stored_response
from .keys import STORE
from .middleware import principal, requires, send_continue
from .params import iso, parse_uint, read_json

# Content-Digest algorithms (RFC 9530) we check; others are ignored.
_DIGEST_ALGORITHMS = {"sha-256": ("sha256", 32), "sha-512": ("sha512", 64)}


def status_json(session: Session, received: list[int]) -> dict[str, Any]:
    if session.committed:
        received = list(range(session.chunks))
    have = set(received)
    return {
        "id": session.id, "size": session.size, "chunk_size": session.chunk_size,
        "chunks": session.chunks, "received": received,
        "missing": [i for i in range(session.chunks) if i not in have],
        "bytes_received": sum(session.chunk_span(i)[1] for i in received),
        "expires_at": iso(session.expires_at), "hash": session.expected_hash,
        "ref": session.ref, "content_type": session.content_type,
        "blob_hash": session.result_hash,
    }


@requires("write")
async def create_upload(request: web.Request) -> web.Response:
    store = request.app[STORE]
    owner = principal(request).owner
    body = await read_json(request, ("size", "chunk_size", "hash", "ref", "content_type"))
    size = _int_field(body, "size", required=True)
    assert size is not None
    expected = _optional(body, "hash", parse_address)
    ref = _optional(body, "ref", parse_ref_name)
    content_type = normalise_type(_optional(body, "content_type", str)) or None
    chunk_size = _int_field(body, "chunk_size")
    if chunk_size is None:
        chunk_size = sessions.pick_chunk_size(size)
    spec = NewSession(owner=owner, protocol=NATIVE, size=size, chunk_size=chunk_size,
                      expected=expected, content_type=content_type, ref=ref)
    if expected is not None:
        known = await _known_blob(store, spec, expected)
        if known is not None:
            return known
    # Limits first: a size over them is 413 / 507 whatever the chunking.
    await sessions.precheck(store, owner, size)
    sessions.check_chunk_size(size, spec.chunk_size)
    session = await sessions.create_session(store, spec)
    return _created(session)


def _created(session: Session) -> web.Response:
    return web.json_response(status_json(session, []), status=201,
                             headers={"Location": f"/uploads/{session.id}"})


async def _known_blob(store: Store, spec: NewSession,
                      expected: Address) -> web.Response | None:
    """Skip the upload when the server has the content already: the caller
    gets its reference at once, and a session that is complete (every chunk
    received, ``blob_hash`` set), so that a client finds nothing to send and
    its completion answers like a PUT."""
    digest = await resolve_any(store, expected)
    if digest is None:
        return None
    sessions.check_chunk_size(spec.size or 0, spec.chunk_size)
    made = await sessions.create_for_stored(store, spec, digest)
    if made is None:
        return None
    return _created(made[0])


def _int_field(body: dict[str, Any], key: str, required: bool = False) -> int | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BlobdError("bad_request", f"{key}: expected a non-negative integer")
    return value


def _optional(body: dict[str, Any], key: str, parse: Any) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BlobdError("bad_request", f"{key}: expected a string")
    return parse(value)


@requires("write")
async def list_uploads(request: web.Request) -> web.Response:
    """The caller's open sessions, so that a client can find the one to
    resume (by hash and size) without having kept any state."""
    store = request.app[STORE]
    found = await index_sessions.list_open(store.db.reader, principal(request).owner,
                                           NATIVE, time.time())
    # A session whose file is still being allocated is not there yet for
    # anyone else (its creator learns its id once it is).
    present = await asyncio.to_thread(
        lambda: [s for s in found if store.layout.upload_path(s.id).exists()])
    listing = []
    for session in present:
        received = await index_sessions.received(store.db.reader, session.id)
        listing.append(status_json(session, received))
    return web.json_response({"uploads": listing})


async def _session(request: web.Request) -> Session:
    return await sessions.find_session(request.app[STORE], request.match_info["id"],
                                       principal(request).owner, NATIVE)


@requires("write")
async def get_upload(request: web.Request) -> web.Response:
    store = request.app[STORE]
    session = await _session(request)
    received = await index_sessions.received(store.db.reader, session.id)
    return web.json_response(status_json(session, received))


@requires("write", defer_continue=True)
async def put_chunk(request: web.Request) -> web.Response:
    session = await _session(request)
    number = parse_uint(request.match_info["index"], "chunk index")
    checks = chunk_checks(request)
    if session.committed:
        # Complete already (often made so because the server had the
        # content): a chunk sent anyway is as harmless as a repeated one,
        # and its bytes are not wanted (never invited; aiohttp drains
        # what comes regardless).
        check_chunk(replace(session, result_hash=None), number, request.content_length)
        return web.Response(status=204)
    check_chunk(session, number, request.content_length)
    # Only a chunk that can be taken is invited: a phone never sends the
    # bytes of a wrong, finished or busy one.
    await receive_chunk(request.app[STORE], session, number, request.content.iter_any(),
                        length=request.content_length, checks=checks,
                        invite=functools.partial(send_continue, request))
    return web.Response(status=204)


def chunk_checks(request: web.Request) -> list[Check]:
    """``Content-MD5`` (RFC 1864) and ``Content-Digest`` (RFC 9530) of a chunk."""
    checks = []
    md5 = request.headers.get("Content-MD5")
    if md5 is not None:
        checks.append(Check("md5", _b64(md5, 16, "Content-MD5")))
    digest = request.headers.get("Content-Digest")
    if digest is not None:
        for member in digest.split(","):
            key, sep, value = member.strip().partition("=")
            value = value.strip()
            if not sep or not (value.startswith(":") and value.endswith(":")):
                raise BlobdError("bad_request", "Content-Digest: expected"
                                 " <algorithm>=:<base64>:")
            known = _DIGEST_ALGORITHMS.get(key.strip().lower())
            if known is not None:
                checks.append(Check(known[0], _b64(value[1:-1], known[1],
                                                   "Content-Digest")))
    return checks


def _b64(text: str, size: int, header: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise BlobdError("bad_request", f"{header}: not a base64 digest of {size} bytes")
    return raw


@requires("write")
async def complete_upload(request: web.Request) -> web.Response:
    session = await _session(request)
    stored = await sessions.commit_session(request.app[STORE], session)
    return stored_response(stored)


@requires("write")
async def delete_upload(request: web.Request) -> web.Response:
    session = await _session(request)
    await sessions.abort_session(request.app[STORE], session)
    return web.Response(status=204)


def setup(app: web.Application, add: Any) -> None:
    add("POST", "/uploads", create_upload)
    add("GET", "/uploads", list_uploads)
    add("GET", "/uploads/{id}", get_upload)
    add("DELETE", "/uploads/{id}", delete_upload)
    add("PUT", "/uploads/{id}/{index}", put_chunk)
    add("POST", "/uploads/{id}/complete", complete_upload)

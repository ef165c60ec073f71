"""``/blobs``: store, serve, describe, list and release blobs."""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from typing import Any

from aiohttp import web

from .. import index, ingest, reaper, reserve
from ..quotas import small_upload_limit, upload_limit
from ..address import Address, parse_address, parse_ref_name
from ..errors import BlobdError
from ..index import BlobRecord
from ..store import Store, Tx, shielded
from ..mirror.heal import HealError
from ..syncdb import SyncConnection, drive
from .conditional import Selected, evaluate, has_preconditions
from .keys import MIRROR, STORE
from .params import iso, one_page, page_params, parse_uint
from .middleware import expects_continue, principal, requires, send_continue
from .sendblob import BlobBody, BlobFile, load_blob, send_blob
from .takeover import content_encoded, take_body

log = logging.getLogger(__name__)
# A GET that finds a row but no file looks again at once, then once more
# after a DELETE's commit (milliseconds) has had time to land.
RECHECK_PAUSES = (0.0, 0.05)


async def resolve(conn: Any, address: Address) -> BlobRecord | None:
    """The live blob an address names, through the sha256 alias if need be."""
    digest: str | None = address.digest
    if not address.is_blake3:
        digest = await index.hash_for_sha256(conn, address.digest)
    blob = await index.get_blob(conn, digest) if digest else None
    return blob if blob is not None and blob.live else None


async def resolve_or_404(store: Store, address: Address) -> BlobRecord:
    blob = await resolve(store.db.reader, address)
    if blob is None:
        raise BlobdError("not_found", f"no blob {address}")
    return blob


def stored_response(stored: ingest.Stored, *, close: bool = False) -> web.Response:
    headers = {"Location": f"/blobs/{stored.blob.hash}"}
    if close:
        # The body was never read; don't let it arrive on a reused connection.
        headers["Connection"] = "close"
    return web.json_response(stored.to_json(), status=201 if stored.created else 200,
                             headers=headers)


@requires("write", defer_continue=True)
async def put_blob(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    address = parse_address(request.match_info["address"])
    ref = _blob_ref(request)
    owner = principal(request).owner
    precondition = _put_precondition(request)
    if expects_continue(request):
        known = await resolve_any(store, address)
        if known is not None:
            # A decoded body's size is unknown until it is read.
            size = None if content_encoded(request) else request.content_length
            stored = await ingest.add_existing(store, known, owner, ref, size,
                                                precondition=precondition)
            if stored is not None:
                return stored_response(stored, close=True)
    return await _receive_and_commit(request, store, owner, ref, address, precondition)


def _put_precondition(request: web.Request) -> ingest.Precondition | None:
    """A PUT's preconditions as a check of the blob as stored (None when it
    is not live: nobody sees it), or None when the request has none."""
    if not has_preconditions(request.headers):
        return None

    def check(blob: BlobRecord | None) -> None:
        evaluate(request.headers, "PUT", _selected(blob))
    return check


def _selected(blob: BlobRecord | None) -> Selected | None:
    return Selected.of_blob(blob.hash, blob.created_at) if blob is not None else None


@requires("write", defer_continue=True)
async def post_blob(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    ref = _blob_ref(request)
    return await _receive_and_commit(request, store, principal(request).owner, ref, None)


async def _receive_and_commit(request: web.Request, store: Store, owner: str,
                              ref: str | None, address: Address | None,
                              precondition: ingest.Precondition | None = None
                              ) -> web.Response:
    declared = request.content_length
    if content_encoded(request):
        # aiohttp decodes the body (the blob is the decoded bytes); the
        # Content-Length counted the encoded bytes, so it says nothing of
        # the blob's size, which is checked as it streams instead.
        declared = None
    # Checked before any body byte is read, small bodies too: the API
    # promises 413 from Content-Length before the body (tests/test_quotas.py).
    if (declared is not None and declared <= ingest.WRITE_CHUNK
            and not expects_continue(request)):
        limit = await small_upload_limit(store, owner, declared)
    else:
        digest = await resolve_any(store, address) if address is not None else None
        limit = await upload_limit(store, owner, declared, digest,
                                   unknown=address is not None and digest is None,
                                   name=ref if ref is not None else digest)
    if precondition is not None and address is not None:
        # Checked before the body is invited or read (a 412 wastes no
        # upload), and again where the reference is added.
        precondition(await resolve(store.db.reader, address))
    await send_continue(request)
    taken = take_body(request)
    if taken is not None:
        received = await ingest.receive_socket(store, taken, limit=limit)
    else:
        idle = store.config.uploads.idle_timeout_seconds
        received = await ingest.receive(store, ingest.body_chunks(request.content, idle),
                                        limit=limit, declared=declared)
    stored = await ingest.commit_file(store, received, owner=owner, ref=ref,
                                      content_type=request.headers.get("Content-Type"),
                                      expected=address, precondition=precondition)
    return stored_response(stored)


async def resolve_any(store: Store, address: Address) -> str | None:
    """The digest of a stored blob (live or in its grace period), if any."""
    if address.is_blake3:
        return address.digest
    return await index.hash_for_sha256(store.db.reader, address.digest)


def _blob_ref(request: web.Request) -> str | None:
    value = request.headers.get("Blob-Ref")
    return parse_ref_name(value) if value is not None else None


@requires("read", anonymous_read=True)
async def get_blob(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    address = parse_address(request.match_info["address"])
    blob, body = await store.db.read(functools.partial(
        _find_and_load, store, address, request.method == "HEAD"))
    if blob is None:
        raise BlobdError("not_found", f"no blob {address}")
    path = store.layout.blob_path(blob.hash)
    if body is None:
        body = await _heal(request, blob)
    try:
        return await send_blob(request, BlobFile(path, blob.hash, blob.size,
                                                 blob.content_type, blob.created_at), body)
    finally:
        if body.fobj is not None:
            await asyncio.to_thread(body.fobj.close)


def _find_and_load(store: Store, address: Address, head: bool,
                   conn: sqlite3.Connection) -> tuple[BlobRecord | None, BlobBody | None]:
    """Look the blob up and open (or read) its file: one trip to a reader
    thread for the whole GET. Runs there."""
    blob = drive(resolve(SyncConnection(conn), address))
    if blob is None:
        return None, None
    body = load_blob(store.layout.blob_path(blob.hash), blob.size, head=head)
    # No file: most likely a DELETE of the last reference moved it out
    # between the lookup and the open. Until that DELETE commits, the file
    # waits in tmp/ under its deletion name: this GET, which saw the blob
    # live, serves it from there; once it has committed, the blob is gone
    # (404). Only a file missing for neither reason is damage (500).
    for pause in RECHECK_PAUSES:
        if body is not None:
            break
        time.sleep(pause)
        body = _load_leaving(store, blob, head)
        if body is None:
            blob = drive(resolve(SyncConnection(conn), address))
            if blob is None:
                return None, None
            body = load_blob(store.layout.blob_path(blob.hash), blob.size, head=head)
    return blob, body


def _load_leaving(store: Store, blob: BlobRecord, head: bool) -> BlobBody | None:
    """The file of a blob whose deletion is under way (see above), if any."""
    for path in store.layout.trash_paths(blob.hash):
        body = load_blob(path, blob.size, head=head)
        if body is not None:
            return body
    return None


async def _heal(request: web.Request, blob: BlobRecord) -> BlobBody:
    """The blob's file is missing or the wrong size: fetch it back from the
    mirror (verified) and load it, or fail with 500."""
    store, mirror = request.app[STORE], request.app.get(MIRROR)
    if mirror is None:
        log.error("blob %s is indexed but its file is missing or damaged", blob.hash)
        raise BlobdError("internal", "the blob's file is missing or damaged;"
                         " run blobd fsck")
    log.warning("blob %s: file missing or damaged; healing from the mirror", blob.hash)
    try:
        await mirror.healer.heal(blob)
    except HealError as exc:
        log.error("blob %s could not be healed: %s", blob.hash, exc)
        raise BlobdError("internal", "the blob's file is missing or damaged, and"
                         f" {exc.reason}") from None
    body = await asyncio.to_thread(load_blob, store.layout.blob_path(blob.hash), blob.size,
                                   head=request.method == "HEAD")
    if body is None:  # deleted while it was being healed
        raise BlobdError("not_found", f"blob {blob.hash} was deleted")
    return body


@requires("read", anonymous_read=True)
async def get_meta(request: web.Request) -> web.Response:
    store = request.app[STORE]
    blob = await resolve_or_404(store, parse_address(request.match_info["address"]))
    return web.json_response(meta_json(blob))


def meta_json(blob: BlobRecord) -> dict[str, Any]:
    return {"hash": blob.hash, "sha256": blob.sha256, "size": blob.size,
            "content_type": blob.content_type, "created_at": iso(blob.created_at),
            "refcount": blob.refcount, "audio": blob.audio,
            "mirror": {"state": blob.mirror_state}}


@requires("write")
async def delete_blob(request: web.Request) -> web.Response:
    store = request.app[STORE]
    address = parse_address(request.match_info["address"])
    owner = principal(request).owner
    digest = await resolve_any(store, address)
    conditional = has_preconditions(request.headers)

    async def body(tx: Tx) -> int:
        if conditional:
            # Against the blob as the caller sees it, before anything is
            # dropped; holding none of it is 404 whatever they say.
            if not await index.holds(tx.conn, owner, digest or ""):
                return 0
            evaluate(request.headers, "DELETE",
                     _selected(await index.get_blob(tx.conn, digest or "")))
        dropped, zeroed = await index.drop_blob_refs(tx.conn, owner, digest or "",
                                                     time.time())
        await reaper.release_zeroed(store, tx, zeroed)
        return dropped

    if digest is None or not await shielded(reserve.freeing(store, lambda: store.commit(body))):
        raise BlobdError("not_found", f"you hold no reference to {address}")
    return web.Response(status=204)


@requires("read")
async def list_blobs(request: web.Request) -> web.Response:
    store = request.app[STORE]
    limit, after = page_params(request)
    cursor = parse_uint(after, "after (a cursor from this listing)") if after else None
    rows, next_cursor = one_page(
        await index.list_holdings(store.db.reader, principal(request).owner, limit + 1, cursor),
        limit, lambda row: str(row["id"]))
    blobs = [{"hash": r["hash"], "size": r["size"], "content_type": r["content_type"],
              "created_at": iso(r["created_at"]), "audio": index.decode_audio(r["audio"])}
             for r in rows]
    return web.json_response({"blobs": blobs, "next": next_cursor})


@requires(None)
async def other_blob_paths(request: web.Request) -> web.Response:
    """Whatever no route above matched: a malformed address, or a method
    the resource does not have."""
    tail = request.match_info["tail"]
    parse_address(tail.removesuffix("/meta"))
    allow = "GET,HEAD" if tail.endswith("/meta") else "DELETE,GET,HEAD,PUT"
    raise BlobdError("method_not_allowed", f"{request.method} is not allowed here",
                     headers={"Allow": allow})


def setup(app: web.Application, add: Any) -> None:
    add("PUT", "/blobs/{address}", put_blob)
    add("GET", "/blobs/{address}", get_blob)
    add("DELETE", "/blobs/{address}", delete_blob)
    add("GET", "/blobs/{address}/meta", get_meta)
    add("GET", "/blobs", list_blobs)
    add("POST", "/blobs", post_blob)
    add("*", "/blobs/{tail:.*}", other_blob_paths)

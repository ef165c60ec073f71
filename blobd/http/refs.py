"""``/refs``: named references, private to their owner."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from .. import index, reaper, reserve
from ..address import parse_address, parse_ref_name
from ..errors import BlobdError
from ..store import shielded
from .keys import STORE
from .params import iso, one_page, page_params, read_json
from .middleware import principal, requires


def ref_json(row: Any) -> dict[str, Any]:
    return {"name": row["name"], "hash": row["hash"], "size": row["size"],
            "created_at": iso(row["created_at"])}


@requires("write")
async def put_ref(request: web.Request) -> web.Response:
    store = request.app[STORE]
    name = parse_ref_name(request.match_info["name"])
    body = await read_json(request, ("hash",))
    if not isinstance(body.get("hash"), str):
        raise BlobdError("bad_request", 'expected {"hash": "<address>"}')
    address = parse_address(body["hash"])
    owner = principal(request).owner

    async def run() -> Any:
        async with store.write() as tx:
            # A blob in its grace period counts as existing: the new name revives it.
            digest: str | None = address.digest
            if not address.is_blake3:
                digest = await index.hash_for_sha256(tx.conn, address.digest)
            blob = await index.get_blob(tx.conn, digest) if digest else None
            if blob is None:
                raise BlobdError("not_found", f"no blob {address}")
            zeroed = await index.add_ref(tx.conn, owner, name, blob,
                                         store.config.quota_for(owner), time.time())
            await reaper.release_zeroed(store, tx, zeroed)
            # Read in the same transaction: a DELETE right after must not
            # leave this answer without its row.
            row = await index.get_ref(tx.conn, owner, name)
            assert row is not None
            return row

    return web.json_response(ref_json(await shielded(run())))


@requires("read")
async def get_ref(request: web.Request) -> web.Response:
    store = request.app[STORE]
    name = parse_ref_name(request.match_info["name"])
    row = await index.get_ref(store.db.reader, principal(request).owner, name)
    if row is None:
        raise BlobdError("not_found", f"no reference {name}")
    return web.json_response(ref_json(row))


@requires("read")
async def list_refs(request: web.Request) -> web.Response:
    store = request.app[STORE]
    limit, after = page_params(request)
    prefix = request.query.get("prefix", "")
    if prefix:
        parse_ref_name(prefix)
    rows, next_cursor = one_page(
        await index.list_refs(store.db.reader, principal(request).owner, prefix, limit + 1, after),
        limit, lambda row: row["name"])
    return web.json_response({"refs": [ref_json(r) for r in rows], "next": next_cursor})


@requires("write")
async def delete_ref(request: web.Request) -> web.Response:
    store = request.app[STORE]
    name = parse_ref_name(request.match_info["name"])
    owner = principal(request).owner

    async def run() -> bool:
        async with store.write() as tx:
            zeroed = await index.drop_ref(tx.conn, owner, name, time.time())
            if zeroed is None:
                return False
            await reaper.release_zeroed(store, tx, zeroed)
            return True

    if not await shielded(reserve.freeing(store, run)):
        raise BlobdError("not_found", f"no reference {name}")
    return web.Response(status=204)


@requires(None)
async def other_ref_paths(request: web.Request) -> web.Response:
    """Whatever no route above matched: a name with a "/" or an empty one
    (400, as any invalid name), or a method the resource does not have."""
    parse_ref_name(request.match_info["tail"])
    raise BlobdError("method_not_allowed", f"{request.method} is not allowed here",
                     headers={"Allow": "DELETE,GET,HEAD,PUT"})


def setup(app: web.Application, add: Any) -> None:
    add("PUT", "/refs/{name}", put_ref)
    add("GET", "/refs/{name}", get_ref)
    add("DELETE", "/refs/{name}", delete_ref)
    add("GET", "/refs", list_refs)
    add("*", "/refs/{tail:.*}", other_ref_paths)

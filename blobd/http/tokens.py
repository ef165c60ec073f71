"""``/admin/tokens``: the admin API for bearer tokens (``blobd token`` over HTTP).

An app that manages its users (a home-server dashboard, a setup script)
creates their tokens here instead of shelling out to the CLI on the server.
The secret is in the creation answer only; the index keeps its SHA-256.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import web

from .. import auth
from ..errors import BlobdError
from .keys import STORE
from .middleware import requires
from .params import iso, read_json

_TOKEN_ID = re.compile(r"[0-9a-f]{8}")


def _token_json(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "owner": row["owner"], "scopes": row["scopes"].split(","),
            "label": row["label"], "created_at": iso(row["created_at"])}


def _scopes(value: Any) -> frozenset[str]:
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise BlobdError("bad_request", "scopes: a list such as [\"read\", \"write\"]")
    return auth.parse_scopes(value)


def _label(value: Any) -> str:
    if not isinstance(value, str):
        raise BlobdError("bad_request", f"label: printable text of at most {auth.MAX_LABEL}"
                         " characters, on one line")
    return auth.check_label(value)


@requires("admin")
async def create_token(request: web.Request) -> web.Response:
    store = request.app[STORE]
    body = await read_json(request, ("owner", "scopes", "label"))
    owner = body.get("owner")
    if not isinstance(owner, str):
        raise BlobdError("bad_request", "owner: required")
    auth.check_owner(owner)
    scopes = _scopes(body.get("scopes", ["read", "write"]))
    label = _label(body.get("label", ""))
    async with store.write() as tx:
        token_id, token = await auth.create_token(tx.conn, owner, scopes, label)
    rows = await auth.list_tokens(store.db.reader, owner)
    row = next(r for r in rows if r["id"] == token_id)
    return web.json_response({**_token_json(row), "token": token}, status=201,
                             headers={"Location": f"/admin/tokens/{token_id}"})


@requires("admin")
async def list_tokens(request: web.Request) -> web.Response:
    owner = request.query.get("owner")
    if owner is not None:
        auth.check_owner(owner)
    rows = await auth.list_tokens(request.app[STORE].db.reader, owner)
    return web.json_response({"tokens": [_token_json(r) for r in rows]})


@requires("admin")
async def revoke_token(request: web.Request) -> web.Response:
    token_id = request.match_info["id"]
    if not _TOKEN_ID.fullmatch(token_id):
        raise BlobdError("not_found", f"no token with id {token_id}")
    async with request.app[STORE].write() as tx:
        found = await auth.revoke_token(tx.conn, token_id)
    if not found:
        raise BlobdError("not_found", f"no token with id {token_id}")
    # Every worker may hold the token in its cache for this long: once the
    # answer is out, none accepts it.
    await asyncio.sleep(auth.TOKEN_CACHE_SECONDS)
    return web.Response(status=204)


def setup(app: web.Application, add: Any) -> None:
    add("POST", "/admin/tokens", create_token)
    add("GET", "/admin/tokens", list_tokens)
    add("DELETE", "/admin/tokens/{id}", revoke_token)

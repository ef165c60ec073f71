"""Operations: ``/quota``, ``/admin/owners/<owner>/quota``, ``/stats``, ``/metrics``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import quotas, stats
from ..auth import check_owner
from ..index import LIMIT_KEYS
from ..metrics import CONTENT_TYPE, METRICS
from .keys import STORE
from .middleware import principal, requires
from .params import read_json


@requires("read")
async def get_quota(request: web.Request) -> web.Response:
    store = request.app[STORE]
    owner = principal(request).owner
    return web.json_response(
        await quotas.report(store.db.reader, owner, store.config.quota_for(owner)))


@requires("admin")
async def put_owner_quota(request: web.Request) -> web.Response:
    store = request.app[STORE]
    owner = check_owner(request.match_info["owner"])
    changes = quotas.parse_changes(await read_json(request, LIMIT_KEYS))
    return web.json_response(await quotas.set_limits(store, owner, changes))


@requires("admin")
async def get_owner_quota(request: web.Request) -> web.Response:
    store = request.app[STORE]
    owner = check_owner(request.match_info["owner"])
    return web.json_response(
        await quotas.report(store.db.reader, owner, store.config.quota_for(owner)))


@requires("admin")
async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(await stats.figures(request.app[STORE]))


@requires("admin", anonymous_metrics=True)
async def get_metrics(request: web.Request) -> web.Response:
    body = await request.app[METRICS].render(request.app[STORE])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def setup(app: web.Application, add: Any) -> None:
    add("GET", "/quota", get_quota)
    add("PUT", "/admin/owners/{owner}/quota", put_owner_quota)
    add("GET", "/admin/owners/{owner}/quota", get_owner_quota)
    add("GET", "/stats", get_stats)
    add("GET", "/metrics", get_metrics)

"""``/healthz``: is the store usable right now."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from aiohttp import web

from .keys import STORE
from .middleware import requires

log = logging.getLogger(__name__)


@requires(None)
async def healthz(request: web.Request) -> web.Response:
    store = request.app[STORE]
    try:
        await store.db.fetchone("SELECT 1 FROM blobs LIMIT 1")
        writable = await asyncio.to_thread(os.access, store.layout.tmp_dir, os.W_OK)
    except Exception as exc:  # any failure means "not healthy", never a 500
        log.warning("health check failed: %s", exc)
        writable = False
    if not writable:
        return web.json_response({"status": "unavailable"}, status=503)
    return web.json_response({"status": "ok"})


def setup(app: web.Application, add: Any) -> None:
    add("GET", "/healthz", healthz)

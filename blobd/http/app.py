"""The aiohttp application: middlewares, routes, and what runs beside them."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine

from aiohttp import web

from .. import memory, reaper, reserve, scrub, sessions
from ..config import Config
from ..errors import BlobdError
from ..mirror.service import Mirror
from ..store import Store
from ..metrics import METRICS, Metrics, metrics_middleware
from . import (accesslog, admin, blobs, health, inflight, protocolerrors, refs, tokens,
               tus, uploads)
from .accesslog import log_aborted
from .cors import add_cors_headers, cors_middleware
from .inflight import track_requests
from .keys import MIRROR, STORE
from .middleware import auth_middleware, error_middleware, no_expect_handler

# Disk work runs in threads; the default pool (cores + 4) is too small when
# many uploads and downloads each wait on a disk operation at once.
THREADS = 32
RESOURCES = (blobs, refs, uploads, tus, admin, tokens, health)


def create_app(config: Config, *, background: bool = True,
               primary: bool = True) -> web.Application:
    """The app of one server process. ``primary``: it owns the data dir
    (takes its lock, recovers from a crash); ``background``: it runs the
    sweepers and the mirror worker. A lone server is both; of ``[server]
    workers = N`` processes none is primary (their parent is) and exactly
    one runs the background work (see :mod:`blobd.workers`)."""
    memory.keep_large_buffers_unpooled()
    # Outermost first: aborted requests are logged and in-flight ones
    # tracked for the shutdown drain; metrics see every answer; CORS
    # preflights need no route or token; tus refuses a request of another
    # tus version before auth (and marks every answer, see tus.add_marks).
    app = web.Application(middlewares=[log_aborted, track_requests, metrics_middleware,
                                       cors_middleware, error_middleware,
                                       tus.middleware, auth_middleware],
                          client_max_size=1 << 20)
    app[STORE] = Store(config)
    app[METRICS] = Metrics()
    app.on_response_prepare.append(add_cors_headers)
    app.on_response_prepare.append(tus.add_marks)
    accesslog.setup(app, config.logging.access_log)
    # Requests aiohttp answers before the middlewares get the JSON body too.
    protocolerrors.install(app)
    inflight.setup(app)
    if config.mirror is not None:
        app[MIRROR] = Mirror(app[STORE], config.mirror)

    def add(method: str, path: str, handler) -> None:  # type: ignore[no-untyped-def]
        app.router.add_route(method, path, handler, expect_handler=no_expect_handler)
        if method == "GET":
            app.router.add_route("HEAD", path, handler, expect_handler=no_expect_handler)

    for resource in RESOURCES:
        resource.setup(app, add)
    app.cleanup_ctx.append(_executor)
    app.cleanup_ctx.append(functools.partial(_open_store, primary=primary))
    if background:
        app.cleanup_ctx.append(_running(
            "blobd-sweeper", lambda app: reaper.run_sweeper(app[STORE])))
        app.cleanup_ctx.append(_running(
            "blobd-session-sweeper", lambda app: sessions.run_session_sweeper(app[STORE])))
        # Made before the first request, not beside it: a deletion meeting
        # a full disk right after the start must find it in place.
        app.cleanup_ctx.append(_running("blobd-reserve", lambda app: reserve.keep(app[STORE]),
                                        first=lambda app: reserve.make(app[STORE])))
    app.cleanup_ctx.append(functools.partial(_mirror, background=background))
    if background and config.scrub.bytes_per_second:
        # After the mirror: it heals through the mirror's healer, which
        # must be open before it starts and closed only after it stops.
        app.cleanup_ctx.append(_running("blobd-scrub", _scrub))
    app.cleanup_ctx.append(_running(
        "blobd-memory-trim", lambda app: memory.trim_periodically()))
    return app


async def _scrub(app: web.Application) -> None:
    mirror = app.get(MIRROR)
    await scrub.Scrubber(app[STORE], mirror.healer if mirror is not None else None).run()


async def _executor(app: web.Application) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="blobd-io")
    loop.set_default_executor(pool)
    yield
    pool.shutdown(wait=False)


async def _open_store(app: web.Application, *, primary: bool) -> AsyncIterator[None]:
    store = app[STORE]
    if await asyncio.to_thread(store.layout.restore_marker_path.exists):
        raise BlobdError("conflict", "an interrupted 'blobd mirror restore' left this data"
                         " dir half-restored; run it again to finish before serving")
    await store.open(exclusive=primary, recover=primary)
    yield
    await store.close()


def _running(name: str, job: Callable[[web.Application], Coroutine[Any, Any, None]],
             first: Callable[[web.Application], Awaitable[Any]] | None = None,
             ) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that runs ``job(app)`` as a task while the app
    serves, after awaiting ``first(app)`` before the app serves."""
    async def context(app: web.Application) -> AsyncIterator[None]:
        if first is not None:
            await first(app)
        task = asyncio.create_task(job(app), name=name)
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return context


async def _mirror(app: web.Application, *, background: bool) -> AsyncIterator[None]:
    mirror = app.get(MIRROR)
    if mirror is not None:
        await mirror.start(background)
    yield
    if mirror is not None:
        await mirror.stop()

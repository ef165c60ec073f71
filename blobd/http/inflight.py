"""Requests in flight, so a shutdown can let them finish, then cut them off.

aiohttp's own graceful shutdown (``AppRunner.cleanup``) marks every
connection closing first, and from then on a closing connection discards
the bytes it receives: an upload in flight could never finish, it would
only wait out the timeout. So blobd drains on its own before that: the
listeners close, requests already running keep their connections and
receive their bodies, new requests on kept-alive connections get 503, and
whatever still runs when the time is up is cancelled, which makes an upload
remove its temp file (a commit already in its index transaction completes
first, see :func:`blobd.store.shielded`).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..errors import BlobdError
from .middleware import Handler, error_response


class InFlight:
    """The handler tasks running now, and whether the server is draining."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @property
    def count(self) -> int:
        return len(self._tasks)

    def enter(self, task: asyncio.Task[object]) -> None:
        self._tasks.add(task)
        self._idle.clear()

    def leave(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request runs; False if some still do after ``timeout``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def cancel_all(self) -> int:
        """Cancel every running handler; returns how many."""
        for task in self._tasks:
            task.cancel()
        return len(self._tasks)


IN_FLIGHT = web.AppKey("in_flight", InFlight)


@web.middleware
async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    in_flight = request.app[IN_FLIGHT]
    if in_flight.draining:
        # A new request on a connection kept alive from before the shutdown.
        response = error_response(BlobdError("unavailable", "the server is shutting down"))
        response.force_close()
        return response
    task = asyncio.current_task()
    assert task is not None
    in_flight.enter(task)
    try:
        return await handler(request)
    finally:
        in_flight.leave(task)


def setup(app: web.Application) -> None:
    app[IN_FLIGHT] = InFlight()

"""A blocking call on a thread of its own that the process's exit does not wait for.

``asyncio.to_thread`` runs calls on the loop's pool, whose threads the
interpreter joins at exit; a call stuck for good (a read from a hung mount,
a write into a FIFO whose reader stopped reading) would then keep a command
from ending, even after Ctrl-C. Here the call gets a daemon thread, and the
awaiting task a future it may stop waiting for.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def run(fn: Callable[..., T], *args: Any, name: str) -> asyncio.Future[T]:
    """``fn(*args)`` on a daemon thread called ``name``; its result or
    exception arrives in the returned future (unless that was cancelled
    meanwhile, or the loop is gone)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():   # not given up on (cancelled) meanwhile
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def call() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass    # the loop is gone: nobody waits any more

    threading.Thread(target=call, name=name, daemon=True).start()
    return future

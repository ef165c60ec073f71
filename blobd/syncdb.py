"""Running the index's async code synchronously, inside one thread call.

The functions of :mod:`blobd.index` are coroutines over an aiosqlite
connection, and each statement they await is a trip to that connection's
thread and back. A commit is some twenty statements, so on a busy server
the trips (thread wake-ups, not SQL) were most of a small upload's CPU time.

:class:`SyncConnection` offers the part of aiosqlite's interface the index
uses (``execute`` awaited or used as ``async with``, cursors with
``fetchone``/``fetchall``/``rowcount``, ``execute_fetchall``) over a plain
``sqlite3.Connection``, with coroutines that finish without ever
suspending. :func:`drive` runs such a coroutine to its end on the spot, so a
whole transaction body written against the index's async functions runs in
a single call on the commit thread (see :mod:`blobd.groupcommit`), with no
second copy of any SQL.

A body that awaits anything else (a sleep, ``asyncio.to_thread``) cannot run
here: :func:`drive` refuses it with :class:`SuspendedError` instead of
blocking or losing it. File work inside a transaction goes through
:meth:`blobd.store.Tx.blocking`, which runs it in place on this thread.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Coroutine, Generator, Iterable, TypeVar

T = TypeVar("T")


class SuspendedError(RuntimeError):
    """A transaction body awaited something that is not its connection."""


class _Ready:
    """An awaitable, and async context manager, whose value is already there
    (aiosqlite's ``execute`` result supports both uses)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, Any]:
        return self.value
        yield  # a generator that returns at once: awaiting never suspends

    async def __aenter__(self) -> Any:
        return self.value

    async def __aexit__(self, *exc: object) -> None:
        await self.value.close()


class SyncCursor:
    __slots__ = ("_cursor",)

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    async def fetchone(self) -> sqlite3.Row | None:
        return self._cursor.fetchone()

    async def fetchall(self) -> list[sqlite3.Row]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class SyncConnection:
    """aiosqlite's interface, as the index uses it, run on the calling thread."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Iterable[Any] = ()) -> _Ready:
        return _Ready(SyncCursor(self._conn.execute(sql, tuple(parameters))))

    async def execute_fetchall(self, sql: str,
                               parameters: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return self._conn.execute(sql, tuple(parameters)).fetchall()

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to its end, here and now."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise SuspendedError("a transaction body awaited something other than its"
                         " connection; use Tx.blocking for file work")

"""The SQLite index: connections, PRAGMAs, the write lock across processes.

One write connection, used under an asyncio lock with ``BEGIN IMMEDIATE`` so
that writes from this process queue here and writes from other processes
(worker processes, the CLI) wait on SQLite's own lock (``busy_timeout``).
Reads use a second connection; in WAL mode they never wait for a writer.

Durability: with ``[storage] fsync = true`` the index runs with
``synchronous=FULL`` because a blob the server acknowledged must survive a
power cut, and a blob file without its index row is an orphan, not a blob.
With ``fsync = false`` the operator has chosen speed, so ``NORMAL``.

The schema and its migrations are :mod:`blobd.schema`.

Across processes, writers also take :class:`WriterLock` (an ``flock``)
before ``BEGIN IMMEDIATE``: SQLite's busy handler only sleeps and polls,
which with several worker processes made waiting, not work, the tail
latency of every upload.

Besides the aiosqlite connections there are plain ``sqlite3`` connections
for work that is more than SQL: each of a few reader threads has its own
(:meth:`Database.read` runs a lookup and the file work that follows it in one
trip, for GET), and one "commit thread" has another, on which
:meth:`Database.on_commit_thread` runs a whole synchronous function (a batch of commits, see
:mod:`blobd.groupcommit`) in a single trip, under the same write lock.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, TypeVar

import aiosqlite

from .errors import BlobdError
from .schema import migrate

Row = aiosqlite.Row
T = TypeVar("T")
# Reader threads for Database.read: a GET's file read may wait on the disk,
# so more than one; each holds a connection (and its page cache).
READ_THREADS = 4


class WriterLock:
    """Orders the index's writers across processes: an ``flock`` on a file
    beside the index, held from before ``BEGIN IMMEDIATE`` to after
    ``COMMIT``, so a waiting writer wakes the moment the holder is done.
    ``flock`` belongs to an open file, not a thread: within one process the
    asyncio write lock orders writers, and this one only orders processes.
    A process that dies holding it releases it with its files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def open(self, create: bool = True) -> None:
        """Open the lock file; without ``create`` a missing one is not made,
        and the lock is then a no-op: no server has written here yet, and
        one that starts relies on SQLite's own lock for the few writes a
        reading command makes (fsck's confirming transactions, which change
        nothing)."""
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            self._fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            if create:
                raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def hold(self) -> None:
        """Take the lock, waiting as long as it takes (blocking)."""
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _try_hold(self) -> bool:
        """Take the lock if it is free; never blocks."""
        if self._fd < 0:
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    async def acquire(self) -> None:
        if self._try_hold():
            return
        waiting = asyncio.ensure_future(asyncio.to_thread(self.hold))
        try:
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            # The thread may still get the lock: it must not be kept.
            await asyncio.wait([waiting])
            if not waiting.cancelled() and waiting.exception() is None:
                self.release()
            raise


class Database:
    def __init__(self, path: Path, *, durable: bool = True,
                 writer_lock: Path | None = None) -> None:
        self.path = path
        self.durable = durable
        self._writers = WriterLock(writer_lock or path.with_name(path.name + "-writer"))
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._commit_thread: ThreadPoolExecutor | None = None
        self._commit_conn: sqlite3.Connection | None = None
        self._read_threads: ThreadPoolExecutor | None = None
        self._read_local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []

    async def open(self, *, read_only: bool = False) -> None:
        """``read_only``: for a command that only reads: the writers' lock
        file is not made (by root, where none was, it would keep the owner's
        server out) and an older schema is refused, not migrated."""
        try:
            await asyncio.to_thread(self._writers.open, not read_only)
            self._writer = await self._connect()
            await migrate(self._writer, read_only=read_only)
            self._reader = await self._connect()
            await self._reader.execute("PRAGMA query_only = ON")
            self._read_threads = ThreadPoolExecutor(READ_THREADS,
                                                    thread_name_prefix="blobd-read")
            self._commit_thread = ThreadPoolExecutor(1, thread_name_prefix="blobd-commit")
            self._commit_conn = await asyncio.get_running_loop().run_in_executor(
                self._commit_thread, self._connect_committer)
        except BaseException as exc:
            # A connection left open keeps its thread, which is not a
            # daemon: the process would hang at exit after the error.
            await self.close()
            if isinstance(exc, sqlite3.Error) and await asyncio.to_thread(_no_room, self.path):
                raise BlobdError("insufficient_storage",
                                 f"the disk holding {self.path.parent} is full: the index"
                                 f" cannot be opened ({exc}); make room and try again"
                                 ) from exc
            raise

    async def close(self) -> None:
        """Close every connection once no write transaction is open: a
        commit that outlived its request (see :func:`blobd.store.shielded`)
        still ends in COMMIT or ROLLBACK, never in a closed connection."""
        async with self._write_lock:
            for conn in (self._reader, self._writer):
                if conn is not None:
                    await conn.close()
            self._reader = self._writer = None
            if self._read_threads is not None:
                self._read_threads.shutdown()
            self._read_threads = None
            if self._commit_thread is not None:
                # On our own thread, not the loop's default executor: an app
                # may already have shut that down (see blobd.http.app).
                conns = [*self._read_conns, *filter(None, [self._commit_conn])]
                await asyncio.get_running_loop().run_in_executor(
                    self._commit_thread, _close_all, conns)
                self._read_conns.clear()
                self._commit_thread.shutdown()
            self._commit_thread = self._commit_conn = None
            self._writers.close()

    def _pragmas(self) -> list[str]:
        sync = "FULL" if self.durable else "NORMAL"
        return [f"PRAGMA {pragma}" for pragma in (
            "journal_mode = WAL",
            f"synchronous = {sync}",
            "busy_timeout = 30000",
            "foreign_keys = ON",
            # Checkpoint every 16 MiB of WAL rather than 4 MiB: a busy
            # server rewrites the same hot pages (owners, counters, the
            # trees' upper levels) into the database file a quarter as
            # often. Measured: small POSTs +10 %, bench/README.md.
            "wal_autocheckpoint = 4000",
        )]

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        try:
            for pragma in self._pragmas():
                await conn.execute(pragma)
        except BaseException:
            await conn.close()
            raise
        return conn

    def _connect_sync(self, *, check_same_thread: bool = True) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None,
                               check_same_thread=check_same_thread)
        conn.row_factory = sqlite3.Row
        for pragma in self._pragmas():
            conn.execute(pragma)
        return conn

    def _connect_committer(self) -> sqlite3.Connection:
        conn = self._connect_sync()
        # A batch gives each body a SAVEPOINT, whose journal holds the
        # first copy of every page the batch changes: past 64 KiB SQLite
        # spills it to a new file in /var/tmp, one per transaction, and
        # writes each page to it (as many writes as the WAL gets). The
        # commit connection's transactions are small: keep it in memory.
        conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on a reader thread, over that thread's own
        read-only connection (``fn`` may do blocking file work too)."""
        if self._read_threads is None:
            raise RuntimeError("database is not open")
        return await asyncio.get_running_loop().run_in_executor(
            self._read_threads, self._run_read, fn)

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._read_local, "conn", None)
        if conn is None:
            # Closed by close() from another thread, after this one is gone.
            conn = self._connect_sync(check_same_thread=False)
            conn.execute("PRAGMA query_only = ON")
            self._read_local.conn = conn
            self._read_conns.append(conn)
        return fn(conn)

    @property
    def write_lock(self) -> asyncio.Lock:
        """Held by every write transaction of this process."""
        return self._write_lock

    async def on_commit_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the commit thread's connection. The caller
        holds :attr:`write_lock`; ``fn`` begins and ends its transaction."""
        if self._commit_thread is None or self._commit_conn is None:
            raise RuntimeError("database is not open")
        return await asyncio.get_running_loop().run_in_executor(
            self._commit_thread, self._run_held, fn, self._commit_conn)

    def _run_held(self, fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
        self._writers.hold()
        try:
            return fn(conn)
        finally:
            self._writers.release()

    @property
    def reader(self) -> aiosqlite.Connection:
        assert self._reader is not None, "database is not open"
        return self._reader

    @asynccontextmanager
    async def transaction(self, on_rollback: Callable[[], Awaitable[None]] | None = None
                          ) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction; commits on success, rolls back on any error
        (then awaits ``on_rollback`` while this process still holds the
        write lock)."""
        assert self._writer is not None, "database is not open"
        async with self._write_lock:
            conn = self._writer
            await self._writers.acquire()
            commit: asyncio.Future[Any] | None = None
            try:
                await conn.execute("BEGIN IMMEDIATE")
                yield conn
                commit = asyncio.ensure_future(conn.execute("COMMIT"))
                await asyncio.shield(commit)
            except BaseException as exc:
                if commit is not None and isinstance(exc, asyncio.CancelledError):
                    # Cancelled (a shutdown stopping a sweeper) while the
                    # COMMIT runs on in aiosqlite's thread: learn how it
                    # ended. What committed is neither rolled back nor
                    # undone, and the cancellation goes on.
                    await asyncio.wait([commit])
                    if not commit.cancelled() and commit.exception() is None:
                        raise
                # After a failed COMMIT (disk full, I/O error) SQLite may or
                # may not have rolled back already; roll back regardless, or
                # this connection would stay inside a dead transaction.
                await _rollback(conn)
                if on_rollback is not None:
                    await on_rollback()
                if is_disk_full(exc):
                    raise BlobdError("insufficient_storage",
                                     "the disk is full (the index cannot grow)") from exc
                raise
            finally:
                self._writers.release()

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        assert self._reader is not None, "database is not open"
        async with self._reader.execute(sql, tuple(params)) as cur:
            return await cur.fetchone()

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        assert self._reader is not None, "database is not open"
        async with self._reader.execute(sql, tuple(params)) as cur:
            return list(await cur.fetchall())

    async def fetchone_aside(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        """A long read (a scan of every blob) on a connection of its own, so
        it never queues the per-request lookups behind it."""
        conn = await self._connect()
        try:
            await conn.execute("PRAGMA query_only = ON")
            async with conn.execute(sql, tuple(params)) as cur:
                return await cur.fetchone()
        finally:
            await conn.close()


def _no_room(path: Path) -> bool:
    """Whether the index's filesystem is full: SQLite then fails to grow
    the -shm file with a bare "disk I/O error" (SQLITE_IOERR_SHMSIZE), not
    SQLITE_FULL."""
    try:
        st = os.statvfs(path.parent)
        return st.f_bavail * st.f_frsize < 1 << 20
    except OSError:
        return False


def is_disk_full(exc: BaseException) -> bool:
    return (isinstance(exc, sqlite3.OperationalError)
            and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL)


async def _rollback(conn: aiosqlite.Connection) -> None:
    if conn.in_transaction:
        await conn.execute("ROLLBACK")


def _close_all(conns: list[sqlite3.Connection]) -> None:
    while conns:
        conns.pop().close()

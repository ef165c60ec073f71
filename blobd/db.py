"""The SQLite index: connections, PRAGMAs and schema migrations.

One write connection, used under an asyncio lock with ``BEGIN IMMEDIATE`` so
that writes from this process queue here and writes from other processes
(worker processes, the CLI) wait on SQLite's own lock (``busy_timeout``).
Reads use a second connection; in WAL mode they never wait for a writer.

Durability: with ``[storage] fsync = true`` the index runs with
``synchronous=FULL`` because a blob the server acknowledged must survive a
power cut, and a blob file without its index row is an orphan, not a blob.
With ``fsync = false`` the operator has chosen speed, so ``NORMAL``.

Migrations are a plain list stepped by ``PRAGMA user_version``, each applied
in one transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import aiosqlite

from .errors import BlobdError

MIGRATIONS: list[str] = [
    # 1: the initial schema.
    """
    CREATE TABLE blobs (
        hash          TEXT PRIMARY KEY,      -- BLAKE3 hex, lower case
        sha256        TEXT NOT NULL,
        size          INTEGER NOT NULL,
        content_type  TEXT NOT NULL,
        created_at    REAL NOT NULL,
        refcount      INTEGER NOT NULL DEFAULT 0,
        zero_at       REAL,                  -- refcount reached 0 (grace period)
        audio         TEXT,                  -- JSON from the audio probe, or NULL
        mirror_state  TEXT NOT NULL DEFAULT 'off'
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX blobs_sha256 ON blobs(sha256);
    CREATE INDEX blobs_zero_at ON blobs(zero_at) WHERE zero_at IS NOT NULL;
    CREATE INDEX blobs_unmirrored ON blobs(mirror_state) WHERE mirror_state = 'off';

    CREATE TABLE refs (
        owner       TEXT NOT NULL,
        name        TEXT NOT NULL,
        hash        TEXT NOT NULL REFERENCES blobs(hash),
        created_at  REAL NOT NULL,
        PRIMARY KEY (owner, name)
    ) WITHOUT ROWID;
    CREATE INDEX refs_hash ON refs(hash, owner);

    -- One row per (owner, blob the owner references): what quotas charge
    -- and what GET /blobs lists, newest first by id.
    CREATE TABLE holdings (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        owner       TEXT NOT NULL,
        hash        TEXT NOT NULL REFERENCES blobs(hash),
        refs        INTEGER NOT NULL,
        created_at  REAL NOT NULL,
        UNIQUE (owner, hash)
    );
    CREATE INDEX holdings_owner ON holdings(owner, id);

    CREATE TABLE owners (
        owner                     TEXT PRIMARY KEY,
        used_bytes                INTEGER NOT NULL DEFAULT 0,
        used_blobs                INTEGER NOT NULL DEFAULT 0,
        reserved_bytes            INTEGER NOT NULL DEFAULT 0,
        upload_month              TEXT NOT NULL DEFAULT '',
        monthly_upload_bytes      INTEGER NOT NULL DEFAULT 0,
        -- per-owner overrides; NULL means the configured default
        max_bytes                 INTEGER,
        max_blobs                 INTEGER,
        max_blob_size             INTEGER,
        max_monthly_upload_bytes  INTEGER
    ) WITHOUT ROWID;

    CREATE TABLE tokens (
        id            TEXT PRIMARY KEY,
        token_hash    TEXT NOT NULL UNIQUE,   -- SHA-256 of the secret
        owner         TEXT NOT NULL,
        scopes        TEXT NOT NULL,          -- comma separated
        label         TEXT NOT NULL DEFAULT '',
        created_at    REAL NOT NULL
    );

    CREATE TABLE counters (
        name   TEXT PRIMARY KEY,
        value  INTEGER NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE uploads (
        id              TEXT PRIMARY KEY,
        owner           TEXT NOT NULL,
        protocol        TEXT NOT NULL,        -- 'native' or 'tus'
        size            INTEGER,              -- NULL while a tus length is deferred
        chunk_size      INTEGER NOT NULL,
        expected_hash   TEXT,                 -- an address as the client gave it
        content_type    TEXT,
        ref             TEXT,
        metadata        TEXT,                 -- tus Upload-Metadata as received
        concat          TEXT,                 -- tus Upload-Concat: 'partial', 'final;...'
        upload_offset   INTEGER NOT NULL DEFAULT 0,
        reserved_bytes  INTEGER NOT NULL DEFAULT 0,
        created_at      REAL NOT NULL,
        expires_at      REAL NOT NULL,
        result_hash     TEXT                  -- set once committed
    );
    CREATE INDEX uploads_owner ON uploads(owner);
    CREATE INDEX uploads_expires_at ON uploads(expires_at);

    CREATE TABLE upload_chunks (
        upload_id  TEXT NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
        idx        INTEGER NOT NULL,
        PRIMARY KEY (upload_id, idx)
    ) WITHOUT ROWID;

    -- The mirror outbox, written in the same transaction as the change.
    CREATE TABLE mirror_queue (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        hash         TEXT NOT NULL,
        op           TEXT NOT NULL,          -- 'put' or 'delete'
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_at      REAL NOT NULL DEFAULT 0,
        last_error   TEXT,
        enqueued_at  REAL NOT NULL
    );
    CREATE INDEX mirror_queue_next_at ON mirror_queue(next_at);
    CREATE INDEX mirror_queue_hash ON mirror_queue(hash, id);
    """,
]

Row = aiosqlite.Row


class Database:
    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = path
        self.durable = durable
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    async def open(self) -> None:
        self._writer = await self._connect()
        await migrate(self._writer)
        self._reader = await self._connect()
        await self._reader.execute("PRAGMA query_only = ON")

    async def close(self) -> None:
        """Close both connections once no write transaction is open: a
        commit that outlived its request (see :func:`blobd.store.shielded`)
        still ends in COMMIT or ROLLBACK, never in a closed connection."""
        async with self._write_lock:
            for conn in (self._reader, self._writer):
                if conn is not None:
                    await conn.close()
            self._reader = self._writer = None

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        sync = "FULL" if self.durable else "NORMAL"
        for pragma in (
            "journal_mode = WAL",
            f"synchronous = {sync}",
            "busy_timeout = 30000",
            "foreign_keys = ON",
        ):
            await conn.execute(f"PRAGMA {pragma}")
        return conn

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
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                await conn.execute("COMMIT")
            except BaseException as exc:
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


def is_disk_full(exc: BaseException) -> bool:
    return (isinstance(exc, sqlite3.OperationalError)
            and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL)


async def _rollback(conn: aiosqlite.Connection) -> None:
    if conn.in_transaction:
        await conn.execute("ROLLBACK")


async def migrate(conn: aiosqlite.Connection) -> None:
    async with conn.execute("PRAGMA user_version") as cur:
        (version,) = await cur.fetchone()
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        # executescript would COMMIT on its own; run statement by statement
        # so the schema change and the version bump are one transaction.
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(script):
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")


def _statements(script: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]

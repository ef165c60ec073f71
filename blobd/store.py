"""The store: the index and the blob tree, opened and recovered together.

Write transactions go through :meth:`Store.write`. File moves that decide
what exists (link into place, move to trash) happen *inside* them, so the
SQLite write lock is also the lock that orders "add a reference" against
"delete at zero", across tasks and across processes. Trash is unlinked after
the commit.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import aiosqlite

from . import files, index
from .config import Config
from .db import Database
from .errors import BlobdError
from .layout import Layout

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Tx:
    """A write transaction and the file changes made inside it.

    ``trash``: files moved out of the blob tree, unlinked after COMMIT.
    ``undo``: blocking functions that reverse a file change, run (newest
    first) if the transaction rolls back, so disk and index agree again.
    """
    conn: aiosqlite.Connection
    trash: list[Path] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)
    mirror_enqueued: bool = False

    async def enqueue_mirror(self, digest: str, op: str, now: float) -> None:
        """Queue a mirror 'put' or 'delete' in this transaction; the mirror
        worker is woken once it commits."""
        await index.enqueue_mirror(self.conn, digest, op, now)
        self.mirror_enqueued = True


class Store:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.layout = Layout(config.data_dir.resolve())
        self.db = Database(self.layout.index_path, durable=config.storage.fsync)
        self._lock_fd: int | None = None
        # Set after a commit that queued mirror work (see Tx.enqueue_mirror).
        self.mirror_wakeup = asyncio.Event()

    async def open(self, *, exclusive: bool = True, recover: bool = True) -> None:
        """Open the index; ``exclusive`` takes the data-dir lock a server holds."""
        await asyncio.to_thread(files.make_dirs, self.layout)
        if exclusive:
            self._lock_fd = await asyncio.to_thread(_take_lock, self.layout.lock_path)
        try:
            await self.db.open()
            if recover:
                await self.recover()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Tx]:
        tx: Tx | None = None

        async def undo() -> None:
            if tx is not None and tx.undo:
                await asyncio.to_thread(_run_undo, tx.undo)

        async with self.db.transaction(on_rollback=undo) as conn:
            tx = Tx(conn)
            yield tx
        if tx.mirror_enqueued:
            self.mirror_wakeup.set()
        if tx.trash:
            # Committed: a leftover here is only litter for recover().
            try:
                await asyncio.to_thread(files.remove_quietly, *tx.trash)
            except OSError as exc:
                log.warning("could not remove deleted blob files: %s", exc)

    async def recover(self) -> None:
        """Undo what a crash left in tmp/; never scans the blob tree."""
        entries = await asyncio.to_thread(files.tmp_entries, self.layout)
        for entry in entries:
            await self._recover_entry(entry)
        if entries:
            log.info("recovered %d leftover temp files", len(entries))

    async def _recover_entry(self, entry: files.TmpEntry) -> None:
        blob = None
        if entry.digest is not None:
            blob = await index.get_blob(self.db.reader, entry.digest)
        if entry.kind == "put" and entry.digest is not None and blob is None:
            # Linked into place but the transaction never committed.
            final = self.layout.blob_path(entry.digest)
            if await asyncio.to_thread(files.is_same_file, entry.path, final):
                await asyncio.to_thread(files.remove_quietly, final)
        if entry.kind == "del" and entry.digest is not None and blob is not None:
            # Moved out inside a transaction that rolled back: put it back.
            final = self.layout.blob_path(entry.digest)
            if not await asyncio.to_thread(final.exists):
                await asyncio.to_thread(files.restore_from_trash, entry.path, final)
                return
        await asyncio.to_thread(files.remove_quietly, entry.path)

    async def check_free_space(self, incoming: int) -> None:
        free, _ = await asyncio.to_thread(files.free_bytes, self.layout.root)
        if free - incoming < self.config.storage.min_free_bytes:
            raise BlobdError("insufficient_storage",
                             "not enough free disk space for this upload")


def _run_undo(steps: list[Callable[[], None]]) -> None:
    for step in reversed(steps):
        try:
            step()
        except OSError:
            # What cannot be undone now is undone by recover() at start-up.
            log.exception("could not undo a file change of a failed transaction")


def _take_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BlobdError("conflict", f"another blobd is serving {path.parent}") from None
    return fd


async def shielded(awaitable: Awaitable[T]) -> T:
    """Run to completion even if the caller is cancelled (client gone,
    shutdown): a commit half-done on the disk side must finish its
    transaction, or roll back, before anything else looks at the store."""
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise

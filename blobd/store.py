"""The store: the index and the blob tree, opened and recovered together.

Write transactions go through :meth:`Store.write`. File moves that decide
what exists (link into place, move to trash) happen *inside* them, so the
SQLite write lock is also the lock that orders "add a reference" against
"delete at zero", across tasks and across processes. Trash is unlinked after
the commit.

:meth:`Store.commit` is the fast form of :meth:`Store.write` for the hot
paths (uploads, deletes): the body runs on the commit thread, batched with
concurrent ones into one transaction (see :mod:`blobd.groupcommit`). A body
that must await more than the index (an upload session's ``in_tx``) runs
the same way with ``grouped=False``, in a :meth:`write` transaction: same
body, same undo, mirror wake-up and directory fsyncs, either way.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, NamedTuple, Sequence, TypeVar

from . import auth, files, index, index_sessions, sessionfiles
from .config import Config
from .db import Database
from .errors import BlobdError
from .groupcommit import GroupCommit
from .layout import Layout
from .quotas import LimitsCache

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Tx:
    """A write transaction and the file changes made inside it.

    ``conn``: an aiosqlite connection, or a :class:`blobd.syncdb.SyncConnection`
    when ``inline`` (the body runs on the commit thread, see
    :meth:`Store.commit`). ``trash``: files moved out of the blob tree,
    unlinked after COMMIT. ``undo``: blocking functions that reverse a file
    change, run (newest first) if the transaction rolls back, so disk and
    index agree again. ``sync_dirs``: directories that gained an entry,
    and ``sync_files``: files whose data is not durable yet, both made
    durable (:func:`blobd.files.make_durable`) before COMMIT.
    ``counters``: increments of the index's counters (``/stats``), written
    once per transaction however many bodies a group commit holds.
    """
    conn: Any
    trash: list[Path] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)
    sync_dirs: list[Path] = field(default_factory=list)
    sync_files: list[Path] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    mirror_enqueued: bool = False
    inline: bool = False

    async def enqueue_mirror(self, digest: str, op: str, now: float) -> None:
        """Queue a mirror 'put' or 'delete' in this transaction; the mirror
        worker is woken once it commits."""
        await index.enqueue_mirror(self.conn, digest, op, now)
        self.mirror_enqueued = True

    def count(self, **deltas: int) -> None:
        for name, delta in deltas.items():
            self.counters[name] = self.counters.get(name, 0) + delta

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking file work that belongs in the transaction: in place on
        the commit thread, else in a thread of its own."""
        if self.inline:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)


class ShortFile(NamedTuple):
    """An open session's file shorter than its length (a crash came
    before its allocation)."""

    have: int           # the file's size
    size: int           # the session's length
    expires_at: float

    def expired(self, now: float) -> bool:
        # As the sweeper judges it (index_sessions.expired_ids).
        return self.expires_at <= now


class Store:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.layout = Layout(config.data_dir.resolve())
        self.db = Database(self.layout.index_path, durable=config.storage.fsync,
                           writer_lock=self.layout.writer_lock_path)
        self._lock_fd: int | None = None
        # Set after a commit that queued mirror work (see Tx.enqueue_mirror).
        self.mirror_wakeup = asyncio.Event()
        self.tokens = auth.TokenCache()
        self.owner_limits = LimitsCache()
        self.commits = GroupCommit(self.db, lambda conn: Tx(conn, inline=True),
                                   functools.partial(files.make_durable, self.layout.root),
                                   on_committed=self._committed)

    async def open(self, *, exclusive: bool = True, recover: bool = True,
                   write: bool = True) -> None:
        """Open the index; ``exclusive`` takes the data-dir lock a server
        holds. ``write=False``, for a command that only reads: no
        :func:`blobd.files.make_dirs` (nor its check of the data dir's
        owner), and no lock file made where none is (no server has run
        there yet; made by root, it would keep the owner's server from
        starting)."""
        if write:
            await asyncio.to_thread(files.make_dirs, self.layout)
        if exclusive and (write or await asyncio.to_thread(self.layout.lock_path.exists)):
            self._lock_fd = await asyncio.to_thread(take_lock, self.layout.lock_path)
        try:
            await self.db.open(read_only=not write)
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
                await asyncio.to_thread(files.run_undo, tx.undo)

        async with self.db.transaction(on_rollback=undo) as conn:
            tx = Tx(conn)
            yield tx
            if tx.counters:
                await index.bump(conn, **tx.counters)
            if tx.sync_dirs or tx.sync_files:
                await asyncio.to_thread(files.make_durable, self.layout.root,
                                        tx.sync_files, tx.sync_dirs)
        if tx.mirror_enqueued:
            self.mirror_wakeup.set()
        if tx.trash:
            # Committed: a leftover here is only litter for recover().
            try:
                await asyncio.to_thread(files.remove_quietly, *tx.trash)
            except OSError as exc:
                log.warning("could not remove deleted blob files: %s", exc)

    async def commit(self, body: Callable[[Tx], Awaitable[T]],
                     cleanup: Sequence[Path] = (), *, grouped: bool = True) -> T:
        """Run ``body`` as a write transaction, shared with concurrent ones.

        ``body`` may await only ``tx.conn`` (the index functions) and
        ``tx.blocking``; it sees and must keep the same invariants as a
        :meth:`write` body, and its caller is answered after the COMMIT.
        ``cleanup`` files are removed once the transaction is over.
        ``grouped=False`` runs the same body in a :meth:`write` transaction
        of its own instead (for a body that awaits other things).
        """
        if grouped:
            return await self.commits.run(body, cleanup)  # type: ignore[no-any-return]
        try:
            async with self.write() as tx:
                return await body(tx)
        finally:
            await asyncio.to_thread(files.remove_quietly, *cleanup)

    def _committed(self, txs: Sequence[Tx]) -> None:
        """After a group commit, on the event loop."""
        if any(tx.mirror_enqueued for tx in txs):
            self.mirror_wakeup.set()

    async def recover(self) -> None:
        """Undo what a crash left in tmp/ and uploads/; never scans the blob
        tree. Runs while no other process serves the store."""
        entries = await asyncio.to_thread(files.tmp_entries, self.layout)
        for entry in entries:
            await self._recover_entry(entry)
        if entries:
            log.info("recovered %d leftover temp files", len(entries))
        await self.recover_sessions()

    async def recover_sessions(self) -> None:
        """Session files without an open session (a creation or a
        concatenation cut short), and open sessions without their file (a
        crash between the row and the allocation): with nobody serving,
        neither can be about to get its other half."""
        strays, lost = await self.session_leftovers()
        await asyncio.to_thread(files.remove_quietly,
                                *(self.layout.uploads_dir / name for name in strays))
        if lost:
            async with self.write() as tx:
                for session_id in lost:
                    await index_sessions.delete(tx.conn, session_id)
        if strays or lost:
            log.info("removed %d upload session files without a session and %d sessions"
                     " without their file", len(strays), len(lost))
        await self._allocate_short_files()
        await self._release_room_ahead()

    async def _allocate_short_files(self) -> None:
        """A session's file is allocated to its length after the row that
        records the length commits (creation; a tus PATCH setting a
        deferred length), so a crash in between left it short: its room
        not taken on the disk, where a full disk was to show at once. A
        disk with no room now leaves it so; the upload's next bytes get
        the 507."""
        mended = 0
        now = time.time()
        for session_id, short in (await self.short_session_files()).items():
            if short.expired(now):
                # The sweeper deletes it (at start-up too): its room would
                # be taken for nothing, on a disk that may well be full.
                continue
            try:
                await self.allocate_session_file(session_id, short.size)
                mended += 1
            except FileNotFoundError:
                continue    # its row went with it (recover_sessions)
            except BlobdError as exc:
                log.warning("upload %s: its file stays short of its %d bytes: %s",
                            session_id, short.size, exc)
        if mended:
            log.info("allocated the files of %d upload sessions a crash left short", mended)

    async def short_session_files(self) -> dict[str, ShortFile]:
        """Open sessions whose file is shorter than their known length."""
        short: dict[str, ShortFile] = {}
        lengths = await index_sessions.open_lengths(self.db.reader)
        for session_id, (size, expires_at) in lengths.items():
            try:
                st = await asyncio.to_thread(os.stat, self.layout.upload_path(session_id))
            except FileNotFoundError:
                continue    # a session without its file: session_leftovers
            if st.st_size < size:
                short[session_id] = ShortFile(st.st_size, size, expires_at)
        return short

    async def allocate_session_file(self, session_id: str, size: int) -> None:
        """Allocate a short session file to its length (see
        :meth:`_allocate_short_files`); insufficient storage if the disk
        has not the room."""
        await asyncio.to_thread(sessionfiles.extend, self.layout.upload_path(session_id),
                                size)

    async def _release_room_ahead(self) -> None:
        """A deferred-length PATCH reserves (and allocates) the room for its
        bytes before reading them, and gives back what it did not use when
        it ends (blobd.sessionroom); one a crash cut off gave nothing back.
        Nobody serving, nothing is arriving: each such upload holds just
        its offset again, in its file and in its owner's reservation."""
        ahead = await self.room_held_ahead()
        for session, _ in ahead:
            await self.release_room_ahead(session)
        if ahead:
            log.info("gave back the room %d deferred-length uploads had taken ahead of"
                     " bytes that never came", len(ahead))

    async def room_held_ahead(self) -> list[tuple[index_sessions.Session, int]]:
        """Open deferred-length uploads that reserve room past their offset
        (see :meth:`_release_room_ahead`), each with its file's size; not
        those without their file (:meth:`session_leftovers`)."""
        ahead = []
        for session in await index_sessions.holding_ahead(self.db.reader):
            try:
                st = await asyncio.to_thread(os.stat, self.layout.upload_path(session.id))
            except FileNotFoundError:
                continue
            ahead.append((session, st.st_size))
        return ahead

    async def release_room_ahead(self, session: index_sessions.Session) -> None:
        """Make an upload of :meth:`room_held_ahead` hold just its offset:
        its file cut there first (the disk never holds bytes no reservation
        covers), then its owner's reservation released."""
        await asyncio.to_thread(sessionfiles.cut_to, self.layout.upload_path(session.id),
                                session.upload_offset)
        async with self.write() as tx:
            await index_sessions.hold(tx.conn, session, session.upload_offset)

    async def session_leftovers(self) -> tuple[set[str], set[str]]:
        """(names of files in uploads/ without an open session, ids of open
        sessions without their file)."""
        open_ids = await index_sessions.open_ids(self.db.reader)
        try:
            present = set(await asyncio.to_thread(os.listdir, self.layout.uploads_dir))
        except FileNotFoundError:   # a read-only fsck makes no directory
            present = set()
        return present - open_ids, open_ids - present

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

    async def recover_dead(self, pid: int) -> tuple[int, int]:
        """Undo what a dead worker process left in tmp/ while its siblings
        serve. Under the write lock, like every file move of a live process,
        so nothing is half-way while this looks; returns the tmp/ entries
        seen and the committed sessions' files removed from uploads/."""
        async with self.write() as tx:
            entries = [e for e in await asyncio.to_thread(files.tmp_entries, self.layout)
                       if e.pid == pid]
            for entry in entries:
                await self._recover_entry(entry)
            # A completion cut between its commit and the removal of the
            # session's file left a second name of the blob's bytes, which
            # would keep them on disk after the blob's deletion. No pid
            # marks it, but no request writes a committed session's file.
            committed = await index_sessions.committed_ids(tx.conn)
            present = set(await asyncio.to_thread(os.listdir, self.layout.uploads_dir))
            stale = [self.layout.upload_path(i) for i in sorted(committed & present)]
            await asyncio.to_thread(files.remove_quietly, *stale)
        return len(entries), len(stale)

    async def check_free_space(self, incoming: int) -> None:
        await asyncio.to_thread(self.ensure_free_space, incoming)

    def ensure_free_space(self, incoming: int) -> None:
        """:meth:`check_free_space`, blocking."""
        free, _ = files.free_bytes(self.layout.root)
        if free - incoming < self.config.storage.min_free_bytes:
            raise BlobdError("insufficient_storage",
                             "not enough free disk space for this upload")


def take_lock(path: Path) -> int:
    """flock the data dir's lock file (held by the serving process); the fd."""
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

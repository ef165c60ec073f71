"""Group commit: the commits of concurrent requests share one transaction.

With ``[storage] fsync = true`` every commit ends in a journal commit of the
file system (the new directory entry, fsynced) and an fsync of SQLite's WAL.
Each costs milliseconds whatever it carries, and both must happen under the
write lock, so one commit at a time capped a server at a few hundred small
uploads per second. Here, commits that arrive while a transaction is running
wait for it and then go together: one ``BEGIN IMMEDIATE``, each body in its
own ``SAVEPOINT``, every new file and directory entry made durable (one
``syncfs`` for a busy batch, see :func:`blobd.files.make_durable`), one
``COMMIT``. Nothing
waits on purpose; a lone commit goes at once, alone.

A body is an ``async`` function of a :class:`~blobd.store.Tx`, written
against the index's usual functions; the whole batch runs in one call on the
commit thread (see :mod:`blobd.syncdb`), so a commit costs one thread trip
instead of one per statement.

What each caller gets is exactly what a transaction of its own would give:

* a body that raises is rolled back to its savepoint (its SQL undone, as a
  failed transaction of its own would be) and its caller gets the
  exception; the other bodies of the batch go on and commit;
* a body sees the changes of the bodies before it in the batch, as it would
  had they committed just before it: the quota check, refcounts and the
  "add a reference" against "delete at zero" ordering hold as before;
* nobody is answered before the ``COMMIT`` that contains their change is
  durable; if the ``COMMIT`` (or an fsync before it) fails, every caller of
  the batch gets the error and nothing of the batch is in the index;
* file changes are undone with the SQL they went with (``Tx.undo``): a body
  rolled back to its savepoint undoes its own, a batch that fails undoes
  those of every body in it, before the write lock is let go;
* a full disk is ``insufficient_storage``, as in :meth:`blobd.db.Database.transaction`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from . import files, index
from .db import Database, is_disk_full
from .errors import BlobdError
from .syncdb import SyncConnection, drive

log = logging.getLogger(__name__)

# Enough to absorb every request one process has in flight; a bound so one
# transaction (and the lock it holds) stays short.
MAX_BATCH = 64

Body = Callable[[Any], Awaitable[Any]]  # (tx: blobd.store.Tx) -> result
MakeTx = Callable[[SyncConnection], Any]
MakeDurable = Callable[[list[Path], list[Path]], None]  # (files, dirs)
OnCommitted = Callable[[list[Any]], None]  # the committed txs, on the event loop


@dataclass
class _Item:
    body: Body
    cleanup: Sequence[Path]
    future: asyncio.Future[Any]


@dataclass
class _Outcome:
    ok: bool
    value: Any
    tx: Any = None


@dataclass
class GroupCommit:
    """Batches :meth:`run` calls of one process into shared transactions."""

    db: Database
    make_tx: MakeTx
    make_durable: MakeDurable
    on_committed: OnCommitted | None = None
    transactions: int = 0  # how many batches have run (tests, metrics)
    _pending: list[_Item] = field(default_factory=list)
    _flusher: asyncio.Task[None] | None = None

    async def run(self, body: Body, cleanup: Sequence[Path] = ()) -> Any:
        """Run ``body`` in the next transaction and return what it returns.
        ``cleanup`` files are removed when the batch is over, whatever
        happened to it."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Item(body, tuple(cleanup), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="blobd-group-commit")
        return await future

    async def _flush(self) -> None:
        while self._pending:
            async with self.db.write_lock:
                # Taken only now: whatever queued while the lock was busy joins.
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                self.transactions += 1
                work = asyncio.ensure_future(self.db.on_commit_thread(
                    functools.partial(run_batch, make_tx=self.make_tx,
                                      make_durable=self.make_durable, batch=batch)))
                try:
                    # wait() never raises the batch's error: every caller
                    # of the batch gets it, in _settle.
                    await asyncio.wait([work])
                except asyncio.CancelledError:
                    # The batch runs on in its thread: keep the lock until it
                    # is over, answer its callers, give up on the rest.
                    await asyncio.wait([work])
                    self._settle(batch, work)
                    for item in self._pending:
                        item.future.cancel()
                    raise
            self._settle(batch, work)

    def _settle(self, batch: list[_Item], work: asyncio.Future[list[_Outcome]]) -> None:
        _answer(batch, work)
        if self.on_committed is not None and work.exception() is None:
            self.on_committed([o.tx for o in work.result() if o.ok])


def _answer(batch: list[_Item], work: asyncio.Future[list[_Outcome]]) -> None:
    error = work.exception()
    outcomes = [_Outcome(False, error)] * len(batch) if error else work.result()
    for item, outcome in zip(batch, outcomes):
        if item.future.done():
            continue  # its caller was cancelled; the work is done all the same
        if outcome.ok:
            item.future.set_result(outcome.value)
        else:
            item.future.set_exception(outcome.value)


def run_batch(conn: sqlite3.Connection, make_tx: MakeTx, make_durable: MakeDurable,
              batch: list[_Item]) -> list[_Outcome]:
    """One transaction for the whole batch; runs on the commit thread."""
    try:
        outcomes = _transaction(conn, make_tx, make_durable, batch)
        _after_commit(outcomes)
        return outcomes
    finally:
        for item in batch:
            _remove(item.cleanup)


def _transaction(conn: sqlite3.Connection, make_tx: MakeTx, make_durable: MakeDurable,
                 batch: list[_Item]) -> list[_Outcome]:
    sync = SyncConnection(conn)
    txs: list[Any] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        alone = len(batch) == 1
        outcomes = []
        for item in batch:
            txs.append(make_tx(sync))
            outcomes.append(_run_body(conn, txs[-1], item.body, alone))
        done = [o.tx for o in outcomes if o.ok]
        counts: Counter[str] = Counter()
        for tx in done:
            counts.update(tx.counters)
        if counts:
            drive(index.bump(sync, **counts))
        to_sync = [f for tx in done for f in tx.sync_files]
        dirs = [d for tx in done for d in tx.sync_dirs]
        if to_sync or dirs:
            make_durable(to_sync, dirs)
        conn.execute("COMMIT")
    except BaseException as exc:
        # After a failed COMMIT SQLite may or may not have rolled back.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        files.run_undo([step for tx in txs for step in tx.undo])
        if is_disk_full(exc):
            raise BlobdError("insufficient_storage",
                             "the disk is full (the index cannot grow)") from exc
        raise
    return outcomes


def _run_body(conn: sqlite3.Connection, tx: Any, body: Body, alone: bool) -> _Outcome:
    """One body in its savepoint (a lone body needs none: should it fail,
    the caller rolls the whole transaction back)."""
    if not alone:
        conn.execute("SAVEPOINT body")
    try:
        value = drive(body(tx))
    except Exception as exc:
        if alone or not conn.in_transaction:
            # Alone, or SQLite gave up the whole transaction (disk full, I/O
            # error), the bodies before this one with it.
            raise
        conn.execute("ROLLBACK TO body")
        conn.execute("RELEASE body")
        files.run_undo(tx.undo)
        tx.undo.clear()  # done: the batch's own undo must not repeat it
        if is_disk_full(exc):
            exc = BlobdError("insufficient_storage", "the disk is full (the index cannot grow)")
        return _Outcome(False, exc, tx)
    if not alone:
        conn.execute("RELEASE body")
    return _Outcome(True, value, tx)


def _after_commit(outcomes: list[_Outcome]) -> None:
    """Committed: files the batch moved out of the blob tree can go."""
    trash = [path for o in outcomes if o.ok for path in o.tx.trash]
    try:
        files.remove_quietly(*trash)
    except OSError as exc:
        log.warning("could not remove deleted blob files: %s", exc)


def _remove(paths: Sequence[Path]) -> None:
    try:
        files.remove_quietly(*paths)
    except OSError as exc:
        log.warning("could not remove temp files: %s", exc)

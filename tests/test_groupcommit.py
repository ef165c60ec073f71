"""Group commit (blobd/groupcommit.py) and the synchronous index connection
it runs on (blobd/syncdb.py), on a real store: concurrent commits share
transactions, yet each one succeeds or fails alone, sees those before it,
and is answered only once committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from pathlib import Path

import aiosqlite
import pytest

from blobd import files, index
from blobd.db import Database
from blobd.errors import BlobdError
from blobd.index import BlobRecord
from blobd.store import Store, Tx
from blobd.syncdb import SuspendedError, SyncConnection, drive
from conftest import b3, make_config


@pytest.fixture
async def store(tmp_path: Path):
    store = Store(make_config(tmp_path))
    await store.open()
    yield store
    await store.close()


async def counter(store: Store, name: str) -> int:
    return (await index.counters(store.db.reader)).get(name, 0)


def bump(name: str, fail: bool = False):  # type: ignore[no-untyped-def]
    async def body(tx: Tx) -> str:
        await index.bump(tx.conn, **{name: 1})
        if fail:
            raise BlobdError("conflict", "this one fails")
        return name
    return body


async def test_concurrent_commits_share_transactions(store: Store) -> None:
    results = await asyncio.gather(*(store.commit(bump("n")) for _ in range(50)))
    assert results == ["n"] * 50
    assert await counter(store, "n") == 50
    # The first went alone; the rest queued behind it and went together.
    assert store.commits.transactions < 10


async def test_a_failing_commit_fails_alone(store: Store) -> None:
    bodies = [bump("ok", fail=(i == 5)) for i in range(10)]
    results = await asyncio.gather(*(store.commit(b) for b in bodies),
                                   return_exceptions=True)
    assert [isinstance(r, BlobdError) for r in results] == [i == 5 for i in range(10)]
    assert await counter(store, "ok") == 9  # its bump was rolled back, no other
    with pytest.raises(BlobdError):
        await store.commit(bump("lone", fail=True))  # a batch of one
    assert await counter(store, "lone") == 0
    assert await store.commit(bump("after")) == "after"


async def test_a_body_sees_the_bodies_before_it(store: Store) -> None:
    async def body(tx: Tx) -> int:
        before = (await index.counters(tx.conn)).get("seen", 0)
        await index.bump(tx.conn, seen=1)
        return before
    seen = await asyncio.gather(*(store.commit(body) for _ in range(20)))
    assert sorted(seen) == list(range(20))


async def test_a_body_may_await_only_its_connection(store: Store) -> None:
    async def sleeper(tx: Tx) -> None:
        await index.bump(tx.conn, sleeper=1)
        await asyncio.sleep(0)
    results = await asyncio.gather(store.commit(sleeper), store.commit(bump("fine")),
                                   return_exceptions=True)
    assert isinstance(results[0], SuspendedError)
    assert results[1] == "fine"
    assert await counter(store, "sleeper") == 0


async def test_cleanup_files_go_whatever_happens(store: Store) -> None:
    temps = [store.layout.new_temp_path() for _ in range(2)]
    for path in temps:
        path.write_bytes(b"x")
    await store.commit(bump("a"), cleanup=[temps[0]])
    with pytest.raises(BlobdError):
        await store.commit(bump("b", fail=True), cleanup=[temps[1]])
    assert not any(path.exists() for path in temps)


async def test_blocking_work_runs_in_place_on_the_commit_thread(store: Store,
                                                                tmp_path: Path) -> None:
    import threading
    seen: list[str] = []

    async def body(tx: Tx) -> None:
        await tx.blocking(lambda: seen.append(threading.current_thread().name))
    await store.commit(body)
    async with store.write() as tx:  # the other kind of transaction: a thread of its own
        await tx.blocking(lambda: seen.append(threading.current_thread().name))
    assert seen[0].startswith("blobd-commit")
    assert not seen[1].startswith("blobd-commit")


async def test_sync_connection_speaks_the_index_like_aiosqlite(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    plain = sqlite3.connect(path, isolation_level=None)
    plain.row_factory = sqlite3.Row
    plain.execute("CREATE TABLE blobs (hash TEXT PRIMARY KEY, sha256 TEXT, size INT,"
                  " content_type TEXT, created_at REAL, refcount INT DEFAULT 0, zero_at REAL,"
                  " audio TEXT, mirror_state TEXT NOT NULL DEFAULT 'off')")
    sync = SyncConnection(plain)
    audio = {"duration": 2.0, "bitrate": 32000, "sample_rate": 22050, "channels": 1,
             "codec": "mp3", "bits_per_sample": None}
    record = BlobRecord(b3(b"x"), "s" * 64, 1, "audio/mpeg", 1.5, audio=audio)
    drive(index.insert_blob(sync, record))
    assert drive(index.get_blob(sync, record.hash)) == record
    assert drive(index.hash_for_sha256(sync, "s" * 64)) == record.hash
    cursor = drive(_rowcount(sync))
    assert cursor == 1
    async with aiosqlite.connect(path) as other:
        other.row_factory = aiosqlite.Row
        assert await index.get_blob(other, record.hash) == BlobRecord(
            record.hash, record.sha256, 1, "audio/mpeg", 1.5, refcount=1, audio=audio)
    plain.close()


async def _rowcount(conn: SyncConnection) -> int:
    cur = await conn.execute("UPDATE blobs SET refcount = 1")
    async with conn.execute("SELECT refcount FROM blobs") as rows:
        assert (await rows.fetchone())["refcount"] == 1
    return cur.rowcount


def test_drive_gives_back_what_the_coroutine_returns_or_raises() -> None:
    async def value() -> int:
        return 7

    async def error() -> None:
        raise ValueError("no")
    assert drive(value()) == 7
    with pytest.raises(ValueError):
        drive(error())
    with pytest.raises(SuspendedError):
        drive(asyncio.sleep(0))


async def test_quota_holds_under_concurrent_uploads_in_one_process(server) -> None:
    login = await server(quotas={"default": {"max_blobs": 10}})
    alice = await login("alice")
    bodies = [f"body {i}".encode() * 100 for i in range(40)]
    responses = await asyncio.gather(*(alice.request("POST", "/blobs", data=b)
                                       for b in bodies))
    statuses = [r.status for r in responses]
    assert statuses.count(201) == 10 and statuses.count(507) == 30
    row = await alice.store.db.fetchone("SELECT used_blobs FROM owners WHERE owner = 'alice'")
    assert row["used_blobs"] == 10
    assert len(files.tmp_entries(alice.store.layout)) == 0


async def test_a_body_rolled_back_in_a_batch_undoes_its_file_changes(
        store: Store, tmp_path: Path) -> None:
    """Tx.undo runs for the body that failed (its savepoint rolled back) and
    for no other: the disk agrees with the index either way."""
    made = [tmp_path / f"file{i}" for i in range(6)]

    def body(i: int):  # type: ignore[no-untyped-def]
        async def run(tx: Tx) -> int:
            await index.bump(tx.conn, undo_test=1)
            await tx.blocking(made[i].write_bytes, b"x")
            tx.undo.append(made[i].unlink)
            if i == 3:
                raise BlobdError("conflict", "this one fails")
            return i
        return run

    results = await asyncio.gather(*(store.commit(body(i)) for i in range(6)),
                                   return_exceptions=True)
    assert [isinstance(r, BlobdError) for r in results] == [i == 3 for i in range(6)]
    assert [path.exists() for path in made] == [i != 3 for i in range(6)]
    assert await counter(store, "undo_test") == 5


async def test_a_commit_that_queues_mirror_work_wakes_the_mirror_worker(
        store: Store) -> None:
    async def body(tx: Tx) -> None:
        await tx.enqueue_mirror(b3(b"mirrored"), "put", 0.0)

    await store.commit(bump("quiet"))
    assert not store.mirror_wakeup.is_set()
    await store.commit(body)
    assert store.mirror_wakeup.is_set()
    rows = await store.db.fetchall("SELECT hash, op FROM mirror_queue")
    assert [(r["hash"], r["op"]) for r in rows] == [(b3(b"mirrored"), "put")]


async def test_a_commit_with_in_tx_may_await_anything(store: Store) -> None:
    """commit_file's in_tx (upload sessions) runs in a transaction of its
    own, not on the commit thread: it may await more than the index, and
    its work commits with the blob."""
    from blobd import ingest

    async def body():  # type: ignore[no-untyped-def]
        yield b"session body"

    async def claim(tx: Tx, digest: str) -> None:
        await asyncio.sleep(0)  # would be refused (SuspendedError) on the commit thread
        await index.bump(tx.conn, claimed=1)

    received = await ingest.receive(store, body(), limit=1 << 20)
    before = store.commits.transactions
    stored = await ingest.commit_file(store, received, owner="alice", ref=None,
                                      content_type=None, in_tx=claim)
    assert stored.created and stored.blob.hash == b3(b"session body")
    assert store.commits.transactions == before
    assert await counter(store, "claimed") == 1
    path = store.layout.blob_path(stored.blob.hash)
    assert path.read_bytes() == b"session body"
    assert list(store.layout.tmp_dir.iterdir()) == []


def _spill_files() -> list[str]:
    """SQLite's temp files this process holds open (made and unlinked at once)."""
    names = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if "etilqs_" in target:
                names.append(target)
    return names


async def test_a_big_batch_keeps_its_savepoint_journal_in_memory(store: Store) -> None:
    """Each body's SAVEPOINT journals the first copy of every page the batch
    changes; past 64 KiB SQLite spills that journal to a new file in
    /var/tmp, one per transaction, with one write per page. The commit
    connection keeps it in memory."""
    async def populate(tx: Tx) -> None:
        for i in range(3000):
            await index.insert_blob(tx.conn, BlobRecord(
                b3(f"old {i}".encode()), b3(f"old sha {i}".encode()), 1, "x/y", 0.0))
    await store.commit(populate)
    seen: list[list[str]] = []

    def body(i: int):  # type: ignore[no-untyped-def]
        async def run(tx: Tx) -> None:
            # Random keys: each row changes leaves of three B-trees that
            # held data before the transaction, so they are journaled.
            for j in range(10):
                await index.insert_blob(tx.conn, BlobRecord(
                    b3(f"new {i} {j}".encode()), b3(f"new sha {i} {j}".encode()),
                    1, "x/y", 0.0))
            seen.append(_spill_files())
        return run

    await asyncio.gather(*(store.commit(body(i)) for i in range(40)))
    assert len(seen) == 40 and store.commits.transactions < 10  # real batches
    assert seen == [[]] * 40


async def test_a_transaction_cancelled_during_its_commit_stays_committed(tmp_path):
    """A shutdown cancels a sweeper while its COMMIT runs in aiosqlite's
    thread. The transaction committed: it must not be rolled back or its
    file work undone, and the cancellation must go on (a sweeper that
    swallowed it kept a stopping server alive)."""
    db = Database(tmp_path / "index.sqlite3", durable=False)
    await db.open()
    undone: list[bool] = []

    async def undo() -> None:
        undone.append(True)

    async def sweep() -> None:
        async with db.transaction(on_rollback=undo) as conn:
            await conn.execute("INSERT INTO counters (name, value) VALUES ('swept', 1)")
            # Lands once the COMMIT is under way, before it is done.
            asyncio.get_running_loop().call_soon(asyncio.current_task().cancel)

    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(sweep())
        rows = await db.reader.execute_fetchall("SELECT value FROM counters WHERE name = 'swept'")
        async with db.transaction() as conn:  # the connection is usable, not stuck
            await conn.execute("UPDATE counters SET value = 2 WHERE name = 'swept'")
    finally:
        await db.close()
    assert [tuple(row) for row in rows] == [(1,)] and undone == []

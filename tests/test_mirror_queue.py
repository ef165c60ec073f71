"""The mirror outbox's rules, on a real SQLite index (no S3 needed)."""

from __future__ import annotations

import random
import time

from blobd.mirror import queue
from conftest import b3


def test_backoff_doubles_with_jitter_up_to_the_cap():
    rng = random.Random(7)
    for attempts, full in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (12, 300.0), (90, 300.0)]:
        delays = [queue.backoff(attempts, 300.0, rng) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 4  # really spread out


async def test_one_operation_per_hash_at_a_time_in_queue_order(alice):
    store = alice.store
    a, b = b3(b"a"), b3(b"b")
    now = time.time()
    async with store.write() as tx:
        for digest, op in [(a, "put"), (a, "delete"), (b, "put"), (a, "put")]:
            await tx.enqueue_mirror(digest, op, now)
    due = await queue.due(store.db.reader, now, 10)
    assert [(job.hash, job.op) for job in due] == [(a, "put"), (b, "put")]
    assert await queue.due(store.db.reader, now, 10, busy={a}) == due[1:]

    async with store.write() as tx:
        await queue.finish(tx.conn, due[0])
        delay = await queue.fail(tx.conn, due[1], "boom", now, cap=60)
    due = await queue.due(store.db.reader, now, 10)
    assert [(job.hash, job.op) for job in due] == [(a, "delete")]
    assert await queue.next_due_at(store.db.reader, busy={a}) == now + delay
    assert await queue.counts(store.db.reader) == {"pending": 3, "failed": 1,
                                                   "last_error": "boom",
                                                   "oldest_enqueued_at": now}
    async with store.write() as tx:
        assert await queue.retry_now(tx.conn, now) == 1
    assert len(await queue.due(store.db.reader, now, 10)) == 2


async def test_enqueue_wakes_the_worker_only_after_commit(alice):
    store = alice.store
    store.mirror_wakeup.clear()
    async with store.write() as tx:
        await tx.enqueue_mirror(b3(b"x"), "put", time.time())
        assert not store.mirror_wakeup.is_set()
    assert store.mirror_wakeup.is_set()


async def test_sync_marks_only_puts_queued_before_it_began(alice):
    """``blobd mirror sync`` found these blobs in the bucket after the queue
    stood at ``since``: their earlier puts are done, a later one is not (the
    blob was stored again after its object may have been deleted), and a
    blob with a deletion queued at ``since`` is left to the worker."""
    store = alice.store
    again, plain, deleting = b3(b"again"), b3(b"plain"), b3(b"deleting")
    for data in (b"again", b"plain", b"deleting"):
        await alice.put(data)
    now = time.time()
    async with store.write() as tx:
        for digest, op in [(again, "put"), (plain, "put"), (deleting, "delete"),
                           (deleting, "put")]:
            await tx.enqueue_mirror(digest, op, now)
    since = await queue.position(store.db.reader)
    assert since.deleting == {deleting}
    async with store.write() as tx:
        await tx.enqueue_mirror(again, "put", now)  # stored again while sync ran

    async with store.write() as tx:
        await queue.mark_mirrored(tx.conn, [again, plain, deleting], since)
    rows = await store.db.fetchall("SELECT hash, op, id FROM mirror_queue ORDER BY id")
    assert [(row["hash"], row["op"]) for row in rows] == [
        (deleting, "delete"), (deleting, "put"), (again, "put")]
    assert rows[-1]["id"] > since.last_id
    states = {row["hash"]: row["mirror_state"] for row in
              await store.db.fetchall("SELECT hash, mirror_state FROM blobs")}
    assert states[plain] == "done"
    assert states[again] != "done" and states[deleting] != "done"

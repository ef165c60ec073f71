"""``blobd mirror sync`` run in-process beside a serving store, against a
real SeaweedFS: what happens when the server changes a blob while the sync
works, and failures of single requests. The target is the real one; where
a test needs something to happen at one precise moment of the sync (or one
request to fail), it wraps the target (:class:`Interleaved`)."""

from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from blobd import auth
from blobd.http.app import create_app
from blobd.http.keys import STORE
from blobd.mirror.backup import backup_index
from blobd.mirror.common import make_target, run_pool
from blobd.mirror.restore import restore
from blobd.mirror.sync import sync
from blobd.storage.s3 import S3Error
from conftest import Api, b3, make_config
from mirrorhelp import eventually, in_thread, mirror_section


class Interleaved:
    """The real target, running ``after_list`` once a listing is read to
    its end, ``before_delete`` before each DELETE, and ``before_put`` before
    the first upload: once the upload has its file open if ``put_opened``
    (what it reads then survives the file's deletion), else before it opens
    the file; ``before_read`` before each read of an object whole;
    ``before_head`` before each HEAD;
    ``failing_heads`` and ``failing_reads``: keys whose HEAD, or read,
    fails as an unreachable endpoint does."""

    def __init__(self, target: Any, *, after_list: Callable[[], Awaitable[None]] | None = None,
                 before_delete: Callable[[str], Awaitable[None]] | None = None,
                 before_put: Callable[[str], Awaitable[None]] | None = None,
                 before_read: Callable[[str], Awaitable[None]] | None = None,
                 before_head: Callable[[str], Awaitable[None]] | None = None,
                 put_opened: bool = False, failing_heads: set[str] = frozenset(),
                 failing_reads: set[str] = frozenset()) -> None:
        self._target = target
        self._after_list = after_list
        self._before_delete = before_delete
        self._before_put = before_put
        self._put_opened = put_opened
        self._failing_heads = failing_heads
        self._before_read = before_read
        self._before_head = before_head
        self._failing_reads = failing_reads

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    async def list(self, prefix: str, page_size: int = 1000) -> AsyncIterator[Any]:
        async for item in self._target.list(prefix, page_size):
            yield item
        after, self._after_list = self._after_list, None
        if after is not None:
            await after()

    async def delete(self, key: str) -> None:
        if self._before_delete is not None:
            await self._before_delete(key)
        await self._target.delete(key)

    async def put_file(self, key: str, path: Any, *args: Any, **kwargs: Any) -> None:
        before, self._before_put = self._before_put, None
        if before is None:
            return await self._target.put_file(key, path, *args, **kwargs)
        if not self._put_opened:
            await before(key)
            return await self._target.put_file(key, path, *args, **kwargs)
        fd = os.open(path, os.O_RDONLY)
        try:
            await before(key)
            # The open file, whatever became of its name meanwhile (Linux).
            await self._target.put_file(key, f"/proc/self/fd/{fd}", *args, **kwargs)
        finally:
            os.close(fd)

    async def head(self, key: str) -> dict[str, Any] | None:
        if self._before_head is not None:
            await self._before_head(key)
        if key in self._failing_heads:
            raise S3Error(f"HEAD {self.url(key)}: Read timeout on endpoint URL",
                          retryable=True)
        return await self._target.head(key)

    async def read_through(self, key: str, *args: Any, **kwargs: Any) -> int:
        if self._before_read is not None:
            await self._before_read(key)
        if key in self._failing_reads:
            raise S3Error(f"GET {self.url(key)}: Response ended prematurely", retryable=True)
        return await self._target.read_through(key, *args, **kwargs)


async def login(client, owner: str = "alice") -> Api:
    async with client.app[STORE].write() as tx:
        _, token = await auth.create_token(tx.conn, owner, auth.parse_scopes("read,write"))
    return Api(client, token, owner)


async def mirror_state(api: Api, digest: str) -> str:
    meta = await api.request("GET", f"/blobs/{digest}/meta")
    return (await meta.json())["mirror"]["state"]


async def drained(api: Api) -> bool:
    return not await api.store.db.fetchall("SELECT id FROM mirror_queue")


async def mirrored_as(api: Api, bucket, data: bytes) -> bool:
    """The object holds ``data``, and the blob says so."""
    return (await in_thread(bucket.get, bucket.key(b3(data))) == data
            and await mirror_state(api, b3(data)) == "done")


@pytest.fixture
def mirror_config(tmp_path, s3server, mirror_prefix):
    def make(**options: Any):
        options.setdefault("backup_interval_seconds", 0)
        return make_config(tmp_path, mirror=mirror_section(s3server, mirror_prefix, **options))
    return make


async def test_a_blob_stored_again_while_sync_runs_keeps_its_put(
        aiohttp_client, mirror_config, bucket):
    config = mirror_config()
    alice = await login(await aiohttp_client(create_app(config)))
    # A sibling process of [server] workers = 2: its commits do not wake the
    # first one's mirror worker, which notices them at its next poll.
    sibling = await login(await aiohttp_client(create_app(config, background=False,
                                                          primary=False)))
    data = os.urandom(20_000)
    await alice.put(data)
    await eventually(lambda: mirrored_as(alice, bucket, data), what="first upload")

    async def deleted_and_stored_again() -> None:
        # After sync listed the bucket (the object there): the blob is
        # deleted, its object with it, and it is stored again.
        assert (await alice.request("DELETE", f"/blobs/{b3(data)}")).status == 204
        await eventually(lambda: drained(alice), what="object deleted")
        assert await in_thread(bucket.get, bucket.key(b3(data))) is None
        assert (await sibling.put(data)).status == 201

    async with make_target(config.mirror) as target:
        await sync(alice.store, Interleaved(target, after_list=deleted_and_stored_again),
                   config.mirror)
    assert await mirror_state(alice, b3(data)) != "done"
    alice.store.mirror_wakeup.set()  # rather than wait for the worker's poll
    await eventually(lambda: mirrored_as(alice, bucket, data), timeout=10,
                     what="the put of the blob stored again")


async def test_sync_delete_puts_back_a_blob_stored_again_before_its_delete(
        server, mirror_config, bucket):
    config = mirror_config(keep_deleted=True)  # a deleted blob's object stays
    alice = await (await server(config=config))("alice")
    data, kept = os.urandom(20_000), os.urandom(100)
    for blob in (data, kept):
        await alice.put(blob)
        await eventually(lambda: mirrored_as(alice, bucket, blob), what="first upload")
    assert (await alice.request("DELETE", f"/blobs/{b3(data)}")).status == 204

    async def stored_again(key: str) -> None:
        # Between sync's check of the index and its DELETE: the blob's new
        # put finds the object still there and has nothing to upload.
        assert (await alice.put(data)).status == 201
        await eventually(lambda: drained(alice), what="the put done")

    async with make_target(config.mirror) as target:
        # The store's own index backup: the bucket is known to be its own.
        await backup_index(alice.store, target, config.mirror)
        report = await sync(alice.store, Interleaved(target, before_delete=stored_again),
                            config.mirror, delete=True)
    assert report.deleted == 1 and report.requeued == [b3(data)]
    await eventually(lambda: mirrored_as(alice, bucket, data), timeout=10,
                     what="the object back")


async def deleted_and_done(api: Api, data: bytes) -> None:
    """Delete the blob through the API and wait for its mirror delete job."""
    assert (await api.request("DELETE", f"/blobs/{b3(data)}")).status == 204
    await eventually(lambda: drained(api), what="the delete job done")


async def a_blob_to_upload(api: Api, bucket) -> tuple[bytes, bytes]:
    """Two mirrored blobs, the first one's object lost from the bucket (so
    a sync uploads it); the second stays, so the index is never empty."""
    data, kept = os.urandom(30_000), os.urandom(1000)
    for blob in (data, kept):
        await api.put(blob)
        await eventually(lambda: mirrored_as(api, bucket, blob), what="first upload")
    await in_thread(bucket.delete, bucket.key(b3(data)))
    return data, kept


@pytest.mark.parametrize("keep_deleted", [False, True], ids=["delete", "keep_deleted"])
async def test_a_blob_deleted_while_sync_uploads_it_stays_deleted(
        server, s3server, mirror_prefix, bucket, tmp_path, keep_deleted):
    section = mirror_section(s3server, mirror_prefix, keep_deleted=keep_deleted,
                             backup_interval_seconds=0)
    config = make_config(tmp_path, mirror=section)
    alice = await (await server(config=config))("alice")
    data, kept = await a_blob_to_upload(alice, bucket)

    async with make_target(config.mirror) as target:
        # The server deletes the blob while sync uploads it; its delete job
        # runs at once and finds no object yet.
        during = Interleaved(target, before_put=lambda key: deleted_and_done(alice, data),
                             put_opened=True)
        report = await sync(alice.store, during, config.mirror)
        assert report.backup is not None
        await eventually(lambda: drained(alice), what="the queue drained")
        if not keep_deleted:
            assert await in_thread(bucket.digests) == {b3(kept)}

        # A restore from the backup the sync ended with leaves it deleted.
        elsewhere = make_config(tmp_path, server={"data_dir": str(tmp_path / "restored")},
                                mirror=section)
        restored = await restore(elsewhere, target)
    assert b3(data) not in restored.orphans and restored.restored == 1
    assert not (tmp_path / "restored" / "blobs" / b3(data)[:2] / b3(data)[2:4]
                / b3(data)).exists()
    assert report.gone == [b3(data)] and report.uploaded == 0 and not report.failed


async def test_a_blob_deleted_before_sync_opens_its_file_is_no_failure(
        server, mirror_config, bucket):
    config = mirror_config()
    alice = await (await server(config=config))("alice")
    data, kept = await a_blob_to_upload(alice, bucket)

    async with make_target(config.mirror) as target:
        before = Interleaved(target, before_put=lambda key: deleted_and_done(alice, data))
        report = await sync(alice.store, before, config.mirror)
    assert not report.failed and report.gone == [b3(data)] and report.uploaded == 0
    assert await in_thread(bucket.digests) == {b3(kept)}


async def test_sync_verify_reports_a_failed_head_and_goes_on(server, mirror_config, bucket):
    config = mirror_config()
    alice = await (await server(config=config))("alice")
    blobs = [os.urandom(3000 + n) for n in range(4)]
    for data in blobs:
        await alice.put(data)
    for data in blobs:
        await eventually(lambda: mirrored_as(alice, bucket, data), what="mirrored")
    unlucky = b3(blobs[1])

    async with make_target(config.mirror) as target:
        failing = Interleaved(target, failing_heads={bucket.key(unlucky)})
        report = await sync(alice.store, failing, config.mirror, verify=True, jobs=2)
    assert list(report.failed) == [unlucky]
    assert report.failed[unlucky].startswith("verify: HEAD ")
    assert report.in_sync == 3 and report.mismatched == 0 and report.uploaded == 0
    assert report.backup is not None


@pytest.mark.parametrize("flag", ["verify", "verify_content"])
async def test_a_blob_deleted_before_verify_heads_it_is_not_mismatched(
        server, mirror_config, bucket, flag):
    """Found by review: its object gone with it, the HEAD's 404 counted it
    mismatched (and it was then skipped as deleted)."""
    config = mirror_config()
    alice = await (await server(config=config))("alice")
    data, kept = os.urandom(3000), os.urandom(1000)
    for blob in (data, kept):
        await alice.put(blob)
        await eventually(lambda: mirrored_as(alice, bucket, blob), what="mirrored")

    async def deleted(key: str) -> None:
        if key == bucket.key(b3(data)):
            await deleted_and_done(alice, data)  # its object deleted with it

    async with make_target(config.mirror) as target:
        during = Interleaved(target, before_head=deleted)
        report = await sync(alice.store, during, config.mirror, **{flag: True})
    assert report.mismatched == 0 and not report.failed and not report.damaged
    assert report.gone == [b3(data)] and report.uploaded == 0 and report.in_sync == 1
    assert await in_thread(bucket.digests) == {b3(kept)}


async def test_sync_verify_content_reports_a_failed_read_and_goes_on(
        server, mirror_config, bucket):
    config = mirror_config()
    alice = await (await server(config=config))("alice")
    blobs = [os.urandom(3000 + n) for n in range(4)]
    for data in blobs:
        await alice.put(data)
    for data in blobs:
        await eventually(lambda: mirrored_as(alice, bucket, data), what="mirrored")
    unlucky, rotten = b3(blobs[1]), b3(blobs[2])
    await in_thread(bucket.rot, bucket.key(rotten), os.urandom(len(blobs[2])))

    async with make_target(config.mirror) as target:
        failing = Interleaved(target, failing_reads={bucket.key(unlucky)})
        report = await sync(alice.store, failing, config.mirror, verify_content=True, jobs=2)
    assert list(report.failed) == [unlucky]
    assert report.failed[unlucky].startswith("read back: GET ")
    assert list(report.damaged) == [rotten] and report.repaired == 1
    assert report.read == 3 and report.read_bytes == sum(len(d) for d in blobs) - 3001
    assert report.in_sync == 2 and report.uploaded == 1
    assert await in_thread(bucket.get, bucket.key(rotten)) == blobs[2]


async def test_sync_verify_content_says_when_both_copies_are_lost(
        server, mirror_config, bucket):
    config = mirror_config()
    alice = await (await server(config=config))("alice")
    data = os.urandom(2000)
    await alice.put(data)
    await eventually(lambda: mirrored_as(alice, bucket, data), what="mirrored")
    await in_thread(bucket.rot, bucket.key(b3(data)), os.urandom(len(data)))
    alice.store.layout.blob_path(b3(data)).unlink()

    async with make_target(config.mirror) as target:
        report = await sync(alice.store, target, config.mirror, verify_content=True)
    # Not "blobd mirror heal": the mirror's copy is no better.
    assert report.failed[b3(data)].startswith("damaged in the bucket (the mirror's copy of")
    assert report.failed[b3(data)].endswith("), and the local file is missing")


@pytest.mark.parametrize("hook", ["before_read", "before_put"])
async def test_a_damaged_blob_deleted_while_sync_reads_it_back_stays_deleted(
        server, mirror_config, bucket, hook):
    config = mirror_config()
    alice = await (await server(config=config))("alice")
    data, kept = os.urandom(4000), os.urandom(1000)
    for blob in (data, kept):
        await alice.put(blob)
        await eventually(lambda: mirrored_as(alice, bucket, blob), what="mirrored")
    await in_thread(bucket.rot, bucket.key(b3(data)), os.urandom(len(data)))

    async def deleted(key: str) -> None:
        if key == bucket.key(b3(data)):
            await deleted_and_done(alice, data)  # its object deleted with it

    async with make_target(config.mirror) as target:
        # Before its object is read (the read finds nothing), or once it is
        # found damaged, before it is uploaded again.
        during = Interleaved(target, **{hook: deleted})
        report = await sync(alice.store, during, config.mirror, verify_content=True, jobs=1)
    assert report.gone == [b3(data)] and not report.failed
    # Found gone, not damaged, when its object was deleted before the read.
    assert list(report.damaged) == ([] if hook == "before_read" else [b3(data)])
    assert report.uploaded == 0 and report.repaired == 0
    assert await in_thread(bucket.digests) == {b3(kept)}


async def test_the_first_failure_in_a_job_pool_is_raised_as_itself():
    started: list[int] = []

    async def work(item: int) -> None:
        started.append(item)
        await asyncio.sleep(0.01)
        if item == 3:
            raise S3Error("GET s3://b/k: Could not connect to the endpoint URL",
                          retryable=True)

    with pytest.raises(S3Error, match="Could not connect"):
        await run_pool(range(100), 4, work)
    assert len(started) < 100  # the failure stopped the pool

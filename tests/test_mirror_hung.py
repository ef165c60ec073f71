"""A mirror that hangs (accepts connections, never answers) stops `blobd
mirror sync`, `restore` and `heal` after a few objects, rather than costing
every object the S3 client's timeouts. The mirror is the shared SeaweedFS
behind a GateProxy; the targets get timeouts of half a second, which the
CLI cannot set, so the commands run through their Python entry points."""

from __future__ import annotations

import os
import time
from typing import Any, AsyncIterator

from blobd.config import MirrorConfig
from blobd.layout import Layout
from blobd.index import all_blobs
from blobd.mirror.common import MirrorSilent, MirrorTarget, Silence, make_target
from blobd.mirror.heal import Healer, check_and_heal
from blobd.mirror.restore import restore
from blobd.mirror.sync import sync
from blobd.storage.s3 import S3Error
from conftest import b3, blob_files, make_config, tmp_files
from mirrorhelp import GateProxy, in_thread, mirror_section
from test_mirror import s3_port

BLOBS = 20
JOBS = 2  # so the stop comes after Silence(JOBS).limit == 3 objects in a row


def short_target(mirror: MirrorConfig, endpoint: str) -> MirrorTarget:
    return MirrorTarget(endpoint, mirror.bucket, mirror.access_key, mirror.secret_key,
                        mirror.region, mirror.prefix, max_attempts=1, connect_timeout=0.5,
                        read_timeout=0.5)


class Stalling:
    """The target, switching the proxy to "stall" once it has listed the
    blob objects (``after_lists`` listings), and counting the objects
    tried after that."""

    def __init__(self, target: Any, proxy: GateProxy | None, after_lists: int = 1) -> None:
        self._target = target
        self._proxy = proxy
        self._lists = after_lists
        self.tried = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    async def list(self, prefix: str, page_size: int = 1000) -> AsyncIterator[Any]:
        async for item in self._target.list(prefix, page_size):
            yield item
        self._lists -= 1
        if self._lists == 0 and self._proxy is not None:
            self._proxy.mode = "stall"

    async def head(self, key: str) -> Any:
        self.tried += 1
        return await self._target.head(key)

    async def download_to(self, key: str, *args: Any, **kwargs: Any) -> int:
        if "/_index/" not in key:
            self.tried += 1
        return await self._target.download_to(key, *args, **kwargs)


async def mirrored_store(server, tmp_path, section: dict[str, Any], count: int = BLOBS):
    """A store of ``count`` blobs, all in the bucket with an index backup."""
    alice = await (await server())("alice")
    blobs = [os.urandom(1000) for _ in range(count)]
    for data in blobs:
        assert (await alice.put(data)).status == 201
    mirror = make_config(tmp_path, mirror=section).mirror
    async with make_target(mirror) as target:
        done = await sync(alice.store, target, mirror)
    assert done.uploaded == count and not done.failed and done.backup
    return alice, mirror, blobs


async def test_sync_verify_content_stops_soon_when_the_mirror_hangs(
        server, s3server, mirror_prefix, tmp_path):
    section = mirror_section(s3server, mirror_prefix)
    alice, mirror, _ = await mirrored_store(server, tmp_path, section)
    async with GateProxy(s3_port(s3server)) as proxy:
        started = time.monotonic()
        async with short_target(mirror, proxy.url) as target:
            stalling = Stalling(target, proxy)
            report = await sync(alice.store, stalling, mirror, verify_content=True,
                                jobs=JOBS)
        took = time.monotonic() - started
    assert report.stopped == ("the mirror stopped answering (3 objects in a row timed out"
                              " or could not connect); nothing after that was tried: run"
                              " the command again when it answers")
    # The verify phase stopped after the first few HEADs: no read back,
    # no upload, nothing else tried.
    assert 3 <= stalling.tried <= 3 + JOBS, stalling.tried
    assert 3 <= len(report.failed) <= 3 + JOBS and not report.to_upload
    assert report.read == 0 and report.uploaded == 0 and report.backup is None
    assert took < 30, took  # a sanity bound only: `tried` is the proof


async def test_restore_stops_when_the_mirror_hangs_and_resumes_when_it_answers(
        server, s3server, mirror_prefix, tmp_path):
    section = mirror_section(s3server, mirror_prefix)
    _, mirror, blobs = await mirrored_store(server, tmp_path, section)
    elsewhere = make_config(tmp_path, server={"data_dir": str(tmp_path / "restored")},
                            mirror=section)
    layout = Layout(tmp_path / "restored")
    async with GateProxy(s3_port(s3server)) as proxy:
        started = time.monotonic()
        async with short_target(mirror, proxy.url) as target:
            # The backups' listing, then the blobs': then the mirror hangs.
            stalling = Stalling(target, proxy, after_lists=2)
            first = await restore(elsewhere, stalling, jobs=JOBS)
        took = time.monotonic() - started
    assert first.stopped is not None and "the mirror stopped answering" in first.stopped
    assert 3 <= stalling.tried <= 3 + JOBS and first.restored == 0
    assert not first.missing and not first.dropped_refs and not first.finished
    assert took < 30, took  # a sanity bound only: `tried` is the proof
    assert layout.restore_marker_path.exists()  # resumable
    assert tmp_files(layout.root) == [] and blob_files(layout.root) == []

    async with make_target(mirror) as target:
        second = await restore(elsewhere, target, jobs=JOBS)
    assert second.finished and second.restored == BLOBS and not second.missing
    assert not layout.restore_marker_path.exists()
    for data in blobs:
        assert layout.blob_path(b3(data)).read_bytes() == data


async def test_heal_stops_when_the_mirror_hangs(server, s3server, mirror_prefix, tmp_path):
    section = mirror_section(s3server, mirror_prefix)
    alice, mirror, blobs = await mirrored_store(server, tmp_path, section)
    layout = alice.store.layout
    for data in blobs:
        layout.blob_path(b3(data)).unlink()
    records = await all_blobs(alice.store.db.reader)
    async with GateProxy(s3_port(s3server), mode="stall") as proxy:
        started = time.monotonic()
        async with short_target(mirror, proxy.url) as target:
            stalling = Stalling(target, None)
            checkup = await check_and_heal(alice.store, Healer(alice.store, stalling, mirror),
                                           records, JOBS, lambda size: None)
        took = time.monotonic() - started
    assert checkup.stopped is not None and "the mirror stopped answering" in checkup.stopped
    assert 3 <= stalling.tried <= 3 + JOBS and not checkup.healed
    assert took < 30, took  # a sanity bound only: `tried` is the proof
    assert tmp_files(layout.root) == []

    async with make_target(mirror) as target:
        again = await check_and_heal(alice.store, Healer(alice.store, target, mirror),
                                     records, JOBS, lambda size: None)
    assert again.stopped is None and len(again.healed) == BLOBS


async def test_objects_missing_from_the_bucket_do_not_stop_a_restore(
        server, s3server, mirror_prefix, bucket, tmp_path):
    section = mirror_section(s3server, mirror_prefix)
    _, mirror, blobs = await mirrored_store(server, tmp_path, section, count=9)
    gone = blobs[:7]  # in any order, at least 3 of them come in a row
    elsewhere = make_config(tmp_path, server={"data_dir": str(tmp_path / "restored")},
                            mirror=section)

    class Vanishing(Stalling):
        async def list(self, prefix: str, page_size: int = 1000) -> AsyncIterator[Any]:
            async for item in super().list(prefix, page_size):
                yield item
            if self._lists == 0:  # listed: then they go, and every GET is a 404
                for data in gone:
                    await in_thread(bucket.delete, bucket.key(b3(data)))

    async with make_target(mirror) as target:
        report = await restore(elsewhere, Vanishing(target, None, after_lists=2), jobs=1)
    assert report.finished and report.restored == 2
    assert sorted(report.missing) == sorted(b3(data) for data in gone)


def test_only_silence_counts_toward_the_stop() -> None:
    silence = Silence(jobs=1)
    timeout = S3Error("GET x: Read timeout on endpoint URL", retryable=True)
    answered = [S3Error("GET x: 503 SlowDown", retryable=True, code="503", status=503),
                S3Error("GET x: NoSuchKey", retryable=False, code="NoSuchKey", status=404),
                S3Error("GET x: the body ended after 3 of 9 bytes", retryable=True, cut_at=3),
                None]
    for each in answered:
        silence.saw(timeout)
        silence.saw(timeout)
        silence.saw(each)
    assert not silence.tripped
    for _ in range(2):
        silence.saw(timeout)
    assert not silence.tripped
    silence.saw(timeout)
    assert silence.tripped and silence.row == 3
    silence.saw(None)  # an answer in flight when it stopped changes nothing
    assert silence.tripped
    assert "3 objects in a row" in str(MirrorSilent(silence.row))

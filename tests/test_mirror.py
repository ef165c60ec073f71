"""The mirror inside a running server, against a real SeaweedFS: the queue
worker, deletions, heal on GET, and the scheduled index backups."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from blobd.layout import backup_time_from_key
from blobd.mirror import queue
from conftest import b3
from serverproc import to_toml
from mirrorhelp import (Bucket, GateProxy, b64sha256, eventually, in_thread,
                        mirror_section)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def mirrored(server, s3server, mirror_prefix):
    """``await mirrored(**mirror_options)`` -> alice on a server mirroring to
    the test's prefix (no scheduled backups unless asked)."""
    async def start(**options):
        options.setdefault("backup_interval_seconds", 0)
        login = await server(mirror=mirror_section(s3server, mirror_prefix, **options))
        return await login("alice")
    return start


async def state(api, digest: str) -> str:
    meta = await api.request("GET", f"/blobs/{digest}/meta")
    return (await meta.json())["mirror"]["state"]


async def arrived(api, bucket: Bucket, data: bytes) -> None:
    """Wait until the blob's object holds ``data`` and /meta says done."""
    digest = b3(data)
    await eventually(lambda: in_thread(bucket.get, bucket.key(digest)),
                     what=f"object for {digest}")
    assert await in_thread(bucket.get, bucket.key(digest)) == data
    await eventually(lambda: _is(state(api, digest), "done"), what="mirror state done")


async def _is(awaitable, expected) -> bool:
    return await awaitable == expected


async def queue_rows(api) -> list[dict]:
    rows = await api.store.db.fetchall("SELECT * FROM mirror_queue ORDER BY id")
    return [dict(row) for row in rows]


async def test_blob_appears_with_its_key_bytes_type_and_checksum(mirrored, bucket):
    alice = await mirrored()
    data = os.urandom(50_000)
    resp = await alice.put(data, headers={"Content-Type": "text/plain"})
    assert resp.status == 201
    digest = b3(data)
    assert await state(alice, digest) in ("pending", "done")

    await arrived(alice, bucket, data)
    key = f"{bucket.prefix}/{digest[:2]}/{digest[2:4]}/{digest}"
    assert await in_thread(bucket.keys) == [key]
    head = await in_thread(bucket.head, key)
    assert head["ContentType"] == "text/plain"
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert head["ChecksumSHA256"] == b64sha256(data)
    assert await queue_rows(alice) == []


async def test_big_blob_goes_up_in_parts(mirrored, bucket):
    alice = await mirrored(multipart_threshold="5MiB")
    data = os.urandom(6 << 20)
    assert (await alice.put(data)).status == 201
    await arrived(alice, bucket, data)
    head = await in_thread(bucket.head, bucket.key(b3(data)))
    assert head["ChecksumType"] == "COMPOSITE"
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()


async def test_a_threshold_under_5mib_sends_a_small_blob_as_one_part(mirrored, bucket):
    """Older blobds took multipart_threshold = "1MiB" (found by the upgrade
    review): a blob over it is one part, the last, which S3 takes at any size."""
    alice = await mirrored(multipart_threshold="1MiB")
    data = os.urandom(2 << 20)
    assert (await alice.put(data)).status == 201
    await arrived(alice, bucket, data)
    head = await in_thread(bucket.head, bucket.key(b3(data)))
    assert head["ChecksumType"] == "COMPOSITE"
    assert head["ETag"].endswith('-1"')


async def test_blobs_put_while_the_mirror_is_down_arrive_when_it_returns(
        mirrored, bucket, s3server):
    alice = await mirrored()
    blobs = [os.urandom(1000 + n) for n in range(12)]
    await s3server.astop()
    try:
        for data in blobs:
            assert (await alice.put(data)).status == 201
        # The worker has tried, failed, and kept every row with its error.
        await eventually(lambda: _failing(alice, len(blobs)), what="all rows failing")
        counts = await queue.counts(alice.store.db.reader)
        assert counts["pending"] == len(blobs) and counts["last_error"]
        assert await state(alice, b3(blobs[0])) in ("pending", "failed")
    finally:
        await s3server.astart()
    for data in blobs:
        await arrived(alice, bucket, data)
    assert await queue_rows(alice) == []
    assert await in_thread(bucket.digests) == {b3(d) for d in blobs}


async def test_a_damaged_local_file_is_not_uploaded_again_and_again(
        mirrored, bucket, s3server):
    """Found by review: the mirror refused a blob whose local file had been
    damaged (its checksum), and every retry sent the whole file again, to be
    refused again. A retry now reads the file first and says what is wrong."""
    alice = await mirrored()
    data = os.urandom(200_000)
    await s3server.astop()
    try:
        assert (await alice.put(data)).status == 201
        path = alice.data_dir / "blobs" / b3(data)[:2] / b3(data)[2:4] / b3(data)
        damaged = bytearray(data)
        damaged[1000:1004] = b"XXXX"
        path.write_bytes(bytes(damaged))
        await eventually(lambda: _failing(alice, 1), what="the upload failing")
    finally:
        await s3server.astart()

    async def told() -> bool:
        counts = await queue.counts(alice.store.db.reader)
        return "is damaged" in (counts["last_error"] or "")
    await eventually(told, what="the damaged file reported")
    counts = await queue.counts(alice.store.db.reader)
    assert "blobd fsck --verify" in counts["last_error"]
    assert await in_thread(bucket.get, bucket.key(b3(data))) is None
    assert await state(alice, b3(data)) == "failed"


async def test_a_refusal_after_an_outage_is_logged_at_error_once(
        server, s3server, mirror_prefix, caplog):
    """Found by review: a permanent failure was logged at ERROR only on a
    job's first attempt, so one that followed transient failures (the mirror
    down, then BadDigest or 403) was at DEBUG only."""
    async with GateProxy(s3_port(s3server), mode="drop") as proxy:
        section = mirror_section(s3server, mirror_prefix, backup_interval_seconds=0)
        alice = await (await server(mirror={**section, "endpoint": proxy.url}))("alice")
        data = os.urandom(20_000)
        digest = (await (await alice.put(data)).json())["hash"]
        await eventually(lambda: _attempts(alice, 1), what="a transient failure")
        # The local file goes bad (same size): the S3 server refuses it.
        blob_path(alice, data).write_bytes(os.urandom(len(data)))
        proxy.mode = "pass"
        await eventually(lambda: _is(state(alice, digest), "failed"), what="refused")
        rows = await queue_rows(alice)
        assert "unreachable" not in rows[0]["last_error"]
        await eventually(lambda: _attempts(alice, rows[0]["attempts"] + 2),
                         what="two more refusals")

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno == logging.ERROR and digest in r.getMessage()]
    assert len(errors()) == 1, errors()
    assert errors()[0].startswith(f"mirror put of {digest} failed: ")


async def _attempts(api, at_least: int) -> bool:
    rows = await queue_rows(api)
    return bool(rows) and rows[0]["attempts"] >= at_least


async def _failing(api, count: int) -> bool:
    counts = await queue.counts(api.store.db.reader)
    return counts["failed"] == count


@pytest.mark.parametrize("keep_deleted", [False, True])
async def test_delete_propagates_unless_keep_deleted(mirrored, bucket, keep_deleted):
    alice = await mirrored(keep_deleted=keep_deleted)
    data = os.urandom(3000)
    await alice.put(data)
    await arrived(alice, bucket, data)
    assert (await alice.request("DELETE", f"/blobs/{b3(data)}")).status == 204

    if keep_deleted:
        assert await queue_rows(alice) == []  # no deletion was even queued
        await asyncio.sleep(0.5)
        assert await in_thread(bucket.get, bucket.key(b3(data))) == data
    else:
        await eventually(lambda: _gone(bucket, b3(data)), what="object deleted")
        await eventually(lambda: _empty(alice), what="queue drained")


async def _gone(bucket: Bucket, digest: str) -> bool:
    return await in_thread(bucket.get, bucket.key(digest)) is None


async def _empty(api) -> bool:
    return await queue_rows(api) == []


async def test_queued_operations_on_one_blob_keep_their_order(mirrored, bucket, s3server):
    """Down mirror: blob A is stored then deleted (its put is moot), blob B
    is deleted then stored again (its delete must not remove the object)."""
    alice = await mirrored()
    a, b = os.urandom(2000), os.urandom(2001)
    await alice.put(b)
    await arrived(alice, bucket, b)
    await s3server.astop()
    try:
        await alice.put(a)
        await alice.request("DELETE", f"/blobs/{b3(a)}")
        await alice.request("DELETE", f"/blobs/{b3(b)}")
        await alice.put(b)
        ops = [(row["hash"], row["op"]) for row in await queue_rows(alice)]
        # The worker may already have dropped an operation it found moot (a's
        # put once a was gone, b's delete once b was back): the rest must be
        # queued, in order.
        assert [op for h, op in ops if h == b3(a)] in (["put", "delete"], ["delete"])
        assert [op for h, op in ops if h == b3(b)] in (["delete", "put"], ["put"])
        assert ops == sorted(ops, key=lambda o: [(b3(a), "put"), (b3(a), "delete"),
                                                 (b3(b), "delete"), (b3(b), "put")].index(o))
    finally:
        await s3server.astart()
    await eventually(lambda: _empty(alice), what="queue drained")
    assert await _gone(bucket, b3(a))
    assert await in_thread(bucket.get, bucket.key(b3(b))) == b
    assert await in_thread(bucket.digests) == {b3(b)}
    assert await state(alice, b3(b)) == "done"


async def test_blobs_stored_before_the_mirror_was_configured_are_queued(
        server, s3server, bucket, mirror_prefix):
    login = await server()
    plain = await login("alice")
    blobs = [os.urandom(500) for _ in range(3)]
    for data in blobs:
        await plain.put(data)
    assert await state(plain, b3(blobs[0])) == "off"
    await plain.client.close()

    section = mirror_section(s3server, mirror_prefix, backup_interval_seconds=0)
    login = await server(mirror=section)
    alice = await login("alice")
    for data in blobs:
        await arrived(alice, bucket, data)


# -- heal ---------------------------------------------------------------------

def blob_path(api, data: bytes) -> Path:
    return api.store.layout.blob_path(b3(data))


@pytest.mark.parametrize("damage", ["missing", "truncated", "longer"])
async def test_get_heals_a_missing_or_damaged_file(mirrored, bucket, damage):
    alice = await mirrored()
    data = os.urandom(200_000)
    await alice.put(data)
    await arrived(alice, bucket, data)
    path = blob_path(alice, data)
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[:1000])
    else:
        path.write_bytes(data + b"junk")

    resp = await alice.request("GET", f"/blobs/{b3(data)}")
    assert resp.status == 200
    assert await resp.read() == data
    assert path.read_bytes() == data
    ranged = await alice.request("GET", f"/blobs/{b3(data)}", headers={"Range": "bytes=10-19"})
    assert ranged.status == 206 and await ranged.read() == data[10:20]


async def test_concurrent_gets_share_one_heal(mirrored, bucket):
    alice = await mirrored()
    data = os.urandom(300_000)
    await alice.put(data)
    await arrived(alice, bucket, data)
    blob_path(alice, data).unlink()

    async def get() -> bytes:
        resp = await alice.request("GET", f"/blobs/{b3(data)}")
        assert resp.status == 200
        return await resp.read()

    bodies = await asyncio.gather(*(get() for _ in range(8)))
    assert all(body == data for body in bodies)
    assert blob_path(alice, data).read_bytes() == data
    leftovers = [p for p in (alice.data_dir / "tmp").iterdir()]
    assert leftovers == []


async def test_a_bad_copy_in_the_mirror_is_refused(mirrored, bucket):
    alice = await mirrored()
    data = os.urandom(10_000)
    await alice.put(data)
    await arrived(alice, bucket, data)
    await in_thread(bucket.put, bucket.key(b3(data)), os.urandom(10_000))
    path = blob_path(alice, data)
    path.unlink()

    resp = await alice.request("GET", f"/blobs/{b3(data)}")
    assert resp.status == 500
    assert (await resp.json())["error"] == "internal"
    assert not path.exists()
    assert list((alice.data_dir / "tmp").iterdir()) == []


async def test_heal_of_a_blob_the_mirror_does_not_have(mirrored, bucket, s3server):
    alice = await mirrored()
    data = os.urandom(10_000)
    await alice.put(data)
    await arrived(alice, bucket, data)
    await in_thread(bucket.delete, bucket.key(b3(data)))
    blob_path(alice, data).unlink()
    resp = await alice.request("GET", f"/blobs/{b3(data)}")
    assert resp.status == 500


async def test_without_a_mirror_a_missing_file_is_still_a_500(alice):
    data = os.urandom(1000)
    await alice.put(data)
    alice.store.layout.blob_path(b3(data)).unlink()
    resp = await alice.request("GET", f"/blobs/{b3(data)}")
    assert resp.status == 500 and (await resp.json())["error"] == "internal"


def s3_port(s3server) -> int:
    port = urllib.parse.urlsplit(s3server.endpoint).port
    assert port is not None
    return port


async def test_a_get_waits_for_a_hung_mirror_only_so_long(server, s3server, mirror_prefix,
                                                           bucket):
    """Found by review: against a mirror that accepts connections and never
    answers, a GET of a blob whose file was missing took 121 s (the S3
    client's timeouts and retries). Now it waits heal_timeout_seconds, and
    the heal goes on: once the mirror answers, the file is back."""
    async with GateProxy(s3_port(s3server)) as proxy:
        section = mirror_section(s3server, mirror_prefix, backup_interval_seconds=0,
                                 heal_timeout_seconds=1)
        alice = await (await server(mirror={**section, "endpoint": proxy.url}))("alice")
        data = os.urandom(50_000)
        await alice.put(data)
        await arrived(alice, bucket, data)
        path = blob_path(alice, data)
        path.unlink()

        proxy.mode = "stall"
        for _ in range(2):  # the second GET joins the heal still running
            started = time.monotonic()
            resp = await alice.request("GET", f"/blobs/{b3(data)}")
            assert resp.status == 500 and (await resp.json())["error"] == "internal"
            assert time.monotonic() - started < 4
        assert not path.exists()

        proxy.mode = "pass"
        await eventually(path.exists, what="the heal finished in the background")
        resp = await alice.request("GET", f"/blobs/{b3(data)}")
        assert resp.status == 200 and await resp.read() == data



async def test_a_failed_heal_says_why_to_the_client(server, s3server, mirror_prefix, bucket):
    """Found by the disaster-recovery review: every failed heal was "the
    mirror has no good copy", also when the mirror was only down for a
    moment or slow (and the heal still going on), which sends the owner
    looking for a lost blob. The reason is told without the mirror's
    address, which is no client's business."""
    async with GateProxy(s3_port(s3server)) as proxy:
        section = mirror_section(s3server, mirror_prefix, backup_interval_seconds=0,
                                 heal_timeout_seconds=1)
        alice = await (await server(mirror={**section, "endpoint": proxy.url}))("alice")
        down, absent, bad = (os.urandom(20_000 + n) for n in range(3))
        for data in (down, absent, bad):
            await alice.put(data)
            await arrived(alice, bucket, data)
            blob_path(alice, data).unlink()
        await in_thread(bucket.delete, bucket.key(b3(absent)))
        await in_thread(bucket.put, bucket.key(b3(bad)), os.urandom(len(bad)))

        async def message(data: bytes) -> str:
            resp = await alice.request("GET", f"/blobs/{b3(data)}")
            body = await resp.json()
            assert resp.status == 500 and body["error"] == "internal"
            assert proxy.url.split("//")[1] not in body["message"]
            return body["message"]

        proxy.mode = "drop"
        assert "cannot be reached" in await message(down)
        proxy.mode = "stall"
        assert "did not answer within 1s" in await message(down)
        proxy.mode = "pass"
        await eventually(blob_path(alice, down).exists, what="the heal went on")
        assert "has no copy" in await message(absent)
        assert "copy in the mirror is not this blob" in await message(bad)


# -- scheduled index backups --------------------------------------------------

def backup_keys(bucket: Bucket) -> list[str]:
    return sorted(bucket.keys("_index/"))


def blobs_in_backup(bucket: Bucket, key: str, tmp_path: Path) -> set[str]:
    copy = tmp_path / "backup.sqlite3"
    copy.write_bytes(bucket.get(key))
    with sqlite3.connect(copy) as conn:
        return {row[0] for row in conn.execute("SELECT hash FROM blobs")}


async def test_the_index_is_backed_up_on_schedule_and_old_backups_pruned(
        mirrored, bucket, tmp_path):
    alice = await mirrored(backup_interval_seconds=0.2, backups_kept=2)
    stored: set[str] = set()
    for n in range(3):
        data = os.urandom(100 + n)
        await alice.put(data)
        stored.add(b3(data))

        async def latest_has_all() -> bool:
            keys = await in_thread(backup_keys, bucket)
            return bool(keys) and await in_thread(
                blobs_in_backup, bucket, keys[-1], tmp_path) == stored
        await eventually(latest_has_all, what=f"a backup with {len(stored)} blobs")

    await eventually(lambda: _empty(alice), what="queue drained")
    await asyncio.sleep(0.5)  # a backup with every blob marked mirrored
    keys = await in_thread(backup_keys, bucket)
    await asyncio.sleep(0.6)  # several more intervals: nothing changed, nothing uploaded
    assert await in_thread(backup_keys, bucket) == keys
    assert len(keys) == 2
    assert all(backup_time_from_key(bucket.prefix, key) for key in keys)
    assert await in_thread(blobs_in_backup, bucket, keys[-1], tmp_path) == stored


async def test_a_server_on_a_new_disk_skips_backups_over_the_old_store(
        server, s3server, mirror_prefix, bucket, tmp_path, caplog):
    section = mirror_section(s3server, mirror_prefix, backup_interval_seconds=0.2)
    alice = await (await server(mirror=section))("alice")
    data = os.urandom(100)
    await alice.put(data, headers={"Blob-Ref": "song"})

    async def backed_up() -> bool:
        keys = await in_thread(backup_keys, bucket)
        return bool(keys) and b3(data) in await in_thread(blobs_in_backup, bucket, keys[-1],
                                                          tmp_path)
    await eventually(backed_up, what="a backup with the blob")
    await alice.client.close()
    keys = backup_keys(bucket)  # blocking: the closed app shut the loop's executor down

    # The disk died; the server starts at boot on a new one, the same config.
    shutil.rmtree(alice.data_dir)
    caplog.set_level(logging.WARNING, logger="blobd.mirror.backup")
    await (await server(mirror=section))("admin")
    await eventually(lambda: caplog.text.count("index backup skipped") >= 2,
                     what="two scheduled backups skipped")
    assert "is of another store" in caplog.text and "`blobd mirror restore`" in caplog.text
    assert await in_thread(backup_keys, bucket) == keys


# -- the start-up check of the bucket ------------------------------------------

@pytest.mark.parametrize("fault, says", [
    ("bucket", "does not exist"),
    ("secret_key", "is denied; check [mirror] access_key, secret_key"),
])
async def test_a_missing_bucket_or_refused_key_is_warned_about_at_start(
        server, s3server, mirror_prefix, caplog, fault, says):
    """Found by review: a mistyped bucket was never mentioned (SeaweedFS even
    makes it on the first upload), nor were refused credentials, until each
    blob failed on its own. The server still starts and keeps its queue."""
    wrong = f"no-such-bucket-{mirror_prefix}" if fault == "bucket" else "wrong-secret"
    section = {**mirror_section(s3server, mirror_prefix, backup_interval_seconds=0),
               fault: wrong}
    alice = await (await server(mirror=section))("alice")
    bucket = section["bucket"]

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "blobd.mirror.common"]
    await eventually(warned, what="a warning about the bucket")
    (line,) = warned()
    assert f"bucket {bucket!r} at {s3server.endpoint}" in line and says in line
    if fault == "secret_key":  # (an upload would make the mistyped bucket)
        resp = await alice.put(os.urandom(1000))
        assert resp.status == 201
        assert len(await queue_rows(alice)) == 1


async def test_worker_0_aborts_abandoned_multipart_uploads_at_start(mirrored, bucket):
    crashed = bucket.key(b3(b"a big blob, once"))
    await in_thread(bucket.start_upload, crashed)
    await eventually(lambda: in_thread(bucket.abandoned, 1 / 3600), interval=0.05,
                     what="the upload older than the second")
    await mirrored(abandoned_upload_hours=1 / 3600)
    await eventually(lambda: in_thread(lambda: not bucket.unfinished()),
                     what="abandoned upload aborted")


async def test_a_hung_mirror_does_not_hold_the_start(server, s3server, mirror_prefix, caplog):
    async with GateProxy(s3_port(s3server), mode="stall") as proxy:
        section = mirror_section(s3server, mirror_prefix, backup_interval_seconds=0)
        started = time.monotonic()
        alice = await (await server(mirror={**section, "endpoint": proxy.url}))("alice")
        assert (await alice.request("GET", "/healthz")).status == 200
        assert time.monotonic() - started < 5
        assert "mirror: bucket" not in caplog.text


def test_mirror_commands_warn_about_a_missing_bucket(s3server, mirror_prefix, tmp_path):
    missing = f"no-such-bucket-{mirror_prefix}"
    section = {**mirror_section(s3server, mirror_prefix), "bucket": missing}
    config = tmp_path / "blobd.toml"
    config.write_text(to_toml({"server": {"data_dir": str(tmp_path / "data")},
                               "mirror": section}))
    result = subprocess.run([sys.executable, "-m", "blobd", "mirror", "restore", "-c",
                             str(config)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert f"mirror: bucket {missing!r} at {s3server.endpoint} does not exist" \
        in result.stderr, result.stderr


# -- without aiobotocore ------------------------------------------------------

def test_blobd_runs_without_aiobotocore_unless_a_mirror_is_configured(tmp_path):
    script = (
        "import sys\n"
        "sys.modules['aiobotocore'] = None  # as if not installed\n"
        "from blobd.config import config_from_dict\n"
        "from blobd.errors import ConfigError\n"
        "from blobd.http.app import create_app\n"
        f"data = {{'server': {{'data_dir': {str(tmp_path)!r}}}}}\n"
        "create_app(config_from_dict(data))\n"
        "print('plain ok')\n"
        "data['mirror'] = {'endpoint': 'http://127.0.0.1:1', 'bucket': 'b'}\n"
        "try:\n"
        "    create_app(config_from_dict(data))\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == "plain ok"
    assert lines[1].startswith("mirror: ") and "pip install '.[s3]'" in lines[1]


@pytest.mark.parametrize("damage", ["missing", "truncated"])
async def test_head_of_a_missing_file_answers_as_get_would(mirrored, bucket, damage):
    """Found by the disaster-recovery review: HEAD answered 200 with the
    index's size for a blob whose file was gone, where GET heals or fails."""
    alice = await mirrored()
    data = os.urandom(200_000)
    await alice.put(data)
    await arrived(alice, bucket, data)
    path = blob_path(alice, data)
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(data[:1000])
    resp = await alice.request("HEAD", f"/blobs/{b3(data)}")
    assert resp.status == 200 and resp.headers["Content-Length"] == str(len(data))
    assert path.read_bytes() == data  # healed, as a GET heals

    await in_thread(bucket.delete, bucket.key(b3(data)))
    path.unlink()
    head = await alice.request("HEAD", f"/blobs/{b3(data)}")
    get = await alice.request("GET", f"/blobs/{b3(data)}")
    assert head.status == get.status == 500


async def test_without_a_mirror_head_of_a_missing_file_is_a_500(alice):
    data = os.urandom(200_000)
    await alice.put(data)
    alice.store.layout.blob_path(b3(data)).unlink()
    resp = await alice.request("HEAD", f"/blobs/{b3(data)}")
    assert resp.status == 500

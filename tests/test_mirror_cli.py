"""``blobd mirror sync|restore|backup|heal|status``, run as real processes
against a real SeaweedFS and a real store."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from blobd.config import load_config
from blobd.layout import Layout
from blobd.mirror.common import created_stamp, make_target
from blobd.mirror.restore import restore
from blobd.mirror.sync import sync
from blobd.store import Store
from conftest import b3, blob_files, make_config
from mirrorhelp import Bucket, eventually, in_thread, mirror_section
from serverproc import run_blobd, to_toml


class Setup:
    """A data directory, a config file for it, and a server on it."""

    def __init__(self, tmp_path: Path, name: str, mirror: dict) -> None:
        self.data_dir = tmp_path / name
        self.sections = {"server": {"data_dir": str(self.data_dir)},
                         "storage": {"fsync": False}, "mirror": mirror}
        self.config_path = tmp_path / f"{name}.toml"
        self.config_path.write_text(to_toml(self.sections))

    async def cli(self, *args: str):
        return await in_thread(lambda: run_blobd("mirror", *args, "-c",
                                                 str(self.config_path), timeout=120))

    async def init(self) -> None:
        """Make the store, as a first ``blobd serve`` does."""
        store = Store(load_config(self.config_path))
        await store.open()
        await store.close()

    def config(self, tmp_path: Path, mirror: bool = True):
        """The config for an in-process server; ``mirror=False`` leaves
        [mirror] out (the CLI still uses it)."""
        skip = {"server"} if mirror else {"server", "mirror"}
        sections = {k: v for k, v in self.sections.items() if k not in skip}
        return make_config(tmp_path, server={"data_dir": str(self.data_dir)}, **sections)


@pytest.fixture
def setup(tmp_path, s3server, mirror_prefix) -> Setup:
    return Setup(tmp_path, "data", mirror_section(s3server, mirror_prefix,
                                                   backup_interval_seconds=0))


async def start(server, setup: Setup, tmp_path: Path, owner: str = "alice"):
    login = await server(config=setup.config(tmp_path))
    return login, await login(owner)


async def drained(api) -> bool:
    return not await api.store.db.fetchall("SELECT id FROM mirror_queue")


async def mirrored(api, bucket: Bucket, digests: set[str]) -> None:
    await eventually(lambda: drained(api), what="mirror queue drained")
    # SeaweedFS may list an object a moment after it acknowledged the PUT
    # (CI runs twice saw a listing without it right after the drain).
    await eventually(lambda: in_thread(lambda: digests <= bucket.digests()), timeout=10,
                     what=f"the bucket listing {sorted(digests)}")


def index_rows(data_dir: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(Layout(data_dir).index_path) as conn:
        return conn.execute(sql).fetchall()


async def test_sync_after_the_bucket_was_emptied_uploads_everything(
        server, setup, bucket, tmp_path):
    _, alice = await start(server, setup, tmp_path)
    blobs = [os.urandom(20_000 + n) for n in range(5)]
    for data in blobs:
        await alice.put(data)
    digests = {b3(d) for d in blobs}
    await mirrored(alice, bucket, digests)
    assert await in_thread(bucket.empty) == len(blobs)

    dry = await setup.cli("sync", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert {line.split()[2] for line in dry.stdout.splitlines()
            if line.startswith("would upload")} == digests
    assert await in_thread(bucket.keys) == []

    result = await setup.cli("sync", "-j", "3", "--progress")
    assert result.returncode == 0, result.stderr
    assert await in_thread(bucket.digests) == digests
    for data in blobs:
        assert await in_thread(bucket.get, bucket.key(b3(data))) == data
    assert "5 to upload" in result.stdout and "uploaded 5" in result.stdout
    assert "upload" in result.stderr  # the progress bar
    backup_key = result.stdout.split("index backup: ")[1].strip()
    assert backup_key in await in_thread(bucket.keys, "_index/")

    again = await setup.cli("sync")
    assert again.returncode == 0, again.stderr
    assert "5 in sync" in again.stdout and "0 to upload" in again.stdout


async def test_sync_delete_and_verify(server, setup, bucket, tmp_path):
    _, alice = await start(server, setup, tmp_path)
    kept, damaged = os.urandom(3000), os.urandom(3001)
    for data in (kept, damaged):
        await alice.put(data)
    await mirrored(alice, bucket, {b3(kept), b3(damaged)})
    stray = os.urandom(100)
    await in_thread(bucket.put, bucket.key(b3(stray)), stray)
    await in_thread(bucket.put, f"{bucket.prefix}/NOTES.txt", b"not a blob")
    await in_thread(bucket.put, bucket.key(b3(damaged)), os.urandom(3001))

    plain = await setup.cli("sync")
    assert plain.returncode == 0 and "2 in sync" in plain.stdout
    assert b3(stray) in await in_thread(bucket.digests)

    full = await setup.cli("sync", "--delete", "--verify")
    assert full.returncode == 0, full.stderr
    assert "1 mismatched" in full.stdout and "deleted 1" in full.stdout
    assert await in_thread(bucket.digests) == {b3(kept), b3(damaged)}
    assert await in_thread(bucket.get, bucket.key(b3(damaged))) == damaged
    assert await in_thread(bucket.get, f"{bucket.prefix}/NOTES.txt") == b"not a blob"


async def test_sync_mirrors_a_store_that_never_had_a_mirror(server, setup, bucket, tmp_path):
    login = await server(config=setup.config(tmp_path, mirror=False))
    alice = await login("alice")
    blobs = [os.urandom(700 + n) for n in range(3)]
    for data in blobs:
        await alice.put(data)
    assert index_rows(setup.data_dir, "SELECT DISTINCT mirror_state FROM blobs") == [("off",)]

    result = await setup.cli("sync")
    assert result.returncode == 0, result.stderr
    assert await in_thread(bucket.digests) == {b3(d) for d in blobs}
    assert index_rows(setup.data_dir, "SELECT DISTINCT mirror_state FROM blobs") == [("done",)]
    # Stamped with the blob's creation, as the worker's uploads are (restore
    # tells content stored again from a deleted blob by it).
    for digest, created_at in index_rows(setup.data_dir, "SELECT hash, created_at FROM blobs"):
        head = await in_thread(bucket.head, bucket.key(digest))
        assert head["Metadata"]["blobd-created"] == created_stamp(created_at)


async def test_sync_reports_a_damaged_local_file_and_does_not_mirror_it(
        server, setup, bucket, tmp_path):
    login = await server(config=setup.config(tmp_path, mirror=False))
    alice = await login("alice")
    data = os.urandom(5000)
    await alice.put(data)
    path = alice.store.layout.blob_path(b3(data))
    path.write_bytes(bytes(5000))  # same size, wrong bytes
    result = await setup.cli("sync")
    assert result.returncode == 1
    assert f"failed {b3(data)}" in result.stderr
    assert await in_thread(bucket.digests) == set()


async def test_sync_verify_content_finds_rot_the_metadata_hides(server, setup, bucket,
                                                                tmp_path):
    _, alice = await start(server, setup, tmp_path)
    sound, rotten, truncated = os.urandom(3000), os.urandom(20_000), os.urandom(8000)
    for data in (sound, rotten, truncated):
        await alice.put(data)
    await mirrored(alice, bucket, {b3(sound), b3(rotten), b3(truncated)})
    # Damage the mirror's disk does: the metadata stays as the mirror wrote it.
    flipped = rotten[:100] + bytes([rotten[100] ^ 1]) + rotten[101:]
    await in_thread(bucket.rot, bucket.key(b3(rotten)), flipped)
    await in_thread(bucket.rot, bucket.key(b3(truncated)), truncated[:5000])

    dry = await setup.cli("sync", "--verify-content", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"damaged in the bucket: {b3(rotten)}: the mirror's copy of {b3(rotten)} has" \
           " BLAKE3" in dry.stdout
    assert f"would upload {b3(rotten)} (20000 bytes)" in dry.stdout
    # A truncated object is listed at its new size: uploaded without reading it.
    assert f"would upload {b3(truncated)} (8000 bytes)" in dry.stdout
    assert "read back 2 objects (23000 bytes), 1 damaged\n" in dry.stdout
    assert await in_thread(bucket.get, bucket.key(b3(rotten))) == flipped

    mirror = load_config(setup.config_path).mirror
    async with make_target(mirror) as target:
        metadata_only = await sync(alice.store, target, mirror, verify=True)
    assert metadata_only.mismatched == 0 and metadata_only.uploaded == 1  # the truncated one
    assert await in_thread(bucket.get, bucket.key(b3(truncated))) == truncated
    assert await in_thread(bucket.get, bucket.key(b3(rotten))) == flipped  # not seen

    repaired = await setup.cli("sync", "--verify-content", "-j", "2", "--progress")
    assert repaired.returncode == 0, repaired.stderr
    assert "read back 3 objects (31000 bytes), 1 damaged, 1 uploaded again" in repaired.stdout
    assert "2 in sync, 0 mismatched; 1 to upload" in repaired.stdout
    assert "read back" in repaired.stderr  # its progress bar
    assert await in_thread(bucket.get, bucket.key(b3(rotten))) == rotten
    elsewhere = Setup(tmp_path, "restored", setup.sections["mirror"])
    config = load_config(elsewhere.config_path)
    async with make_target(mirror) as target:
        again = await sync(alice.store, target, mirror, verify_content=True)
        assert again.in_sync == again.read == 3 and not again.damaged and not again.to_upload
        restored = await restore(config, target)
    assert restored.restored == 3 and not restored.corrupt
    for data in (sound, rotten, truncated):
        assert Layout(elsewhere.data_dir).blob_path(b3(data)).read_bytes() == data


async def test_sync_verify_content_never_uploads_a_damaged_local_file(
        server, setup, bucket, tmp_path):
    _, alice = await start(server, setup, tmp_path)
    data = os.urandom(5000)
    await alice.put(data)
    await mirrored(alice, bucket, {b3(data)})
    in_bucket, local = os.urandom(5000), os.urandom(5000)
    await in_thread(bucket.rot, bucket.key(b3(data)), in_bucket)
    path = alice.store.layout.blob_path(b3(data))
    path.write_bytes(local)

    result = await setup.cli("sync", "--verify-content")
    assert result.returncode == 1
    assert f"failed {b3(data)}: damaged in the bucket (the mirror's copy of {b3(data)} has" \
           in result.stderr
    assert "and the local file is not the blob either, so it was not uploaded" \
           in result.stderr
    assert ", 1 damaged, 0 uploaded again" in result.stdout
    assert await in_thread(bucket.get, bucket.key(b3(data))) == in_bucket
    assert path.read_bytes() == local


async def test_sync_aborts_multipart_uploads_a_crash_left(setup, bucket, tmp_path):
    await setup.init()
    crashed = bucket.key(b3(b"a big blob, once"))
    other = f"{bucket.prefix}/not-a-blob.bin"  # not blobd's: left alone
    for key in (crashed, other):
        await in_thread(bucket.start_upload, key)

    fresh = await setup.cli("sync")  # it may be in flight: never cut
    assert fresh.returncode == 0, fresh.stderr
    assert "0 abandoned multipart uploads, aborted 0" in fresh.stdout
    assert await in_thread(bucket.unfinished) == {crashed, other}

    setup.sections["mirror"]["abandoned_upload_hours"] = 1 / 3600
    setup.config_path.write_text(to_toml(setup.sections))
    await eventually(lambda: in_thread(bucket.abandoned, 1 / 3600), interval=0.05,
                     what="the uploads older than the second")
    dry = await setup.cli("sync", "--dry-run")
    assert f"would abort the abandoned multipart upload of {crashed}" in dry.stdout
    assert await in_thread(bucket.unfinished) == {crashed, other}
    swept = await setup.cli("sync")
    assert swept.returncode == 0, swept.stderr
    assert "1 abandoned multipart uploads, aborted 1" in swept.stdout
    assert await in_thread(bucket.unfinished) == {other}


async def test_backup_and_status(server, setup, bucket, tmp_path):
    _, alice = await start(server, setup, tmp_path)
    await alice.put(b"some bytes")
    first = await setup.cli("backup")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("index backup uploaded s3://")
    second = await setup.cli("backup")
    assert "unchanged since" in second.stdout
    assert len(await in_thread(bucket.keys, "_index/")) == 1
    status = await setup.cli("status")
    assert status.returncode == 0, status.stderr
    assert "queue: " in status.stdout and "index backups: 1" in status.stdout


async def test_status_tells_how_old_the_backlog_is(setup, bucket):
    await setup.init()
    empty = await setup.cli("status")
    assert "queue: 0 pending, 0 failing\n" in empty.stdout
    with sqlite3.connect(Layout(setup.data_dir).index_path) as conn:
        for age in (7200, 30):
            conn.execute("INSERT INTO mirror_queue (hash, op, enqueued_at, next_at)"
                         " VALUES (?, 'put', ?, 9e9)", ("a" * 64, time.time() - age))
    status = await setup.cli("status")
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if x.startswith("queue: "))
    assert line.startswith("queue: 2 pending, 0 failing, oldest pending 72")  # 7200s on


async def test_fsck_suggests_mirror_heal_for_damaged_files(server, setup, bucket, tmp_path):
    _, alice = await start(server, setup, tmp_path)
    flipped, gone = os.urandom(5000), os.urandom(6000)
    for data in (flipped, gone):
        await alice.put(data)
    path = alice.store.layout.blob_path(b3(flipped))
    path.write_bytes(bytes([flipped[0] ^ 1]) + flipped[1:])
    alice.store.layout.blob_path(b3(gone)).unlink()

    checked = await in_thread(lambda: run_blobd("fsck", "--verify", "-c",
                                                str(setup.config_path)))
    assert checked.returncode == 1, checked.stderr
    assert checked.stdout.splitlines()[-1] == (
        "  2 blob(s) without a sound file can be fetched back from the mirror: run"
        f" blobd mirror heal -c {setup.config_path} (naming their hashes after it"
        " checks only those)")

    unmirrored = tmp_path / "unmirrored.toml"
    unmirrored.write_text(to_toml({k: v for k, v in setup.sections.items() if k != "mirror"}))
    plain = await in_thread(lambda: run_blobd("fsck", "--verify", "-c", str(unmirrored)))
    assert plain.returncode == 1 and "mirror" not in plain.stdout


async def test_heal_command_repairs_same_size_damage(server, setup, bucket, tmp_path):
    _, alice = await start(server, setup, tmp_path)
    good, unmirrored = os.urandom(40_000), os.urandom(1000)
    await alice.put(good)
    await mirrored(alice, bucket, {b3(good)})
    path = alice.store.layout.blob_path(b3(good))
    path.write_bytes(good[:100] + bytes(1000) + good[1100:])

    healed = await setup.cli("heal")
    assert healed.returncode == 0, healed.stderr
    assert f"healed {b3(good)}" in healed.stdout
    assert path.read_bytes() == good

    await alice.put(unmirrored)
    await mirrored(alice, bucket, {b3(unmirrored)})
    await in_thread(bucket.delete, bucket.key(b3(unmirrored)))
    alice.store.layout.blob_path(b3(unmirrored)).unlink()
    failed = await setup.cli("heal", b3(unmirrored))
    assert failed.returncode == 1
    assert f"cannot heal {b3(unmirrored)}: missing" in failed.stderr
    assert "1 checked" in failed.stdout


# -- restore --------------------------------------------------------------------

async def get_ok(api, path: str):
    resp = await api.request("GET", path)
    assert resp.status == 200, (path, resp.status, await resp.text())
    return resp


async def test_restore_into_an_empty_data_dir(server, setup, bucket, s3server, tmp_path):
    login, alice = await start(server, setup, tmp_path)
    bob = await login("bob")
    songs = {f"songs:{n}": os.urandom(30_000 + n) for n in range(4)}
    for name, data in songs.items():
        assert (await alice.put(data, headers={"Blob-Ref": name})).status == 201
    shared = os.urandom(9000)
    await alice.put(shared)
    await bob.put(shared, headers={"Blob-Ref": "mine"})
    doomed = os.urandom(500)
    await bob.put(doomed)
    await mirrored(alice, bucket, {b3(d) for d in [*songs.values(), shared, doomed]})
    assert (await setup.cli("backup")).returncode == 0
    # After the backup: one blob deleted (its object goes too), one stored.
    await bob.request("DELETE", f"/blobs/{b3(doomed)}")
    late = os.urandom(1234)
    await alice.put(late, headers={"Content-Type": "text/plain"})
    await mirrored(alice, bucket, {b3(late)})
    assert b3(doomed) not in await in_thread(bucket.digests)

    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    result = await fresh.cli("restore", "-j", "2")
    assert result.returncode == 0, result.stderr
    assert "1 given to owner _restored" in result.stdout
    assert f"not in the bucket, dropped: {b3(doomed)}" in result.stderr
    assert not (fresh.data_dir / "restoring").exists()
    again = await fresh.cli("restore")
    assert again.returncode == 1 and "already holds" in again.stderr

    login2 = await server(config=fresh.config(tmp_path))
    alice2 = await login2("alice")
    alice2.token, bob2 = alice.token, await login2("bob")
    bob2.token = bob.token  # tokens came back with the index
    for name, data in songs.items():
        ref = await (await get_ok(alice2, f"/refs/{name}")).json()
        assert ref["hash"] == b3(data)
        assert await (await get_ok(alice2, f"/blobs/{b3(data)}")).read() == data
    assert (await (await get_ok(bob2, "/refs/mine")).json())["hash"] == b3(shared)
    assert (await (await get_ok(bob2, f"/blobs/{b3(shared)}/meta")).json())["refcount"] == 2
    assert (await bob2.request("GET", f"/blobs/{b3(doomed)}")).status == 404
    orphan = await (await get_ok(alice2, f"/blobs/{b3(late)}/meta")).json()
    assert orphan["refcount"] == 1 and orphan["content_type"] == "text/plain"
    assert orphan["mirror"]["state"] == "done"
    assert await (await get_ok(alice2, f"/blobs/{b3(late)}")).read() == late
    assert index_rows(fresh.data_dir, "SELECT owner, name FROM refs WHERE hash = '%s'"
                      % b3(late)) == [("_restored", b3(late))]
    assert len(blob_files(fresh.data_dir)) == len(songs) + 2
    assert index_rows(fresh.data_dir, "SELECT count(*) FROM mirror_queue") == [(0,)]
    usage = dict(index_rows(fresh.data_dir, "SELECT owner, used_blobs FROM owners"))
    assert usage["alice"] == len(songs) + 1 and usage["bob"] == 1

    served = await fresh.cli("restore")
    assert served.returncode == 1 and "another blobd is serving" in served.stderr


async def _four_blobs_backed_up(server, setup, bucket, tmp_path) -> list[bytes]:
    """A store of four mirrored blobs, its index backed up: what a restore
    that gets cut short starts from."""
    _, alice = await start(server, setup, tmp_path)
    blobs = [os.urandom(10_000 + n) for n in range(4)]
    for data in blobs:
        await alice.put(data)
    await mirrored(alice, bucket, {b3(d) for d in blobs})
    assert (await setup.cli("backup")).returncode == 0
    return blobs


async def test_an_interrupted_restore_resumes(server, setup, bucket, tmp_path):
    blobs = await _four_blobs_backed_up(server, setup, bucket, tmp_path)

    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    assert (await fresh.cli("restore")).returncode == 0
    # The state a crash half-way leaves: marker present, index in place,
    # some files not yet fetched.
    marker = {"backup": (await in_thread(bucket.keys, "_index/"))[0], "installed": True}
    (fresh.data_dir / "restoring").write_text(json.dumps(marker))
    for data in blobs[:2]:
        Layout(fresh.data_dir).blob_path(b3(data)).unlink()

    # fsck would take the blobs still to fetch for lost ones (and --repair
    # drop those nobody references): it refuses, as serve does.
    for extra in ((), ("--repair",)):
        fsck = await in_thread(lambda: run_blobd("fsck", *extra, "-c", str(fresh.config_path)))
        assert fsck.returncode == 1 and fsck.stdout == ""
        assert fsck.stderr.strip().splitlines() == [
            f"blobd: error: an interrupted 'blobd mirror restore' left {fresh.data_dir}"
            " half-restored; run it again to finish before fsck"]

    resumed = await fresh.cli("restore")
    assert resumed.returncode == 0, resumed.stderr
    assert "restored 2 blobs" in resumed.stdout and "2 already in place" in resumed.stdout
    for data in blobs:
        assert Layout(fresh.data_dir).blob_path(b3(data)).read_bytes() == data
    assert not (fresh.data_dir / "restoring").exists()


async def test_restore_gives_back_what_lost_upload_sessions_reserved(
        server, setup, bucket, tmp_path):
    # Sessions open at the backup had their files on the dead disk: the
    # restore drops them, and with them every byte and blob slot they held.
    _, alice = await start(server, setup, tmp_path)
    kept = os.urandom(5000)
    await alice.put(kept)
    await mirrored(alice, bucket, {b3(kept)})
    opened = await alice.request("POST", "/uploads", json={"size": 3000})
    assert opened.status == 201
    tus = await alice.request("POST", "/tus/", headers={"Tus-Resumable": "1.0.0",
                                                         "Upload-Length": "2000"})
    assert tus.status == 201
    held = index_rows(setup.data_dir, "SELECT reserved_bytes, reserved_blobs FROM owners")
    assert held == [(5000, 2)]
    assert (await setup.cli("backup")).returncode == 0

    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    assert (await fresh.cli("restore")).returncode == 0
    assert index_rows(fresh.data_dir, "SELECT owner, used_blobs, reserved_bytes,"
                      " reserved_blobs FROM owners") == [("alice", 1, 0, 0)]
    fsck = await in_thread(lambda: run_blobd("fsck", "--verify", "-c", str(fresh.config_path)))
    assert fsck.returncode == 0, fsck.stdout


async def test_restore_needs_a_mirror_section(tmp_path):
    config = tmp_path / "plain.toml"
    config.write_text(to_toml({"server": {"data_dir": str(tmp_path / "d")}}))
    result = await in_thread(lambda: run_blobd("mirror", "restore", "-c", str(config)))
    assert result.returncode == 1
    assert result.stderr.strip() == "blobd: error: mirror: the config has no [mirror] section"


async def test_unreachable_mirror_is_one_clear_line(tmp_path, s3server):
    from s3server import _free_ports
    (port,) = _free_ports(1)
    section = mirror_section(s3server, "x", endpoint=f"http://127.0.0.1:{port}")
    setup = Setup(tmp_path, "data", section)
    await setup.init()
    # Each retries the refused connections for a while: the two at once.
    result, status = await asyncio.gather(setup.cli("backup"), setup.cli("status"))
    assert result.returncode == 1
    assert result.stderr.startswith("blobd: error: mirror: ")
    assert len(result.stderr.strip().splitlines()) == 1

    # status reports it as part of the state, and succeeds.
    assert status.returncode == 0, status.stderr
    assert status.stderr == ""
    lines = status.stdout.splitlines()
    assert lines[0].startswith("store id: ")
    assert lines[1] == "queue: 0 pending, 0 failing"
    assert lines[2].startswith("mirror unreachable: LIST s3://")
    assert len(lines) == 3


@pytest.mark.parametrize("skip", [False, True], ids=["adopt", "skip-orphans"])
async def test_restore_without_any_index_backup(server, setup, bucket, tmp_path, skip):
    _, alice = await start(server, setup, tmp_path)
    blobs = [os.urandom(2000 + n) for n in range(2)]
    for data in blobs:
        await alice.put(data)
    await mirrored(alice, bucket, {b3(d) for d in blobs})
    assert await in_thread(bucket.keys, "_index/") == []

    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    result = await fresh.cli("restore", *(["--skip-orphans"] if skip else []))
    assert result.returncode == 0, result.stderr
    assert "index backup (none)" in result.stdout
    refs = index_rows(fresh.data_dir, "SELECT owner, hash FROM refs ORDER BY hash")
    if skip:
        assert "left 2 in the bucket only" in result.stdout
        assert refs == [] and blob_files(fresh.data_dir) == []
    else:
        assert refs == sorted(("_restored", b3(d)) for d in blobs)
        assert sorted(p.read_bytes() for p in blob_files(fresh.data_dir)) == sorted(blobs)


async def deleted_with_its_object_kept(server, tmp_path, s3server, mirror_prefix, bucket,
                                      kept: bytes, deleted: bytes):
    """A store mirrored with keep_deleted holding ``kept``, and ``deleted``
    mirrored, then deleted (its object stays); (setup, alice, the deleted
    blob's object HEAD from before its deletion)."""
    setup = Setup(tmp_path, "data", mirror_section(
        s3server, mirror_prefix, backup_interval_seconds=0, keep_deleted=True))
    _, alice = await start(server, setup, tmp_path)
    for data in (kept, deleted):
        await alice.put(data)
    await mirrored(alice, bucket, {b3(kept), b3(deleted)})
    head = await in_thread(bucket.head, bucket.key(b3(deleted)))
    assert (await alice.request("DELETE", f"/blobs/{b3(deleted)}")).status == 204
    await eventually(lambda: drained(alice), what="the delete handled")
    return setup, alice, head


async def test_restore_leaves_blobs_deleted_before_the_backup_deleted(
        server, tmp_path, s3server, mirror_prefix, bucket):
    """Found by review: with keep_deleted (or a deletion still queued) the
    object of a blob deleted before the backup was taken for one stored
    after it, and came back under _restored."""
    kept, deleted = os.urandom(3000), os.urandom(3001)
    setup, alice, _ = await deleted_with_its_object_kept(
        server, tmp_path, s3server, mirror_prefix, bucket, kept, deleted)
    assert b3(deleted) in await in_thread(bucket.digests)  # kept by keep_deleted
    assert (await setup.cli("backup")).returncode == 0
    late = os.urandom(3002)
    await alice.put(late)
    await mirrored(alice, bucket, {b3(late)})

    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    result = await fresh.cli("restore")
    assert result.returncode == 0, result.stderr
    assert "1 given to owner _restored, 1 deleted before it left deleted" in result.stdout
    assert index_rows(fresh.data_dir, "SELECT owner, hash FROM refs ORDER BY owner") == [
        ("_restored", b3(late)), ("alice", b3(kept))]
    assert sorted(p.read_bytes() for p in blob_files(fresh.data_dir)) == sorted([kept, late])


async def test_restore_brings_back_a_blob_stored_again_after_the_backup(
        server, tmp_path, s3server, mirror_prefix, bucket):
    """Found by review: content deleted, backed up as deleted, then stored
    again (201) found its old object in the bucket, so nothing was uploaded;
    the object kept its old date and the restore dropped the blob as
    deleted before the backup. The upload of the new incarnation is now
    made (stamped with its creation), and the restore reads the stamp."""
    kept, again = os.urandom(3001), os.urandom(3000)
    setup, alice, first = await deleted_with_its_object_kept(
        server, tmp_path, s3server, mirror_prefix, bucket, kept, again)
    assert (await setup.cli("backup")).returncode == 0
    assert (await alice.put(again)).status == 201
    await eventually(lambda: drained(alice), what="the new incarnation mirrored")
    meta = await (await alice.request("GET", f"/blobs/{b3(again)}/meta")).json()
    assert meta["mirror"]["state"] == "done"
    second = await in_thread(bucket.head, bucket.key(b3(again)))
    assert second["Metadata"]["blobd-created"] != first["Metadata"]["blobd-created"]
    # SeaweedFS replaces an object's entry: right after, a listing once
    # lacked it (a CI flake), and the restore below reads the listing.
    await eventually(lambda: in_thread(lambda: b3(again) in bucket.digests()),
                     what="the new incarnation listed")

    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    result = await fresh.cli("restore")
    assert result.returncode == 0, result.stderr
    assert "1 given to owner _restored" in result.stdout
    assert index_rows(fresh.data_dir, "SELECT owner, hash FROM refs ORDER BY owner") == [
        ("_restored", b3(again)), ("alice", b3(kept))]
    assert sorted(p.read_bytes() for p in blob_files(fresh.data_dir)) == sorted([again, kept])
    # The adopted blob keeps its object's creation stamp, so the object is
    # its upload: nothing to upload again (found by review of the stamp).
    (created,) = index_rows(fresh.data_dir, f"SELECT created_at FROM blobs WHERE hash ="
                            f" '{b3(again)}'")[0]
    assert created_stamp(created) == second["Metadata"]["blobd-created"]
    verified = await fresh.cli("sync", "--verify")
    assert verified.returncode == 0, verified.stderr
    assert "0 mismatched" in verified.stdout and "uploaded 0" in verified.stdout


async def test_restore_leaves_deleted_a_blob_deleted_while_the_mirror_was_off(
        server, setup, bucket, tmp_path):
    """Found by review: a mirrored blob deleted while [mirror] was taken out
    of the config kept its object (nothing deletes it then) and was not
    remembered as deleted, so a restore brought it back under _restored."""
    login, alice = await start(server, setup, tmp_path)
    kept, gone = os.urandom(3000), os.urandom(3001)
    for data in (kept, gone):
        await alice.put(data)
    await mirrored(alice, bucket, {b3(kept), b3(gone)})
    await alice.client.close()

    login = await server(config=setup.config(tmp_path, mirror=False))
    alice = await login("alice")
    assert (await alice.request("DELETE", f"/blobs/{b3(gone)}")).status == 204
    later = os.urandom(3002)  # never mirrored: nothing to remember when deleted
    await alice.put(later)
    assert (await alice.request("DELETE", f"/blobs/{b3(later)}")).status == 204
    assert index_rows(setup.data_dir, "SELECT hash FROM deleted_blobs") == [(b3(gone),)]
    await alice.client.close()

    _, alice = await start(server, setup, tmp_path)
    assert (await setup.cli("backup")).returncode == 0
    assert b3(gone) in await in_thread(bucket.digests)  # the object is still there
    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    result = await fresh.cli("restore")
    assert result.returncode == 0, result.stderr
    assert "0 given to owner _restored, 1 deleted before it left deleted" in result.stdout
    assert [p.read_bytes() for p in blob_files(fresh.data_dir)] == [kept]


async def test_sync_uploads_again_content_stored_again_after_a_deletion(
        server, setup, bucket, tmp_path):
    """Found in review of the stamp: sync took an object of the right size
    for the blob's, so content deleted and stored again (the mirror off
    meanwhile) kept its old object and stamp, and a restore from a backup
    taken after the deletion would have dropped it."""
    _, alice = await start(server, setup, tmp_path)
    data = os.urandom(4000)
    await alice.put(data)
    await mirrored(alice, bucket, {b3(data)})
    old = (await in_thread(bucket.head, bucket.key(b3(data))))["Metadata"]
    await alice.client.close()

    login = await server(config=setup.config(tmp_path, mirror=False))
    alice = await login("alice")
    assert (await alice.request("DELETE", f"/blobs/{b3(data)}")).status == 204
    assert (await alice.put(data)).status == 201
    (created,) = index_rows(setup.data_dir, f"SELECT created_at FROM blobs WHERE hash = '{b3(data)}'")[0]

    result = await setup.cli("sync")
    assert result.returncode == 0, result.stderr
    assert "uploaded 1" in result.stdout
    new = (await in_thread(bucket.head, bucket.key(b3(data))))["Metadata"]
    assert new["blobd-created"] == f"{created:.6f}" != old["blobd-created"]
    again = await setup.cli("sync")
    assert "uploaded 0" in again.stdout and "1 in sync" in again.stdout


async def test_orphans_given_to_an_owner_at_a_limit_are_restored(server, setup, bucket,
                                                                tmp_path):
    """Found by review: an owner's own max_bytes override applied to the
    blobs adopted for it, the restore could never finish, and each try
    left the adopted file without its row."""
    login, alice = await start(server, setup, tmp_path)
    await alice.put(os.urandom(100))
    async with alice.store.write() as tx:
        await tx.conn.execute("UPDATE owners SET max_bytes = 1024 WHERE owner = 'alice'")
    await eventually(lambda: drained(alice), what="mirror queue drained")
    assert (await setup.cli("backup")).returncode == 0
    late = os.urandom(3333)  # bob's, stored after the backup; alice is to adopt it
    assert (await (await login("bob")).put(late)).status == 201
    await mirrored(alice, bucket, {b3(late)})

    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    result = await fresh.cli("restore", "--orphans-owner", "alice")
    assert result.returncode == 0, result.stderr
    assert "1 given to owner alice" in result.stdout
    assert (b3(late),) in index_rows(fresh.data_dir, "SELECT hash FROM refs WHERE owner = 'alice'")
    checked = await in_thread(lambda: run_blobd("fsck", "-c", str(fresh.config_path)))
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_restore_stops_reading_an_object_longer_than_its_blob(server, setup, bucket,
                                                                   tmp_path):
    """A bucket that serves more than the blob's size cannot fill the disk
    (found by review: the whole object was downloaded, then checked)."""
    _, alice = await start(server, setup, tmp_path)
    data = os.urandom(3000)
    await alice.put(data)
    await mirrored(alice, bucket, {b3(data)})
    assert (await setup.cli("backup")).returncode == 0
    await in_thread(bucket.put, bucket.key(b3(data)), os.urandom(8 << 20))

    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    result = await fresh.cli("restore")
    assert result.returncode == 1
    assert (f"damaged in the bucket, dropped: {b3(data)}: the object is larger than the"
            " 3000 bytes expected") in result.stderr
    assert blob_files(fresh.data_dir) == [] and list((fresh.data_dir / "tmp").iterdir()) == []


async def test_restore_from_an_empty_prefix_is_an_error(tmp_path, s3server, mirror_prefix):
    """Found by review: a mistyped prefix "restored" nothing and exited 0."""
    fresh = Setup(tmp_path, "fresh", mirror_section(s3server, mirror_prefix + "-typo"))
    result = await fresh.cli("restore")
    assert result.returncode == 1
    assert result.stderr.startswith("blobd: error: nothing to restore: ")
    assert len(result.stderr.strip().splitlines()) == 1


# -- which store a command works on, which backup a restore takes --------------

def store_id(data_dir: Path) -> str:
    return index_rows(data_dir, "SELECT value FROM meta WHERE name = 'store_id'")[0][0]


async def test_a_new_disk_does_not_back_up_over_the_store_it_replaces(
        server, setup, bucket, tmp_path):
    _, alice = await start(server, setup, tmp_path)
    data = os.urandom(3000)
    await alice.put(data, headers={"Blob-Ref": "songs:1"})
    await mirrored(alice, bucket, {b3(data)})
    assert (await setup.cli("backup")).returncode == 0
    [key] = await in_thread(bucket.keys, "_index/")
    assert key.endswith(f"-{store_id(setup.data_dir)}.sqlite3")

    # The disk died; the same config on a new one, where a store was made.
    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    await fresh.init()
    assert store_id(fresh.data_dir) != store_id(setup.data_dir)
    for action in ("backup", "sync"):
        refused = await fresh.cli(action)
        assert refused.returncode == 1
        assert "is of another store" in refused.stderr
        assert "`blobd mirror restore`" in refused.stderr
    assert await in_thread(bucket.keys, "_index/") == [key]

    shutil.rmtree(fresh.data_dir)
    restored = await fresh.cli("restore")
    assert restored.returncode == 0, restored.stderr
    assert f"index backup {key};" in restored.stdout
    assert index_rows(fresh.data_dir, "SELECT owner, name FROM refs") == [("alice", "songs:1")]
    assert store_id(fresh.data_dir) == store_id(setup.data_dir)  # it is that store again
    onwards = await fresh.cli("backup")
    assert onwards.returncode == 0, onwards.stderr
    assert store_id(fresh.data_dir) in onwards.stdout


async def test_an_empty_index_does_not_back_up_over_a_bucket_of_blobs(setup, bucket):
    stray = os.urandom(100)
    await in_thread(bucket.put, bucket.key(b3(stray)), stray)
    # A backup from before store ids: it names no store, so says nothing.
    legacy = f"{bucket.prefix}/_index/index-20240101T000000.000000Z.sqlite3"
    await in_thread(bucket.put, legacy, b"an old backup")
    await setup.init()
    refused = await setup.cli("backup")
    assert refused.returncode == 1
    assert "this index holds no blobs but the bucket" in refused.stderr
    assert "`blobd mirror restore`" in refused.stderr

    forced = await setup.cli("backup", "--force")
    assert forced.returncode == 0, forced.stderr
    # Now the newest backup is this store's own: its empty index is its
    # real state (its blobs deleted, the objects kept), so no --force.
    again = await setup.cli("backup")
    assert again.returncode == 0 and "unchanged since" in again.stdout
    assert len(await in_thread(bucket.keys, "_index/")) == 2


async def test_restore_between_two_stores_needs_one_named(server, setup, bucket, tmp_path):
    _, alice = await start(server, setup, tmp_path)
    data = os.urandom(3000)
    await alice.put(data, headers={"Blob-Ref": "mine"})
    await mirrored(alice, bucket, {b3(data)})
    assert (await setup.cli("backup")).returncode == 0
    other = Setup(tmp_path, "other", setup.sections["mirror"])
    await other.init()
    assert (await other.cli("backup", "--force")).returncode == 0
    first, second = sorted(await in_thread(bucket.keys, "_index/"))

    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    refused = await fresh.cli("restore")
    assert refused.returncode == 1
    assert "index backups of 2 stores" in refused.stderr and "--backup KEY" in refused.stderr
    assert store_id(setup.data_dir) in refused.stderr and store_id(other.data_dir) in refused.stderr
    assert not (fresh.data_dir / "restoring").exists()

    unknown = await fresh.cli("restore", "--backup", "index-nope.sqlite3")
    assert unknown.returncode == 1 and "not an index backup key" in unknown.stderr
    chosen = await fresh.cli("restore", "--backup", first.rsplit("/", 1)[1])
    assert chosen.returncode == 0, chosen.stderr
    assert f"index backup {first};" in chosen.stdout
    assert index_rows(fresh.data_dir, "SELECT owner, name FROM refs") == [("alice", "mine")]


@pytest.mark.parametrize("action", [["sync", "--delete"], ["backup"], ["heal"], ["status"]],
                         ids=lambda action: action[0])
async def test_mirror_commands_need_an_existing_store(setup, bucket, action):
    stray = os.urandom(100)
    await in_thread(bucket.put, bucket.key(b3(stray)), stray)
    result = await setup.cli(*action)  # data_dir mistyped, or relative from elsewhere
    assert result.returncode == 1
    assert result.stderr.startswith("blobd: error: no blobd store in ")
    assert not setup.data_dir.exists()
    assert await in_thread(bucket.keys) == [bucket.key(b3(stray))]


async def test_mirror_commands_refuse_a_half_restored_store(setup, bucket):
    await setup.init()
    (setup.data_dir / "restoring").write_text("{}")
    for action in ("sync", "backup", "heal", "status"):
        result = await setup.cli(action)
        assert result.returncode == 1
        assert "half-restored; run it again to finish first" in result.stderr
    assert await in_thread(bucket.keys) == []


async def test_sync_delete_refuses_an_empty_index_unless_forced(setup, bucket):
    await setup.init()
    strays = [os.urandom(100 + n) for n in range(2)]
    for data in strays:
        await in_thread(bucket.put, bucket.key(b3(data)), data)
    for extra in ((), ("--dry-run",)):  # a dry run foretells the refusal
        refused = await setup.cli("sync", "--delete", *extra)
        assert refused.returncode == 1 and "would delete" not in refused.stdout
        assert "holds no blobs, so --delete would delete all 2 blob objects" in refused.stderr
    dry = await setup.cli("sync", "--delete", "--dry-run", "--force")
    assert dry.returncode == 0 and dry.stdout.count("would delete") == 2
    assert await in_thread(bucket.digests) == {b3(d) for d in strays}

    forced = await setup.cli("sync", "--delete", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "deleted 2" in forced.stdout
    assert await in_thread(bucket.digests) == set()


@pytest.mark.parametrize("backed_up", [True, False], ids=["old-backup", "no-backup"])
async def test_sync_delete_on_a_new_disk_spares_the_old_stores_objects(
        server, setup, bucket, tmp_path, backed_up):
    _, alice = await start(server, setup, tmp_path)
    old = [os.urandom(3000 + n) for n in range(3)]
    for data in old:
        await alice.put(data)
    await mirrored(alice, bucket, {b3(d) for d in old})
    if backed_up:
        assert (await setup.cli("backup")).returncode == 0
    backups = await in_thread(bucket.keys, "_index/")

    # The disk died. On the new one, under the same config, a server made a
    # fresh store at boot and took an upload, mirrored at once.
    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    bob = await (await server(config=fresh.config(tmp_path)))("bob")
    new = os.urandom(2000)
    await bob.put(new)
    await mirrored(bob, bucket, {b3(new)})
    why = ("is of another store" if backed_up else
           "has never backed up its index to the bucket, so the 3 blob objects")
    for extra in ((), ("--dry-run",)):
        refused = await fresh.cli("sync", "--delete", *extra)
        assert refused.returncode == 1 and "would delete" not in refused.stdout
        [line] = refused.stderr.strip().splitlines()
        assert line.startswith("blobd: error: --delete refused: ") and why in line
        assert "`blobd mirror restore`" in line and "--force" in line
    assert await in_thread(bucket.digests) == {b3(d) for d in [*old, new]}
    assert await in_thread(bucket.keys, "_index/") == backups

    planned = await fresh.cli("sync", "--delete", "--dry-run", "--force")
    assert planned.returncode == 0, planned.stderr
    assert [line.split()[-1] for line in planned.stdout.splitlines()
            if line.startswith("would delete ")] == sorted(b3(d) for d in old)


# -- what restore trusts --------------------------------------------------------

async def test_restore_refuses_a_data_dir_with_files_in_blobs(server, setup, bucket, tmp_path):
    _, alice = await start(server, setup, tmp_path)
    data = os.urandom(3000)
    await alice.put(data)
    await mirrored(alice, bucket, {b3(data)})
    assert (await setup.cli("backup")).returncode == 0
    # A salvaged blob tree without its index: the names say nothing of the bytes.
    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    salvaged = Layout(fresh.data_dir).blob_path(b3(data))
    salvaged.parent.mkdir(parents=True)
    salvaged.write_bytes(bytes(len(data)))

    refused = await fresh.cli("restore")
    assert refused.returncode == 1
    assert f"{fresh.data_dir / 'blobs'} is not empty" in refused.stderr
    assert not (fresh.data_dir / "restoring").exists()
    assert salvaged.read_bytes() == bytes(len(data))


async def test_a_resumed_restore_keeps_only_files_it_recorded_or_verified(
        server, setup, bucket, tmp_path):
    blobs = await _four_blobs_backed_up(server, setup, bucket, tmp_path)
    fresh = Setup(tmp_path, "fresh", setup.sections["mirror"])
    assert (await fresh.cli("restore")).returncode == 0

    # The state a crash leaves: marker, index installed, blobs[0] recorded
    # as placed, the others placed but not yet recorded; of those, one was
    # damaged since (the same size) and one is gone.
    [key] = await in_thread(bucket.keys, "_index/")
    marker = {"backup": key, "installed": True, "records_placed": True}
    (fresh.data_dir / "restoring").write_text(json.dumps(marker))
    with sqlite3.connect(Layout(fresh.data_dir).index_path) as conn:
        conn.execute("UPDATE blobs SET mirror_state = 'pending' WHERE hash != ?",
                     (b3(blobs[0]),))
    paths = [Layout(fresh.data_dir).blob_path(b3(d)) for d in blobs]
    paths[1].write_bytes(bytes(len(blobs[1])))
    paths[2].unlink()

    resumed = await fresh.cli("restore")
    assert resumed.returncode == 0, resumed.stderr
    assert "restored 2 blobs" in resumed.stdout and "2 already in place" in resumed.stdout
    assert [path.read_bytes() for path in paths] == blobs
    assert index_rows(fresh.data_dir, "SELECT DISTINCT mirror_state FROM blobs") == [("done",)]


async def test_restore_checks_the_orphans_owner(setup):
    result = await setup.cli("restore", "--orphans-owner", "Old Files/2024")
    assert result.returncode == 1
    assert result.stderr == ("blobd: error: an owner is 1-64 characters from"
                             " A-Z a-z 0-9 . _ @ -\n")
    assert not setup.data_dir.exists()

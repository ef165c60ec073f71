"""A really full disk: the data directory on a small tmpfs.

Mounting needs root (CI runs as root); anywhere else these tests fail and
say why rather than skip, because a silent skip would hide a broken store.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from audiofixtures import FIXTURES
from conftest import b3, blob_files, make_config, tmp_files
from mirrorhelp import eventually
from serverproc import BlobdServer, http, wait_until

MiB = 1 << 20


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """An 8 MiB tmpfs, unmounted afterwards."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.fail("this test mounts an 8 MiB tmpfs as the data directory and must run"
                    " as root (CI does); run the suite as root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                             str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"mount -t tmpfs failed ({result.returncode}): {result.stderr.strip()}"
                    " - the ENOSPC tests need a tmpfs mount (root, no restrictive"
                    " container profile)")
    yield mountpoint
    if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
        # Still busy (a file the test left open): detach it anyway.
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


async def start(server, tiny_fs: Path, **sections):
    cfg = make_config(tiny_fs, **{"storage": {"min_free_bytes": 0}, **sections})
    login = await server(cfg)
    return await login("alice")


async def state(api) -> tuple:
    """Everything a failed upload must leave as it was."""
    db = api.store.db
    counts = await db.fetchone("SELECT (SELECT count(*) FROM blobs) b,"
                               " (SELECT count(*) FROM refs) r")
    owner = await db.fetchone("SELECT used_bytes, used_blobs, monthly_upload_bytes"
                              " FROM owners WHERE owner = 'alice'")
    return (tuple(counts), tuple(owner) if owner else None,
            blob_files(api.data_dir), tmp_files(api.data_dir))


async def assert_disk_full(resp) -> None:
    body = await resp.json()
    assert resp.status == 507 and body["error"] == "insufficient_storage", body


async def test_enospc_mid_upload_leaves_nothing_behind(server, tiny_fs):
    alice = await start(server, tiny_fs)
    stored: list[bytes] = []
    for _ in range(20):
        data = os.urandom(MiB)
        before = await state(alice)
        resp = await alice.put(data)
        if resp.status != 201:
            break
        stored.append(data)
    else:
        pytest.fail("20 MiB fitted on an 8 MiB file system")
    await assert_disk_full(resp)
    assert len(stored) >= 3
    assert await state(alice) == before

    async def chunked():
        for _ in range(4):
            yield os.urandom(MiB)
    await assert_disk_full(await alice.request("POST", "/blobs", data=chunked()))
    assert await state(alice) == before
    # Still serving what it has, and healthy.
    assert (await alice.request("GET", "/healthz")).status == 200
    for data in stored:
        resp = await alice.request("GET", f"/blobs/{b3(data)}")
        assert resp.status == 200 and await resp.read() == data
    # Make room: uploads work again.
    for data in stored[:2]:
        assert (await alice.request("DELETE", f"/blobs/{b3(data)}")).status == 204
    assert (await alice.put(os.urandom(MiB))).status == 201
    assert tmp_files(alice.data_dir) == []


def fill(directory: Path) -> Path:
    """Take every free byte of the file system with one file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (MiB, 4096):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


async def test_full_disk_at_commit_undoes_the_link(server, tiny_fs):
    alice = await start(server, tiny_fs)
    assert (await alice.put(b"first")).status == 201
    before = await state(alice)
    # An empty index log, then no free byte: an empty blob needs no data
    # block, so the body and its hard link succeed and the COMMIT is what
    # meets the full disk - after the blob was linked into place.
    with sqlite3.connect(alice.data_dir / "index.sqlite3") as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0
    filler = fill(tiny_fs)
    await assert_disk_full(await alice.put(b""))
    assert await state(alice) == before
    assert not (alice.data_dir / "blobs" / b3(b"")[:2] / b3(b"")[2:4] / b3(b"")).exists()
    filler.unlink()
    # The index connection is not left inside a dead transaction.
    assert (await alice.put(b"")).status == 201
    assert (await alice.put(b"second")).status == 201


async def test_min_free_bytes_stops_uploads_before_the_disk_is_full(server, tiny_fs):
    alice = await start(server, tiny_fs, storage={"min_free_bytes": "5MiB"})
    before = await state(alice)
    # Announced: refused before a byte is read.
    await assert_disk_full(await alice.put(os.urandom(3 * MiB)))

    async def chunked():
        for _ in range(3):
            yield os.urandom(MiB)
            await asyncio.sleep(0)
    # Not announced: stopped while streaming, once free space drops too low.
    await assert_disk_full(await alice.request("POST", "/blobs", data=chunked()))
    assert await state(alice) == before
    free = os.statvfs(tiny_fs)
    assert free.f_bavail * free.f_frsize > 5 * MiB
    assert (await alice.put(os.urandom(MiB))).status == 201


async def test_parallel_deferred_tus_patches_keep_to_the_free_space_floor(server, tiny_fs):
    """Found by review: each PATCH to a deferred-length tus upload saw the
    same free space, so together they went below min_free_bytes (and could
    fill the disk), and a refused one kept its bytes. Each now allocates
    its room in its file before reading its body, so the next one sees it
    gone; a refused one is cut back to its offset."""
    alice = await start(server, tiny_fs, storage={"min_free_bytes": 3 * MiB})
    tus = {"Tus-Resumable": "1.0.0"}
    urls = []
    for _ in range(5):
        resp = await alice.request("POST", "/tus/", headers={**tus, "Upload-Defer-Length": "1"})
        assert resp.status == 201, await resp.text()
        urls.append(resp.headers["Location"])
    answers = await asyncio.gather(*(alice.request(
        "PATCH", url, data=os.urandom(MiB + MiB // 2), headers={
            **tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"})
        for url in urls))
    statuses = sorted(resp.status for resp in answers)
    assert 204 in statuses and 507 in statuses, statuses
    for resp in answers:
        if resp.status != 204:
            await assert_disk_full(resp)
    free = os.statvfs(tiny_fs)
    assert free.f_bavail * free.f_frsize >= 3 * MiB
    held = 0
    for url in urls:
        resp = await alice.request("HEAD", url, headers=tus)
        offset = int(resp.headers["Upload-Offset"])
        assert alice.store.layout.upload_path(url.rsplit("/", 1)[1]).stat().st_size == offset
        held += offset
    assert held == statuses.count(204) * (MiB + MiB // 2)
    quota = await (await alice.request("GET", "/quota")).json()
    assert (quota["reserved_bytes"], quota["monthly_upload_bytes"]) == (held, held)


def test_full_disk_does_not_kill_the_workers(tmp_path, tiny_fs):
    """workers = N keep their metrics in files under the data dir, which
    prometheus_client grew sparse and wrote through a map: once the disk
    was full, every worker died of SIGBUS at its next request (a GET too),
    and each replacement at its first. Found by the crash campaign."""
    config = {"server": {"workers": 2}, "storage": {"min_free_bytes": 0}}
    with BlobdServer(tmp_path / "srv", config, data_dir=tiny_fs / "data") as server:
        alice = server.token("alice")
        filler = tiny_fs / "filler"
        with open(filler, "wb") as fh:
            with pytest.raises(OSError) as full:
                while True:
                    fh.write(b"\0" * (64 << 10))
                    fh.flush()
        assert full.value.errno == errno.ENOSPC
        # New series (routes, statuses) for each worker, whichever takes
        # the connection.
        for i in range(20):
            assert http("GET", f"{server.url}/blobs/{i:064x}", alice)[0] == 404
            assert http("DELETE", f"{server.url}/refs/r{i}", alice)[0] == 404
            assert http("POST", f"{server.url}/blobs", alice, b"x" * (i + 1))[0] == 507
        filler.unlink()
        assert http("GET", f"{server.url}/blobs/{0:064x}", alice)[0] == 404
        assert "exited with" not in server.stderr_tail(200), server.stderr_tail()


async def test_deletions_go_through_on_a_full_disk(server, tiny_fs):
    """Found by the crash review: with the file system full to the last
    block (another program filled it), every DELETE was 507, because SQLite
    needs room to record it. The server keeps a spare file and gives it up
    for a deletion that meets a full disk; the sweeper makes it again once
    there is room."""
    alice = await start(server, tiny_fs, storage={"min_free_bytes": 0, "reserve_bytes": MiB},
                        gc={"sweep_interval_seconds": 0.2})
    reserve = alice.data_dir / "reserve"
    await eventually(reserve.exists, timeout=10, what="the reserve file")
    assert reserve.stat().st_blocks * 512 >= MiB      # allocated, not sparse
    blobs = [os.urandom(MiB // 2) for _ in range(3)]
    for data in blobs:
        assert (await alice.put(data)).status == 201
    resp = await alice.request("PUT", "/refs/memo", json={"hash": b3(blobs[0])})
    assert resp.status == 200
    resp = await alice.request("POST", "/uploads", json={"size": MiB})
    assert resp.status == 201, await resp.text()
    session = (await resp.json())["id"]
    # A long index log would leave room inside it: start from an empty one.
    with sqlite3.connect(alice.data_dir / "index.sqlite3") as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0
    filler = fill(tiny_fs)
    await assert_disk_full(await alice.put(os.urandom(4096)))
    assert (await alice.request("DELETE", "/refs/memo")).status == 204
    assert not reserve.exists()
    for data in blobs[1:]:
        assert (await alice.request("DELETE", f"/blobs/{b3(data)}")).status == 204
    assert (await alice.request("DELETE", f"/uploads/{session}")).status == 204
    assert (await alice.request("DELETE", f"/blobs/{b3(blobs[0])}")).status == 204
    assert blob_files(alice.data_dir) == []
    assert not (alice.data_dir / "uploads" / session).exists()
    quota = await (await alice.request("GET", "/quota")).json()
    assert (quota["used_bytes"], quota["used_blobs"], quota["reserved_bytes"]) == (0, 0, 0)
    # Room again: the reserve comes back, and only while it leaves the
    # disk as much free room again.
    filler.unlink()
    await eventually(reserve.exists, timeout=10, what="the reserve file made again")
    free = os.statvfs(tiny_fs)
    assert free.f_bavail * free.f_frsize >= MiB


async def test_no_reserve_where_it_would_take_the_room_uploads_need(server, tiny_fs):
    alice = await start(server, tiny_fs, storage={"min_free_bytes": 3 * MiB,
                                                  "reserve_bytes": 3 * MiB},
                        gc={"sweep_interval_seconds": 0.2})
    await asyncio.sleep(0.6)   # three sweeps
    assert not (alice.data_dir / "reserve").exists()
    assert (await alice.put(os.urandom(MiB))).status == 201


def test_deletions_go_through_on_a_full_disk_with_workers(tmp_path, tiny_fs):
    """Either worker may meet the full disk; worker 0 keeps the reserve."""
    config = {"server": {"workers": 2}, "storage": {"min_free_bytes": 0, "reserve_bytes": MiB},
              "gc": {"sweep_interval_seconds": 0.2}}
    with BlobdServer(tmp_path / "srv", config, data_dir=tiny_fs / "data") as server:
        alice = server.token("alice")
        reserve = tiny_fs / "data" / "reserve"
        blobs = [os.urandom(256 << 10) for _ in range(8)]
        for data in blobs:
            assert http("POST", f"{server.url}/blobs", alice, data)[0] == 201
        wait_until(reserve.exists, "the reserve file")
        with sqlite3.connect(tiny_fs / "data" / "index.sqlite3") as conn:
            assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        filler = fill(tiny_fs)
        assert http("POST", f"{server.url}/blobs", alice, b"more")[0] == 507
        for data in blobs:
            assert http("DELETE", f"{server.url}/blobs/{b3(data)}", alice)[0] == 204
        # Given up for them; the log, not the file, says so: the room the
        # deletions freed may already have let worker 0 make it again.
        assert "gave up the reserve file" in server.stderr_path.read_text(), server.stderr_tail()
        filler.unlink()
        wait_until(reserve.exists, "the reserve file made again")




def test_reprobe_stops_at_a_full_disk_with_its_summary(tmp_path, tiny_fs):
    """Each update reprobe makes is a transaction of its own: a full disk
    stopped the run with a bare error and no summary; it must stop with
    the summary of what it did, say why it stopped, and leave each row old
    or new."""
    config = {"storage": {"fsync": False, "min_free_bytes": 0, "reserve_bytes": 0}}
    wav = (FIXTURES / "tone.wav").read_bytes()
    variants = [wav + i.to_bytes(2, "big") for i in range(40)]
    with BlobdServer(tmp_path / "srv", config, data_dir=tiny_fs / "data") as server:
        alice = server.token("alice")
        for data in variants:
            assert http("POST", f"{server.url}/blobs", alice, data)[0] == 201
    index_path = tiny_fs / "data" / "index.sqlite3"
    old = ("application/octet-stream", None)
    with sqlite3.connect(index_path) as conn:
        new = tuple(conn.execute("SELECT content_type, audio FROM blobs LIMIT 1").fetchone())
        conn.execute("UPDATE blobs SET content_type = ?, audio = ?", old)
    with sqlite3.connect(index_path) as conn:
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    # Room for the index log's first few updates, not for forty.
    filler = fill(tiny_fs)
    os.truncate(filler, filler.stat().st_size - 4 * 4096)

    result = server.cli("reprobe", "--no-progress")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    updated = len(lines) - 1
    assert 1 <= updated < 40 and all(line.startswith("updated ") for line in lines[:-1])
    assert lines[-1] == (
        f"reprobe: 40 blobs examined: {updated} updated, 0 unchanged, 0 not audio by their"
        " first bytes (not probed), 0 with their file missing, 0 unreadable")
    assert result.stderr == (
        "reprobe stopped: the disk is full (the index cannot grow);"
        f" {40 - updated} blobs due an update were not updated: free some room and run"
        " it again\n")
    with sqlite3.connect(index_path) as conn:
        states = [tuple(r) for r in conn.execute("SELECT content_type, audio FROM blobs")]
    assert states.count(new) == updated and states.count(old) == 40 - updated

    filler.unlink()
    assert server.cli("fsck").returncode == 0
    again = server.cli("reprobe", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert f"{40 - updated} updated, {updated} unchanged" in again.stdout


def test_commands_on_a_disk_already_full_say_so_and_exit(tmp_path, tiny_fs):
    """With the disk full before a command starts, SQLite cannot make the
    index's -shm file ("disk I/O error"): every command, serve included,
    printed a traceback and then hung for good, its half-opened index
    connection's thread keeping the process alive."""
    config = {"storage": {"fsync": False, "min_free_bytes": 0, "reserve_bytes": 0}}
    with BlobdServer(tmp_path / "srv", config, data_dir=tiny_fs / "data") as server:
        alice = server.token("alice")
        assert http("POST", f"{server.url}/blobs", alice, b"kept")[0] == 201
    filler = fill(tiny_fs)

    for command in (("fsck",), ("reprobe", "--no-progress"), ("serve",)):
        result = server.cli(*command, timeout=30)
        assert result.returncode == 1, (command, result.stderr)
        assert result.stderr == (
            f"blobd: error: the disk holding {tiny_fs / 'data'} is full: the index cannot"
            " be opened (disk I/O error); make room and try again\n"), command

    filler.unlink()
    result = server.cli("fsck")
    assert result.returncode == 0, result.stdout + result.stderr

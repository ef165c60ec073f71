"""The background scrub: a real server re-hashes its blob files, quarantines
the damaged ones (durably), heals them from a real SeaweedFS mirror, resumes
after a restart, holds its rate, shows its progress within a big blob,
counts the blobs left without a file as a state, and runs in one worker of
two."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Iterator


from blobd import fsck
from conftest import b3
from mirrorhelp import eventually, in_thread, mirror_section
from serverproc import BlobdServer, http

# Fast enough for a test: a pass every half second.
FAST = {"bytes_per_second": "8MiB", "period_seconds": 0.5}


def blob_path(data_dir: Path, digest: str) -> Path:
    return data_dir / "blobs" / digest[:2] / digest[2:4] / digest


def rot(path: Path) -> None:
    """Bit rot: bytes change in place, the size stays."""
    with open(path, "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))


async def scrub_stats(admin) -> dict:
    resp = await admin.request("GET", "/stats")
    assert resp.status == 200
    return (await resp.json())["scrub"]


async def damaged(admin, count: int) -> bool:
    return (await scrub_stats(admin))["damaged"] >= count


async def test_a_rotten_file_is_quarantined_and_a_put_restores_it(server):
    login = await server(scrub=FAST)
    alice, admin = await login("alice"), await login("root", "admin")
    good = [os.urandom(200_000) for _ in range(3)]
    for data in good:
        assert (await alice.put(data)).status == 201
    digest = b3(good[1])
    path = blob_path(alice.data_dir, digest)
    await in_thread(rot, path)
    rotten = path.read_bytes()

    await eventually(lambda: damaged(admin, 1), what="the scrub finding the damage")
    assert not path.exists()
    (aside,) = (alice.data_dir / "quarantine").iterdir()
    assert aside.name.startswith(f"{digest}.") and aside.read_bytes() == rotten
    # No mirror: the missing-file path, never the bad bytes.
    resp = await alice.request("GET", f"/blobs/{digest}")
    assert resp.status == 500
    assert "missing or damaged" in (await resp.json())["message"]
    for other in (good[0], good[2]):
        resp = await alice.request("GET", f"/blobs/{b3(other)}")
        assert resp.status == 200 and await resp.read() == other

    report = await fsck.run(alice.store.config)
    assert [(p.kind, p.subject) for p in report.remaining] == [("missing", digest)]
    (notice,) = [p for p in report.problems if p.kind == "quarantined"]
    assert notice.subject == f"quarantine/{aside.name}"
    # Nothing deletes quarantine/: fsck says what each file costs and when
    # it can go.
    assert notice.detail == (
        "moved out of the store (200000 bytes); its blob has no file: while fsck reports"
        " that blob missing this may be all that is left of its bytes, else delete it")

    # A PUT of the right bytes puts the file back.
    assert (await alice.put(good[1])).status == 200
    assert path.read_bytes() == good[1]
    resp = await alice.request("GET", f"/blobs/{digest}")
    assert resp.status == 200 and await resp.read() == good[1]
    report = await fsck.run(alice.store.config)
    assert report.ok and [p.kind for p in report.problems] == ["quarantined"]
    assert report.problems[0].detail == (
        "moved out of the store (200000 bytes); its blob has its file again: delete it")

    figures = await scrub_stats(admin)
    assert figures["enabled"] and figures["damaged"] == 1
    assert figures["blobs_checked"] >= 3 and figures["bytes_checked"] >= 400_000
    assert figures["last_pass_ended"] is not None and not figures["continuous"]
    metrics = await (await admin.request("GET", "/metrics")).text()
    assert "blobd_scrub_damaged_total 1.0" in metrics
    assert "blobd_scrub_last_pass_end_timestamp_seconds " in metrics
    assert "blobd_scrub_bytes_total " in metrics and "blobd_scrub_blobs_total " in metrics


async def test_a_directory_or_symlink_in_place_of_a_blob_file_is_quarantined(server, tmp_path):
    """Neither is a blob file (as fsck sees them): both go to quarantine/
    and the pass goes on to the blobs after them. A directory cannot be
    linked aside: the scrub failed on it and retried the same blob forever."""
    login = await server(scrub=FAST)
    alice, admin = await login("alice"), await login("root", "admin")
    bodies = sorted((os.urandom(50_000) for _ in range(4)), key=b3)
    for data in bodies:
        assert (await alice.put(data)).status == 201
    as_dir, as_link = (blob_path(alice.data_dir, b3(bodies[i])) for i in (0, 1))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(bodies[1])  # the right bytes, but outside the store

    def replace() -> None:
        as_dir.unlink()
        as_dir.mkdir()
        as_link.unlink()
        as_link.symlink_to(elsewhere)
        rot(blob_path(alice.data_dir, b3(bodies[3])))
    await in_thread(replace)

    await eventually(lambda: damaged(admin, 3), what="the scrub past all three")
    assert not os.path.lexists(as_dir) and not os.path.lexists(as_link)
    aside = {p.name.split(".")[0]: p for p in (alice.data_dir / "quarantine").iterdir()}
    assert aside.keys() == {b3(bodies[i]) for i in (0, 1, 3)}
    assert aside[b3(bodies[0])].is_dir()
    assert aside[b3(bodies[1])].is_symlink() and elsewhere.read_bytes() == bodies[1]
    for data in bodies[:2]:
        assert (await alice.put(data)).status == 200
        resp = await alice.request("GET", f"/blobs/{b3(data)}")
        assert resp.status == 200 and await resp.read() == data


async def test_the_scrub_heals_a_rotten_file_from_the_mirror(server, s3server, bucket):
    mirror = mirror_section(s3server, bucket.prefix, backup_interval_seconds=0)
    login = await server(scrub=FAST, mirror=mirror)
    alice, admin = await login("alice"), await login("root", "admin")
    data = os.urandom(300_000)
    assert (await alice.put(data)).status == 201
    digest = b3(data)
    await eventually(lambda: in_thread(bucket.get, bucket.key(digest)), what="the copy")
    path = blob_path(alice.data_dir, digest)
    await in_thread(rot, path)

    await eventually(lambda: damaged(admin, 1), what="the scrub finding the damage")
    await eventually(lambda: path.exists() and path.read_bytes() == data, what="the heal")
    (aside,) = (alice.data_dir / "quarantine").iterdir()
    assert aside.name.startswith(f"{digest}.") and aside.read_bytes() != data
    resp = await alice.request("GET", f"/blobs/{digest}")
    assert resp.status == 200 and await resp.read() == data


def stats(server: BlobdServer, token: str) -> dict:
    status, body = http("GET", f"{server.url}/stats", token)
    assert status == 200, body
    return json.loads(body)["scrub"]


def wait_for(what: str, check, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def stored(tmp_path: Path, bodies: list[bytes], **config: dict) -> BlobdServer:
    """A store holding ``bodies``, made with the scrub off; returned stopped."""
    server = BlobdServer(tmp_path, {**config, "scrub": {"bytes_per_second": 0}})
    with server:
        token = server.token()
        for body in bodies:
            assert http("PUT", f"{server.url}/blobs/{b3(body)}", token, body)[0] == 201
    return server


@contextlib.contextmanager
def running(server: BlobdServer) -> Iterator[BlobdServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


def meta(data_dir: Path) -> dict[str, str]:
    with sqlite3.connect(data_dir / "index.sqlite3") as conn:
        return dict(conn.execute("SELECT name, value FROM meta"))


RATE = 128 << 10


def test_progress_survives_a_restart_and_the_rate_holds(tmp_path: Path) -> None:
    bodies = [os.urandom(64 << 10) for _ in range(8)]   # 4 s at RATE
    server = stored(tmp_path, bodies)
    server.config["scrub"] = {"bytes_per_second": RATE, "period_seconds": 3600}
    with running(server):
        admin = server.token("root", "admin")
        wait_for("a few blobs checked", lambda: stats(server, admin)["blobs_checked"] >= 3)
        assert stats(server, admin)["pass_started"] is not None
    cursor = meta(server.data_dir)["scrub_cursor"]
    assert cursor in {b3(body) for body in bodies}
    with running(server):
        before, started = stats(server, admin)["bytes_checked"], time.monotonic()
        time.sleep(2)
        window = time.monotonic() - started
        read = stats(server, admin)["bytes_checked"] - before
        assert read <= RATE * window * 2 + (64 << 10), (read, window)
        done = wait_for("the pass to end", lambda: (s := stats(server, admin))[
            "last_pass_ended"] and s)
        # Resumed, not started over: each blob checked once in all (the
        # one cut short by the stop is read again, its bytes counted again).
        assert done["blobs_checked"] == len(bodies)
        assert sum(map(len, bodies)) <= done["bytes_checked"] <= sum(map(len, bodies)) + (64 << 10)
        assert "scrub: pass resumed after blob" in server.stderr_tail(100)
    assert "scrub_cursor" not in meta(server.data_dir)


def test_only_one_of_two_workers_scrubs(tmp_path: Path) -> None:
    bodies = [os.urandom(50_000) for _ in range(5)]
    server = stored(tmp_path, bodies)
    gone = b3(bodies[2])
    blob_path(server.data_dir, gone).unlink()
    server.config.update(server={"workers": 2},
                         scrub={"bytes_per_second": "1MiB", "period_seconds": 3600})
    with running(server):
        admin = server.token("root", "admin")
        done = wait_for("the pass to end", lambda: (s := stats(server, admin))[
            "last_pass_ended"] and s)
        time.sleep(1.5)  # a second scrubber would have saved its figures by now
        assert stats(server, admin)["blobs_checked"] == len(bodies) == done["blobs_checked"]
        assert server.stderr_tail(200).count("scrub: pass started") == 1
        assert server.stderr_tail(200).count(f"scrub: blob {gone} has no file") == 1
        # Each request may land on either worker: all answer alike.
        for _ in range(6):
            assert stats(server, admin)["missing"] == 1
            status, body = http("GET", f"{server.url}/metrics", admin)
            assert status == 200 and b"\nblobd_scrub_missing_files 1.0\n" in body


def test_a_blob_deleted_while_scrubbed_is_not_quarantined(tmp_path: Path) -> None:
    body = os.urandom(1 << 20)   # 4 s at 256 KiB/s
    digest = b3(body)
    server = stored(tmp_path, [body])
    rot(blob_path(server.data_dir, digest))   # would be found damaged
    server.config["scrub"] = {"bytes_per_second": "256KiB", "period_seconds": 3600}
    with running(server):
        admin, token = server.token("root", "admin"), server.token()
        wait_for("the pass to start", lambda: stats(server, admin)["pass_started"])
        time.sleep(0.5)
        assert http("DELETE", f"{server.url}/blobs/{digest}", token)[0] == 204
        done = wait_for("the pass to end", lambda: (s := stats(server, admin))[
            "last_pass_ended"] and s)
        assert done["damaged"] == 0
        assert "scrub: blob" not in server.stderr_tail(200)
    assert not (server.data_dir / "quarantine").exists()


def test_a_tiny_period_rests_between_passes(tmp_path: Path) -> None:
    """A pass over a tiny store ends at once; with a tiny period the next
    began at once too: a thousand passes a second, two index writes each."""
    server = stored(tmp_path, [b"one small blob"])
    server.config["scrub"] = {"bytes_per_second": "16MiB", "period_seconds": 0.001}
    with running(server):
        time.sleep(3)
        ended = server.stderr_tail(10_000).count("scrub: pass ended")
    assert 2 <= ended <= 4, ended


def test_a_blob_left_without_its_file_is_a_figure_not_an_event(tmp_path: Path) -> None:
    """Without a mirror, a blob left without its file is found so again by
    every pass: it was counted (and logged) again each time, so an alert on
    the counter's increase fired every pass for ever. A damaged file leaves
    the tree, so it is counted once; the blobs left without a file are what
    the last pass found, logged once each and summed up by each pass."""
    bodies = [os.urandom(20_000) for _ in range(3)]
    server = stored(tmp_path, bodies)
    gone, rotten = b3(bodies[0]), b3(bodies[1])
    blob_path(server.data_dir, gone).unlink()
    rot(blob_path(server.data_dir, rotten))
    server.config["scrub"] = {"bytes_per_second": "1MiB", "period_seconds": 0.5}
    with running(server):
        admin, token = server.token("root", "admin"), server.token()
        wait_for("three passes", lambda: server.stderr_tail(1000).count(
            "scrub: pass ended; 2 blobs without a file") >= 3)
        figures = stats(server, admin)
        assert (figures["damaged"], figures["missing"]) == (1, 2)
        metrics = http("GET", f"{server.url}/metrics", admin)[1].decode()
        assert "\nblobd_scrub_damaged_total 1.0\n" in metrics
        assert "\nblobd_scrub_missing_files 2.0\n" in metrics
        text = server.cli("stats").stdout
        assert "1 moved to quarantine, 2 without a file at the last pass" in text, text
        log = server.stderr_tail(1000)
        assert log.count(f"scrub: blob {gone} has no file") == 1
        assert log.count(f"scrub: blob {rotten}: file content does not match") == 1
        for digest in (gone, rotten):
            assert log.count(f"scrub: blob {digest} cannot be served until a PUT") == 1

        # A blob given its file back leaves the figure at the next pass.
        assert http("PUT", f"{server.url}/blobs/{gone}", token, bodies[0])[0] == 200
        wait_for("the figure to fall", lambda: stats(server, admin)["missing"] == 1)
        assert stats(server, admin)["damaged"] == 1


def test_bytes_checked_moves_while_a_big_blob_is_read(tmp_path: Path) -> None:
    """A 2 GiB recording takes two minutes at 16 MiB/s: its bytes were
    counted only once it had all been read."""
    body = os.urandom(3 << 20)   # 3 s at 1 MiB/s, read 1 MiB at a time
    server = stored(tmp_path, [body])
    server.config["scrub"] = {"bytes_per_second": "1MiB", "period_seconds": 3600}
    with running(server):
        admin = server.token("root", "admin")
        seen = wait_for("bytes checked", lambda: (s := stats(server, admin))[
            "bytes_checked"] and s)
        assert seen["blobs_checked"] == 0 and 0 < seen["bytes_checked"] < len(body)
        done = wait_for("the pass to end", lambda: (s := stats(server, admin))[
            "last_pass_ended"] and s)
        assert (done["blobs_checked"], done["bytes_checked"]) == (1, len(body))


def test_a_move_to_quarantine_is_made_durable(tmp_path: Path) -> None:
    """A power cut cannot be staged: strace shows the directories the file
    left and entered fsynced after the move (else the next pass after a
    crash could find the file in the tree again, and count it again)."""
    body = os.urandom(50_000)
    digest = b3(body)
    server = stored(tmp_path, [body])
    data_dir = server.data_dir.resolve()
    (data_dir / "quarantine").mkdir()
    server.config["scrub"] = {"bytes_per_second": "8MiB", "period_seconds": 0.5}
    trace, said = tmp_path / "trace", tmp_path / "strace.err"
    with running(server), open(said, "wb") as err:
        admin = server.token("root", "admin")
        tracer = subprocess.Popen(
            ["strace", "-f", "-y", "-o", str(trace), "-p", str(server.pid),
             "-e", "trace=fsync,syncfs,link,linkat,unlink,unlinkat,rename,renameat,renameat2"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for("strace to attach", lambda: tracer.poll() is not None
                     or "attached" in said.read_text())
            assert tracer.poll() is None, f"strace cannot attach: {said.read_text()}"
            rot(blob_path(data_dir, digest))
            wait_for("the quarantine", lambda: stats(server, admin)["damaged"] == 1)
            time.sleep(0.5)
        finally:
            # strace detaches on SIGINT, and only then writes out all it saw.
            tracer.send_signal(signal.SIGINT)
            tracer.wait(15)
    lines = trace.read_text().splitlines()
    left = blob_path(data_dir, digest)
    (moved,) = [n for n, line in enumerate(lines) if "unlink" in line and f'"{left}"' in line]
    synced = {line.split("<", 1)[1].split(">", 1)[0] for line in lines[moved:]
              if " fsync(" in line and line.rstrip().endswith("= 0")}
    assert {str(data_dir / "quarantine"), str(left.parent)} <= synced, lines[moved:]

"""Large bodies read straight off the socket (blobd.sockbody, blobd.http.takeover):
the same contract as every other upload, and nothing left behind when they fail."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from blobd import sockbody
from blobd.errors import BlobdError
from blobd.bodywriter import DIRECT_ALIGN, BodyWriter
from blobd.files import digests_of
from blobd.http.takeover import MIN_SIZE
from blobd.sockbody import SocketBody, receive_into
from conftest import b3, blob_files, make_config, tmp_files
from rawhttp import RawConnection

BIG = os.urandom(MIN_SIZE + 123_457)  # not a multiple of any buffer or block


async def gone(data_dir: Path) -> None:
    """Wait (a little) for a failed upload's temp file to be removed."""
    for _ in range(100):
        if not tmp_files(data_dir):
            return
        await asyncio.sleep(0.02)
    assert tmp_files(data_dir) == []


async def nothing_stored(api) -> None:
    await gone(api.data_dir)
    assert blob_files(api.data_dir) == []
    row = await api.store.db.fetchone("SELECT (SELECT count(*) FROM blobs) b,"
                                      " (SELECT count(*) FROM refs) r")
    assert tuple(row) == (0, 0)


def sockbody_threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name in ("blobd-sockbody", "blobd-write", "blobd-hash")]


async def threads_gone() -> list[str]:
    """The receiver's threads still alive after a moment: a thread hands its
    outcome to the event loop as its last act, so it may still be exiting
    when the awaiting task has already ended (seen on a loaded machine)."""
    for _ in range(100):
        if not sockbody_threads():
            break
        await asyncio.sleep(0.02)
    return sockbody_threads()


# --- through the server ------------------------------------------------------


async def test_large_put_is_stored_and_the_connection_closes(alice):
    resp = await alice.put(BIG)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    digests = digests_of(BIG)
    assert (body["hash"], body["sha256"], body["size"]) == (
        digests.blake3, digests.sha256, len(BIG))
    # aiohttp never parsed the body: the connection cannot carry another request.
    assert resp.headers["Connection"].lower() == "close"
    got = await alice.request("GET", f"/blobs/{b3(BIG)}")
    assert got.status == 200 and await got.read() == BIG
    assert [p.name for p in blob_files(alice.data_dir)] == [b3(BIG)]
    assert tmp_files(alice.data_dir) == []
    again = await alice.put(BIG)
    assert again.status == 200 and (await again.json())["created"] is False


async def test_large_post_computes_the_address(alice):
    resp = await alice.request("POST", "/blobs", data=BIG)
    assert resp.status == 201
    body = await resp.json()
    assert body["hash"] == b3(BIG) and body["size"] == len(BIG)
    usage = await alice.store.db.fetchone(
        "SELECT used_bytes, monthly_upload_bytes FROM owners WHERE owner = 'alice'")
    assert tuple(usage) == (len(BIG), len(BIG))


async def test_large_digest_mismatch_leaves_nothing(alice):
    other = b3(b"something else")
    resp = await alice.put(BIG, address=other)
    assert resp.status == 400 and (await resp.json())["error"] == "digest_mismatch"
    assert resp.headers["Connection"].lower() == "close"
    await nothing_stored(alice)
    usage = await alice.store.db.fetchone(
        "SELECT monthly_upload_bytes FROM owners WHERE owner = 'alice'")
    assert usage is None or usage[0] == 0


async def test_client_hanging_up_mid_body_leaves_nothing(alice):
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    await conn.send_head("PUT", f"/blobs/{b3(BIG)}", alice.headers({
        "Content-Length": str(len(BIG))}))
    await conn.send(BIG[: 3 << 20])
    await asyncio.sleep(0.2)  # the receiver is reading by now
    await conn.close()
    await nothing_stored(alice)
    assert await threads_gone() == []
    assert (await alice.put(BIG)).status == 201


async def test_quiet_clients_do_not_hold_the_buffers(alice):
    """More stalled large uploads than the process has buffers: each sent
    a little and went quiet. Another large upload still goes through."""
    quiet = []
    for i in range(sockbody.POOL_BUFFERS + 2):
        conn = await RawConnection.open(alice.client.host, alice.client.port)
        await conn.send_head("PUT", f"/blobs/{b3(BIG)}", alice.headers({
            "Content-Length": str(len(BIG))}))
        await conn.send(BIG[: 3 * DIRECT_ALIGN + 100 * i])  # odd sizes: a carried tail
        quiet.append(conn)
    await asyncio.sleep(0.3)
    other = os.urandom(MIN_SIZE + 1)
    resp = await asyncio.wait_for(alice.put(other), 20)
    assert resp.status == 201
    # The quiet ones were not harmed either: one finishes its body now.
    await quiet[-1].send(BIG[3 * DIRECT_ALIGN + 100 * (len(quiet) - 1):])
    done = await quiet[-1].read_response(timeout=20)
    assert done.status == 201 and done.json()["hash"] == b3(BIG)
    for conn in quiet:
        await conn.close()
    await gone(alice.data_dir)
    assert sorted(p.name for p in blob_files(alice.data_dir)) == sorted([b3(BIG), b3(other)])


async def test_beyond_max_bodies_uploads_go_through_aiohttp(alice):
    """Stalled large uploads hold the process's MAX_BODIES slots (three
    threads each); one more is received by aiohttp instead, and the slots
    come back when the stalled ones end."""
    async def receivers(count: int) -> None:
        for _ in range(300):
            if sockbody_threads().count("blobd-sockbody") == count:
                return
            await asyncio.sleep(0.02)
        assert sockbody_threads().count("blobd-sockbody") == count
    stalled = []
    for _ in range(sockbody.MAX_BODIES):
        conn = await RawConnection.open(alice.client.host, alice.client.port)
        await conn.send_head("PUT", f"/blobs/{b3(BIG)}", alice.headers({
            "Content-Length": str(len(BIG))}))
        await conn.send(BIG[:1000])
        stalled.append(conn)
    await receivers(sockbody.MAX_BODIES)
    resp = await asyncio.wait_for(alice.put(BIG), 30)
    assert resp.status == 201
    assert resp.headers.get("Connection", "").lower() != "close"  # aiohttp's
    for conn in stalled:
        await conn.close()
    await receivers(0)
    other = os.urandom(MIN_SIZE + 5)
    resp = await alice.put(other)
    assert resp.status == 201 and resp.headers["Connection"].lower() == "close"
    await gone(alice.data_dir)


async def test_a_pipelined_request_after_the_body_is_not_misread(alice):
    """The next request's bytes are never taken for body bytes, nor run."""
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    await conn.send_head("PUT", f"/blobs/{b3(BIG)}", alice.headers({
        "Content-Length": str(len(BIG))}))
    await conn.send(BIG + f"DELETE /blobs/{b3(BIG)} HTTP/1.1\r\nHost: test\r\n"
                          f"Authorization: Bearer {alice.token}\r\n\r\n".encode())
    try:
        final = await conn.read_response(timeout=30)
        assert final.status == 201
        assert final.headers["connection"].lower() == "close"
    except ConnectionResetError:
        # Closing with the unread request queued may reset the connection
        # before the answer is read: clients must not pipeline after a PUT
        # (RFC 9112 9.3.2) and none does.
        pass
    await conn.close()
    got = await alice.request("GET", f"/blobs/{b3(BIG)}")
    assert got.status == 200 and await got.read() == BIG


async def test_chunked_large_body_goes_through_aiohttp(alice):
    async def chunks():
        for i in range(0, len(BIG), 1 << 20):
            yield BIG[i:i + (1 << 20)]
    resp = await alice.request("PUT", f"/blobs/{b3(BIG)}", data=chunks())
    assert resp.status == 201
    assert resp.headers.get("Connection", "").lower() != "close"


async def test_too_large_is_refused_before_the_body(server):
    login = await server(limits={"max_blob_size": MIN_SIZE})
    alice = await login("alice")
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    await conn.send_head("PUT", f"/blobs/{b3(BIG)}", alice.headers({
        "Content-Length": str(len(BIG))}))
    resp = await conn.read_response()  # no byte of the body was sent
    await conn.close()
    assert resp.status == 413 and resp.json()["error"] == "too_large"


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 16 MiB tmpfs (which refuses O_DIRECT: the fallback is used)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs",
                             str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"mount -t tmpfs failed: {result.stderr.strip()} (run as root, as CI does)")
    yield mountpoint
    if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


async def test_disk_filling_up_mid_body_is_507_and_leaves_nothing(server, small_fs):
    """Two 9 MiB uploads both pass the free-space check of their
    Content-Length; only one fits. The second, sent once the first is
    stored, fails while writing, and its client reads the 507."""
    login = await server(make_config(small_fs, storage={"min_free_bytes": 0}))
    alice = await login("alice")
    bodies = [os.urandom(9 << 20), os.urandom(9 << 20)]
    conns = []
    for body in bodies:
        conn = await RawConnection.open(alice.client.host, alice.client.port)
        await conn.send_head("PUT", f"/blobs/{b3(body)}", alice.headers({
            "Content-Length": str(len(body))}))
        conns.append(conn)
    for _ in range(200):  # both bodies taken: two temp files exist
        if len(tmp_files(alice.data_dir)) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(tmp_files(alice.data_dir)) == 2

    async def send(conn: RawConnection, body: bytes):
        try:
            await conn.send(body)
        except ConnectionError:
            pass  # answered (507) and closed before the whole body was sent
        return await conn.read_response(timeout=30)
    answers = [await send(c, b) for c, b in zip(conns, bodies)]
    for conn in conns:
        await conn.close()
    assert [a.status for a in answers] == [201, 507], answers
    assert answers[1].json()["error"] == "insufficient_storage"
    stored = bodies[0]
    await gone(alice.data_dir)
    assert [p.name for p in blob_files(alice.data_dir)] == [b3(stored)]
    usage = await alice.store.db.fetchone(
        "SELECT used_bytes, used_blobs FROM owners WHERE owner = 'alice'")
    assert tuple(usage) == (len(stored), 1)


# --- the receiver on its own, over a socket pair --------------------------------


def pair_body(head: bytes, length: int) -> tuple[SocketBody, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    body = SocketBody(os.dup(ours.fileno()), head, length)
    ours.close()
    return body, theirs


async def test_head_longer_than_a_buffer_and_odd_sizes(tmp_path: Path):
    data = os.urandom(2 * sockbody.BUFFER_SIZE + 3 * DIRECT_ALIGN + 17)
    split = sockbody.BUFFER_SIZE + 5  # aiohttp had more than a buffer already
    body, theirs = pair_body(data[:split], len(data))
    sender = threading.Thread(target=theirs.sendall, args=(data[split:],))
    sender.start()
    writer = BodyWriter(tmp_path / "out", direct=True)
    await receive_into(body, writer)
    sender.join()
    theirs.close()
    assert writer.finish(fsync=True) == digests_of(data)
    assert (tmp_path / "out").read_bytes() == data
    assert body.fd == -1  # closed once received
    assert sockbody._POOL._made == 0  # buffers freed when no upload uses them


async def test_early_end_is_a_clear_error(tmp_path: Path):
    body, theirs = pair_body(b"", 10 << 20)
    theirs.sendall(b"x" * 5000)
    theirs.close()
    writer = BodyWriter(tmp_path / "out", direct=True)
    with pytest.raises(BlobdError) as err:
        await receive_into(body, writer)
    assert err.value.code == "bad_request"
    assert "body ended after 5000 of 10485760 bytes" in str(err.value)
    writer.discard()
    assert not (tmp_path / "out").exists()


async def test_cancelled_while_the_client_is_silent(tmp_path: Path):
    body, theirs = pair_body(b"abc", 10 << 20)
    theirs.sendall(b"d" * 100_000)
    writer = BodyWriter(tmp_path / "out", direct=True)
    task = asyncio.ensure_future(receive_into(body, writer))
    await asyncio.sleep(0.3)
    assert sockbody_threads(), "the receiver should be waiting for more"
    task.cancel()
    # The threads notice within POLL_SECONDS; the task ends only after them.
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert await threads_gone() == []
    assert body.fd == -1
    theirs.close()
    writer.discard()
    assert not (tmp_path / "out").exists()


def test_direct_writer_takes_unaligned_pieces_too(tmp_path: Path):
    """Pieces O_DIRECT cannot take (a bytes object anywhere in memory, odd
    lengths) are written the ordinary way: the file is still right."""
    pieces = [os.urandom(DIRECT_ALIGN * 3), os.urandom(1000), os.urandom(DIRECT_ALIGN)]
    writer = BodyWriter(tmp_path / "out", direct=True)
    for piece in pieces:
        writer.write(piece)
    whole = b"".join(pieces)
    assert writer.finish(fsync=True) == digests_of(whole)
    assert (tmp_path / "out").read_bytes() == whole

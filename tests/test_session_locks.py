"""What holds an upload session's file lock (bytes arriving, a completion)
keeps the session alive and whole: the expiry sweeper and an abort wait for
it. Found by review: an upload whose expiry passed while a PATCH was still
streaming was swept away mid-body (the PATCH got 409, the upload 404, every
byte of it lost), and a DELETE during a completion made it a 500."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time

import pytest

from blobd.sessions import sweep_sessions
from conftest import Api, b3
from test_tus import STREAM, TUS, create as tus_create, head, raw_patch
from test_uploads import CHUNK, create as native_create, payload, send

TTL = {"uploads": {"session_ttl_seconds": 1}}


async def test_an_expired_tus_upload_receiving_bytes_is_not_swept(server) -> None:
    alice = await (await server(**TTL))("alice")
    data = payload(50_000)
    url = await tus_create(alice, len(data))
    conn = await raw_patch(alice, url, 0, len(data))
    try:
        await conn.send(data[:20_000])
        await asyncio.sleep(0.2)
        assert await sweep_sessions(alice.store, now=time.time() + 3600) == 0
        await conn.send(data[20_000:])
        answer = await conn.read_response()
    finally:
        await conn.close()
    assert answer.status == 204, answer.body
    assert answer.headers["blob-hash"] == b3(data)


async def test_an_expired_native_session_receiving_a_chunk_is_not_swept(server) -> None:
    alice = await (await server(**TTL))("alice")
    data = payload(3 * CHUNK)
    session = await native_create(alice, data)
    for idx in (0, 1):
        await send(alice, session, idx, data[idx * CHUNK:(idx + 1) * CHUNK])
    conn = await raw_put(alice, f"/uploads/{session['id']}/2", CHUNK)
    try:
        await conn.send(data[2 * CHUNK:2 * CHUNK + 300])
        await asyncio.sleep(0.2)
        assert await sweep_sessions(alice.store, now=time.time() + 3600) == 0
        await conn.send(data[2 * CHUNK + 300:])
        assert (await conn.read_response()).status == 204
    finally:
        await conn.close()
    done = await alice.request("POST", f"/uploads/{session['id']}/complete")
    assert done.status == 201, await done.text()
    assert (await done.json())["hash"] == b3(data)


async def test_a_session_resumed_near_its_expiry_is_given_its_time_again(server) -> None:
    alice = await (await server(uploads={"session_ttl_seconds": 4}))("alice")
    data = payload(30_000)
    url = await tus_create(alice, len(data))
    await asyncio.sleep(2.5)
    conn = await raw_patch(alice, url, 0, len(data))
    try:
        await conn.send(data[:1000])
        await asyncio.sleep(0.3)
        # Taken up with under half its time left: its expiry moved back.
        expires = (await head(alice, url)).headers["Upload-Expires"]
        assert expires
        await asyncio.sleep(2)
        assert (await head(alice, url)).status == 200
        await conn.send(data[1000:])
        assert (await conn.read_response()).status == 204
    finally:
        await conn.close()


async def raw_put(api: Api, path: str, length: int):
    from rawhttp import RawConnection
    conn = await RawConnection.open(api.client.host, api.client.port)
    await conn.send_head("PUT", path, {**api.headers(), "Content-Length": str(length)})
    return conn


def locked(api: Api, session_id: str) -> int:
    """Hold a session file's lock as a completion does while it hashes."""
    fd = os.open(api.data_dir / "uploads" / session_id, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


async def test_an_abort_waits_for_the_request_at_work(alice: Api) -> None:
    data = payload(2 * CHUNK)
    session = await native_create(alice, data)
    url = await tus_create(alice, 100)
    fds = [locked(alice, session["id"]), locked(alice, url.rsplit("/", 1)[1])]
    try:
        # Each abort waits out KNOCK_WAIT for its holder: the two wait at once.
        busy, tus_busy = await asyncio.gather(
            alice.request("DELETE", f"/uploads/{session['id']}"),
            alice.request("DELETE", url, headers={"Tus-Resumable": "1.0.0"}))
        assert busy.status == 409 and busy.headers["Retry-After"] == "1"
        assert tus_busy.status == 423
    finally:
        for fd in fds:
            os.close(fd)
    assert (await alice.request("DELETE", f"/uploads/{session['id']}")).status == 204
    assert (await alice.request("GET", f"/uploads/{session['id']}")).status == 404


async def test_completion_and_abort_at_once_never_500(alice: Api) -> None:
    data = payload(8 << 20)
    for _ in range(3):
        session = await native_create(alice, data, chunk_size=1 << 20)
        for idx in range(8):
            await send(alice, session, idx, data[idx << 20:(idx + 1) << 20])
        done, gone = await asyncio.gather(
            alice.request("POST", f"/uploads/{session['id']}/complete"),
            alice.request("DELETE", f"/uploads/{session['id']}"))
        assert {done.status, gone.status} <= {201, 204, 404, 409}, (
            done.status, await done.text(), gone.status, await gone.text())
        if done.status == 201:
            assert (await alice.request("DELETE", f"/blobs/{b3(data)}")).status == 204


async def first_answer(api: Api, method: str, path: str, headers: dict) -> int:
    from rawhttp import RawConnection
    conn = await RawConnection.open(api.client.host, api.client.port)
    try:
        await conn.send_head(method, path, {**api.headers(), "Expect": "100-continue",
                                            **headers})
        return (await conn.read_response(timeout=10)).status
    finally:
        await conn.close()


async def test_a_busy_upload_never_invites_the_body(alice: Api) -> None:
    """Found by review: 100 Continue went out before the chunk's (or the
    tus upload's) lock was tried, so the whole body was sent, then refused
    as busy."""
    data = payload(2 * CHUNK)
    session = await native_create(alice, data)
    url = await tus_create(alice, 100)
    fds = [locked(alice, session["id"]), locked(alice, url.rsplit("/", 1)[1])]
    try:
        assert await first_answer(alice, "PUT", f"/uploads/{session['id']}/0",
                                  {"Content-Length": str(CHUNK)}) == 409
        assert await first_answer(alice, "PATCH", url, {
            "Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": "0", "Content-Length": "100"}) == 423
    finally:
        for fd in fds:
            os.close(fd)
    assert await first_answer(alice, "PUT", f"/uploads/{session['id']}/0",
                              {"Content-Length": str(CHUNK)}) == 100


async def test_an_abort_stops_chunks_being_received(alice: Api) -> None:
    data = payload(2 * CHUNK)
    session = await native_create(alice, data)
    conn = await raw_put(alice, f"/uploads/{session['id']}/0", CHUNK)
    try:
        await conn.send(data[:300])
        await asyncio.sleep(0.3)
        started = time.monotonic()
        gone = await alice.request("DELETE", f"/uploads/{session['id']}")
        assert gone.status == 204 and time.monotonic() - started < 3
        assert (await conn.read_response()).status == 409
    finally:
        await conn.close()
    assert os.listdir(alice.data_dir / "uploads") == []
    assert (await (await alice.request("GET", "/quota")).json())["reserved_bytes"] == 0


# Found by review: a holder receiving a steady trickle (pieces under the
# knock poll apart) never looked for a knock.

async def trickle(conn, data: bytes, piece: int, every: float, stop: asyncio.Event) -> None:
    for i in range(0, len(data), piece):
        if stop.is_set():
            return
        try:
            await conn.send(data[i:i + piece])
        except Exception:
            return
        await asyncio.sleep(every)


async def test_a_delete_stops_a_trickling_tus_patch(alice: Api) -> None:
    data = payload(200_000)
    url = await tus_create(alice, len(data))
    conn = await raw_patch(alice, url, 0, len(data))
    stop = asyncio.Event()
    feeder = asyncio.create_task(trickle(conn, data, 500, 0.1, stop))  # 5 kB/s
    try:
        await asyncio.sleep(0.5)  # the PATCH holds the upload, bytes keep coming
        started = time.monotonic()
        gone = await alice.request("DELETE", url, headers=TUS)
        took = time.monotonic() - started
        # Expected (commit f56b49d: "a DELETE stops bytes arriving the same way"): 204.
        assert gone.status == 204, (gone.status, await gone.text(), took)
    finally:
        stop.set()
        await feeder
        await conn.close()


async def test_a_new_patch_takes_over_a_trickling_one(alice: Api) -> None:
    data = payload(200_000)
    url = await tus_create(alice, len(data))
    conn = await raw_patch(alice, url, 0, len(data))
    stop = asyncio.Event()
    feeder = asyncio.create_task(trickle(conn, data, 500, 0.1, stop))
    try:
        await asyncio.sleep(0.5)
        second = await alice.request("PATCH", url, data=b"", headers={
            **TUS, **STREAM, "Upload-Offset": "0"})
        # Expected: the old request lets go (409 stale offset / 204); observed 423 after 3 s.
        assert second.status != 423, await second.text()
    finally:
        stop.set()
        await feeder
        await conn.close()


async def test_a_new_copy_of_a_chunk_takes_over_a_trickling_one(alice: Api) -> None:
    data = payload(200_000)
    session = await native_create(alice, data, chunk_size=100_000)
    conn = await raw_put(alice, f"/uploads/{session['id']}/0", 100_000)
    stop = asyncio.Event()
    feeder = asyncio.create_task(trickle(conn, data[:100_000], 500, 0.1, stop))
    try:
        await asyncio.sleep(0.5)
        again = await alice.request("PUT", f"/uploads/{session['id']}/0",
                                    data=data[:100_000])
        assert again.status == 204, (again.status, await again.text())
    finally:
        stop.set()
        await feeder
        await conn.close()


async def test_a_sweep_that_fails_midway_leaves_no_session_locked(alice: Api) -> None:
    """Found by review: a file the sweeper could not open (here a directory
    in a session file's place) left the locks it had taken already in
    place, so those sessions refused every request until a restart."""
    urls = [await tus_create(alice, 100) for _ in range(3)]
    ids = sorted(u.rsplit("/", 1)[1] for u in urls)
    uploads = alice.data_dir / "uploads"
    (uploads / ids[1]).unlink()
    (uploads / ids[1]).mkdir()
    with pytest.raises(IsADirectoryError):
        await sweep_sessions(alice.store, now=time.time() + 7 * 86400)
    fd = os.open(uploads / ids[0], os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # nobody holds it
    finally:
        os.close(fd)
    done = await alice.request("PATCH", f"/tus/{ids[0]}", data=b"x" * 100, headers={
        "Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream",
        "Upload-Offset": "0"})
    assert done.status == 204, await done.text()

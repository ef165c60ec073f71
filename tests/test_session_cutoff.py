"""Upload-session requests cut off by a shutdown (the drain's deadline
cancels every handler still running) while their transaction waits for the
index's write lock: the session is made whole or not at all, and what was
acknowledged before is never lost. Found by review: the transaction
committed, then its file was removed as if it had failed."""

from __future__ import annotations

import asyncio
import contextlib
import os

from blobd.http.inflight import IN_FLIGHT
from conftest import Api, b3
from test_tus import STREAM, TUS, create as tus_create, patch, wrong_checksum
from test_uploads import payload


@contextlib.asynccontextmanager
async def write_lock_held(api: Api):
    """Hold the index's write transaction, as a long commit of another
    request (or another worker) would, until the block ends."""
    held, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with api.store.write():
            held.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await held.wait()
    try:
        yield
    finally:
        release.set()
        await holder


async def cut_off(api: Api, method: str, path: str, **kwargs) -> None:
    """Send a request while the write lock is held, cancel its handler as
    the shutdown's deadline does, then let the lock go and wait until the
    handler's shielded work is over."""
    in_flight = api.client.app[IN_FLIGHT]
    async with write_lock_held(api):
        request = asyncio.create_task(api.request(method, path, **kwargs))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if in_flight.count:
                break
        await asyncio.sleep(0.1)
        assert in_flight.cancel_all() == 1
    with contextlib.suppress(Exception):
        await request
    assert await in_flight.wait_idle(10)


async def rows(api: Api) -> list:
    async with api.store.db.reader.execute(
            "SELECT id, size, upload_offset, reserved_bytes, result_hash FROM uploads") as cur:
        return [tuple(r) for r in await cur.fetchall()]


async def reserved(api: Api) -> int:
    return (await (await api.request("GET", "/quota")).json())["reserved_bytes"]


async def test_a_session_created_as_the_server_stops_is_not_kept(alice: Api) -> None:
    await cut_off(alice, "POST", "/uploads", json={"size": 1_000_000})
    # Its client never learned its id: nothing stays made or reserved.
    assert await rows(alice) == []
    assert await reserved(alice) == 0
    assert os.listdir(alice.data_dir / "uploads") == []


async def test_a_tus_creation_cut_off_is_not_kept(alice: Api) -> None:
    await cut_off(alice, "POST", "/tus/", headers={**TUS, "Upload-Length": "5000"})
    assert await rows(alice) == []
    assert await reserved(alice) == 0
    assert os.listdir(alice.data_dir / "uploads") == []


async def test_a_concatenation_cut_off_keeps_the_parts_bytes(alice: Api) -> None:
    data = payload(3000)
    parts = []
    for piece in (data[:1000], data[1000:]):
        url = await tus_create(alice, len(piece), headers={"Upload-Concat": "partial"})
        await patch(alice, url, 0, piece)
        parts.append(url)
    await cut_off(alice, "POST", "/tus/",
                  headers={**TUS, "Upload-Concat": "final;" + " ".join(parts)})
    # Either the parts are still there, or the final upload holds their bytes.
    left = await rows(alice)
    files = {name: (alice.data_dir / "uploads" / name).read_bytes()
             for name in os.listdir(alice.data_dir / "uploads")}
    assert sorted(files) == sorted(r[0] for r in left)
    if len(left) == 1:
        assert next(iter(files.values())) == data
        assert await reserved(alice) == len(data)
    else:
        assert sorted(files.values(), key=len) == sorted([data[:1000], data[1000:]], key=len)


async def test_a_deferred_length_set_as_the_server_stops_still_cuts_the_file(
        alice: Api) -> None:
    data = payload(500)
    url = await tus_create(alice, None, headers={"Upload-Defer-Length": "1"})
    # Refused for its checksum (its 1,000 bytes were written, then cut off).
    await patch(alice, url, 0, b"J" * 1000, status=460, headers=wrong_checksum())
    await cut_off(alice, "PATCH", url, data=b"", headers={
        **TUS, **STREAM, "Upload-Offset": "0", "Upload-Length": "500"})
    upload_id = url.rsplit("/", 1)[1]
    (row,) = await rows(alice)
    if row[1] == 500:   # the length was set: the file was cut with it
        assert (alice.data_dir / "uploads" / upload_id).stat().st_size == 500
    resp = await patch(alice, url, 0, data, headers={"Upload-Length": "500"}
                       if row[1] is None else None)
    assert resp.headers["Blob-Hash"] == b3(data)


async def test_a_length_set_by_a_crash_cut_transaction_is_healed_at_commit(
        alice: Api) -> None:
    """A kill -9 between the transaction that sets a deferred length and
    the cut of the file leaves the file longer than the upload; its
    commit cuts it (the state is made here as the crash leaves it)."""
    data = payload(500)
    url = await tus_create(alice, None, headers={"Upload-Defer-Length": "1"})
    upload_id = url.rsplit("/", 1)[1]
    # Bytes past the offset, as a PATCH killed while receiving leaves them
    # (a refused one cuts its bytes off itself).
    with open(alice.data_dir / "uploads" / upload_id, "ab") as file:
        file.write(b"J" * 1000)
    async with alice.store.write() as tx:
        await tx.conn.execute("UPDATE uploads SET size = 500 WHERE id = ?", (upload_id,))
    assert (alice.data_dir / "uploads" / upload_id).stat().st_size == 1000
    resp = await patch(alice, url, 0, data)
    assert resp.headers["Blob-Hash"] == b3(data)
    assert await (await alice.request("GET", f"/blobs/{b3(data)}")).read() == data

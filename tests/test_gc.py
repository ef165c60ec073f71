"""Reference counting at zero: aggressive deletion, grace, and the race."""

from __future__ import annotations

import asyncio
import os
import time

from blobd import reaper
from conftest import b3, blob_files
from rawhttp import RawConnection


async def test_grace_keeps_the_file_and_a_put_revives_it(server):
    login = await server(gc={"grace_seconds": 3600})
    alice = await login("alice")
    data = os.urandom(5000)
    await alice.put(data)
    assert (await alice.request("DELETE", f"/blobs/{b3(data)}")).status == 204
    assert (await alice.request("GET", f"/blobs/{b3(data)}")).status == 404
    assert len(blob_files(alice.data_dir)) == 1
    # PUT with Expect during grace: answered at once, no body sent.
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    await conn.send_head("PUT", f"/blobs/{b3(data)}", alice.headers({
        "Content-Length": str(len(data)), "Expect": "100-continue"}))
    resp = await conn.read_response()
    await conn.close()
    assert resp.status == 200 and resp.json()["created"] is False
    assert (await alice.request("GET", f"/blobs/{b3(data)}")).status == 200
    assert await reaper.sweep(alice.store, now=time.time() + 7200) == 0
    assert len(blob_files(alice.data_dir)) == 1


async def test_sweep_deletes_after_grace(server):
    login = await server(gc={"grace_seconds": 60})
    alice = await login("alice")
    await alice.put(b"short-lived")
    await alice.request("DELETE", f"/blobs/{b3(b'short-lived')}")
    assert await reaper.sweep(alice.store) == 0
    assert await reaper.sweep(alice.store, now=time.time() + 61) == 1
    assert blob_files(alice.data_dir) == []
    row = await alice.store.db.fetchone("SELECT count(*) n FROM blobs")
    assert row["n"] == 0


async def test_background_sweeper_runs(server):
    login = await server(gc={"grace_seconds": 1, "sweep_interval_seconds": 1})
    alice = await login("alice")
    await alice.put(b"gone soon")
    await alice.request("DELETE", f"/blobs/{b3(b'gone soon')}")
    for _ in range(60):
        await asyncio.sleep(0.1)
        if not blob_files(alice.data_dir):
            break
    assert blob_files(alice.data_dir) == []


async def _race_once(alice, bob, data: bytes, expect: bool) -> None:
    digest = b3(data)
    assert (await bob.put(data)).status == 201
    headers = {"Expect": "100-continue"} if expect else {}
    put, delete = await asyncio.gather(alice.put(data, headers=headers),
                                       bob.request("DELETE", f"/blobs/{digest}"))
    assert delete.status == 204
    assert put.status in (200, 201)
    # Alice was answered 200/201: she holds a reference, so the blob exists.
    get = await alice.request("GET", f"/blobs/{digest}")
    assert get.status == 200, f"PUT said {put.status} but GET says {get.status}"
    assert await get.read() == data
    meta = await (await alice.request("GET", f"/blobs/{digest}/meta")).json()
    assert meta["refcount"] == 1
    assert (await alice.request("DELETE", f"/blobs/{digest}")).status == 204


async def test_put_racing_delete_of_the_last_reference(server):
    login = await server(storage={"fsync": False})
    alice, bob = await login("alice"), await login("bob")
    for i in range(150):
        await _race_once(alice, bob, os.urandom(2000 + i), expect=bool(i % 2))
    # Many concurrent pairs at once, too.
    datas = [os.urandom(3000) for _ in range(100)]
    await asyncio.gather(*(_race_once(alice, bob, d, expect=True) for d in datas))
    assert blob_files(alice.data_dir) == []
    rows = await alice.store.db.fetchone("SELECT count(*) n FROM blobs")
    assert rows["n"] == 0

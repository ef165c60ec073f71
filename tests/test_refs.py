"""The References section of API.md."""

from __future__ import annotations

import asyncio

import pytest

from conftest import b3, blob_files


async def test_put_get_list_delete_ref(alice):
    await alice.put(b"one")
    resp = await alice.request("PUT", "/refs/songs:one.mp3", json={"hash": b3(b"one")})
    assert resp.status == 200
    body = await resp.json()
    assert body["name"] == "songs:one.mp3" and body["hash"] == b3(b"one")
    assert body["size"] == 3 and body["created_at"].endswith("Z")
    assert (await (await alice.request("GET", "/refs/songs:one.mp3")).json()) == body
    meta = await (await alice.request("GET", f"/blobs/{b3(b'one')}/meta")).json()
    assert meta["refcount"] == 2
    assert (await alice.request("DELETE", "/refs/songs:one.mp3")).status == 204
    assert (await alice.request("GET", "/refs/songs:one.mp3")).status == 404
    assert (await alice.request("DELETE", "/refs/songs:one.mp3")).status == 404


async def test_put_ref_is_idempotent(alice):
    await alice.put(b"one")
    for _ in range(3):
        resp = await alice.request("PUT", "/refs/x", json={"hash": b3(b"one")})
        assert resp.status == 200
    meta = await (await alice.request("GET", f"/blobs/{b3(b'one')}/meta")).json()
    assert meta["refcount"] == 2


async def test_repointing_releases_the_old_blob(alice):
    await alice.put(b"one", headers={"Blob-Ref": "current"})
    await alice.put(b"two")
    resp = await alice.request("PUT", "/refs/current", json={"hash": b3(b"two")})
    assert resp.status == 200
    # "one" had only the "current" reference: re-pointing deleted it.
    assert (await alice.request("GET", f"/blobs/{b3(b'one')}")).status == 404
    assert len(blob_files(alice.data_dir)) == 1


async def test_ref_to_unknown_blob_is_404(alice):
    resp = await alice.request("PUT", "/refs/x", json={"hash": b3(b"missing")})
    assert resp.status == 404 and (await resp.json())["error"] == "not_found"


@pytest.mark.parametrize("body", [None, [], {"hash": 5}, {"hash": "zz"}])
async def test_bad_ref_bodies(alice, body):
    resp = await alice.request("PUT", "/refs/x", json=body)
    assert resp.status == 400


async def test_an_unknown_field_is_400_naming_it(alice):
    await alice.put(b"one")
    resp = await alice.request("PUT", "/refs/x", json={"hash": b3(b"one"), "hahs": "x"})
    assert resp.status == 400
    assert await resp.json() == {"error": "bad_request",
                                 "message": "unknown field 'hahs'; expected some of hash"}
    assert (await alice.request("GET", "/refs/x")).status == 404


@pytest.mark.parametrize("name", ["a" * 257, "with space", "slash%2F", "star*", "%C3%A9"])
async def test_bad_ref_names(alice, name):
    await alice.put(b"one")
    resp = await alice.request("PUT", f"/refs/{name}", json={"hash": b3(b"one")})
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"


async def test_list_refs_with_prefix_and_cursor(alice):
    await alice.put(b"one")
    names = [f"album:{i:02d}" for i in range(5)] + ["other"]
    for name in names:
        await alice.request("PUT", f"/refs/{name}", json={"hash": b3(b"one")})
    got, cursor = [], None
    while True:
        query = "?prefix=album:&limit=2" + (f"&after={cursor}" if cursor else "")
        page = await (await alice.request("GET", f"/refs{query}")).json()
        got += [r["name"] for r in page["refs"]]
        cursor = page["next"]
        if not cursor:
            break
    assert got == names[:5]
    whole = await (await alice.request("GET", "/refs?prefix=album:&limit=5")).json()
    assert [r["name"] for r in whole["refs"]] == names[:5] and whole["next"] is None


async def test_refs_are_private(server):
    login = await server()
    alice, bob = await login("alice"), await login("bob")
    await alice.put(b"one", headers={"Blob-Ref": "mine"})
    assert (await bob.request("GET", "/refs/mine")).status == 404
    assert (await bob.request("DELETE", "/refs/mine")).status == 404
    page = await (await bob.request("GET", "/refs")).json()
    assert page["refs"] == []



async def test_a_name_deleted_as_it_is_set_never_fails_the_put(alice):
    """PUT /refs read its answer back after its transaction, on the shared
    read connection: a DELETE committed while that read waited left it
    without a row (a 500). A slow query holds the read connection to open
    that window wide."""
    await alice.put(b"one")
    slow = asyncio.create_task(alice.store.db.fetchone(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000)"
        " SELECT count(*) FROM c"))
    await asyncio.sleep(0.05)
    put = asyncio.create_task(alice.request("PUT", "/refs/raced", json={"hash": b3(b"one")}))
    await asyncio.sleep(0.05)
    delete = await alice.request("DELETE", "/refs/raced")
    put_resp = await put
    await slow
    assert put_resp.status == 200, await put_resp.text()
    assert (await put_resp.json())["name"] == "raced"
    assert delete.status == 204

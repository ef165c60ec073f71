"""``max_refs``: the per-owner limit on reference names (API.md "Quotas")."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest

from conftest import b3, blob_files, tmp_files
from rawhttp import RawConnection
from test_quotas import assert_refused, quota, usage_row

TUS = {"Tus-Resumable": "1.0.0"}


def tus_meta(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


async def ref_names(api) -> list[str]:
    rows = await api.store.db.fetchall("SELECT name FROM refs WHERE owner = ? ORDER BY name",
                                       (api.owner,))
    return [row[0] for row in rows]


async def snapshot(api) -> tuple:
    """What a refused request must leave as it was."""
    return (await usage_row(api), await ref_names(api), blob_files(api.data_dir))


async def at_limit(server, limit: int = 3, **sections):
    """alice with ``limit`` names (a1..) for one blob, the limit reached;
    and the server's login."""
    login = await server(quotas={"default": {"max_refs": limit}}, **sections)
    alice = await login("alice")
    assert (await alice.put(b"held", headers={"Blob-Ref": "a1"})).status == 201
    for i in range(2, limit + 1):
        resp = await alice.request("PUT", f"/refs/a{i}", json={"hash": b3(b"held")})
        assert resp.status == 200
    assert (await quota(alice))["used_refs"] == limit
    return login, alice


async def test_quota_shows_used_refs_and_the_limit(server):
    login = await server(quotas={"bob": {"max_refs": 5}})
    alice, bob = await login("alice"), await login("bob")
    await alice.put(b"one")
    await alice.put(b"one", headers={"Blob-Ref": "again"})
    body = await quota(alice)
    assert (body["used_refs"], body["used_blobs"]) == (2, 1)
    assert body["limits"]["max_refs"] == 1_000_000
    assert (await quota(bob))["limits"]["max_refs"] == 5
    assert (await quota(bob))["used_refs"] == 0


async def test_every_way_of_making_a_new_name_is_refused_at_the_limit(server):
    login, alice = await at_limit(server)
    bob = await login("bob")
    assert (await bob.put(b"bob's")).status == 201
    before = await snapshot(alice)
    fresh = os.urandom(2000)
    # A new blob (its hash-named ref), by PUT and by POST, and with Blob-Ref.
    for resp in (await alice.put(fresh),
                 await alice.request("POST", "/blobs", data=fresh),
                 await alice.put(fresh, headers={"Blob-Ref": "new"})):
        await assert_refused(resp, "quota_exceeded", "max_refs (3)")
    # A blob already stored (bob's), and one alice holds already.
    await assert_refused(await alice.put(b"bob's"), "quota_exceeded", "max_refs")
    await assert_refused(await alice.put(b"held"), "quota_exceeded", "max_refs")
    for digest in (b3(b"held"), b3(b"bob's")):
        resp = await alice.request("PUT", "/refs/new", json={"hash": digest})
        await assert_refused(resp, "quota_exceeded", "max_refs")
    assert await snapshot(alice) == before
    assert tmp_files(alice.data_dir) == []
    meta = await bob.request("GET", f"/blobs/{b3(b'held')}/meta")
    assert (await meta.json())["refcount"] == 3


async def test_sessions_that_would_add_a_name_are_refused_when_made(server):
    _, alice = await at_limit(server)
    before = await snapshot(alice)
    for body in ({"size": 100}, {"size": 100, "ref": "new"},
                 {"size": 4, "hash": b3(b"held")}):  # held, but not under its hash
        resp = await alice.request("POST", "/uploads", json=body)
        await assert_refused(resp, "quota_exceeded", "max_refs")
    for meta in ("", tus_meta(ref="new")):
        resp = await alice.request("POST", "/tus/", headers={
            **TUS, "Upload-Length": "100", "Upload-Metadata": meta})
        await assert_refused(resp, "quota_exceeded", "max_refs")
    assert await snapshot(alice) == before
    assert os.listdir(alice.data_dir / "uploads") == []
    body = await quota(alice)
    assert (body["reserved_bytes"], body["reserved_blobs"]) == (0, 0)


async def test_sessions_naming_a_name_the_owner_has_are_made_and_complete(server):
    _, alice = await at_limit(server)
    data = os.urandom(3000)
    made = await alice.request("POST", "/uploads", json={"size": 3000, "ref": "a2"})
    assert made.status == 201, await made.text()
    session = (await made.json())["id"]
    assert (await alice.request("PUT", f"/uploads/{session}/0", data=data)).status == 204
    done = await alice.request("POST", f"/uploads/{session}/complete")
    assert done.status == 201, await done.text()
    assert (await alice.request("GET", "/refs/a2")).status == 200
    assert (await (await alice.request("GET", "/refs/a2")).json())["hash"] == b3(data)
    assert (await quota(alice))["used_refs"] == 3
    # A tus partial upload is no name of its own.
    part = await alice.request("POST", "/tus/", headers={
        **TUS, "Upload-Length": "10", "Upload-Concat": "partial"})
    assert part.status == 201, await part.text()


async def test_a_session_is_refused_at_completion_if_the_room_went_meanwhile(server):
    alice = await (await server(quotas={"default": {"max_refs": 2}}))("alice")
    assert (await alice.put(b"held", headers={"Blob-Ref": "a1"})).status == 201
    data = os.urandom(3000)
    made = await alice.request("POST", "/uploads", json={"size": 3000, "ref": "late"})
    assert made.status == 201
    session = (await made.json())["id"]
    assert (await alice.request("PUT", f"/uploads/{session}/0", data=data)).status == 204
    # A PUT takes the last name while the session is open.
    resp = await alice.request("PUT", "/refs/a2", json={"hash": b3(b"held")})
    assert resp.status == 200
    before = await snapshot(alice)
    done = await alice.request("POST", f"/uploads/{session}/complete")
    await assert_refused(done, "quota_exceeded", "max_refs (2)")
    assert await snapshot(alice) == before
    assert tmp_files(alice.data_dir) == []
    # The session is intact: once a name is freed, the completion succeeds.
    assert (await alice.request("DELETE", "/refs/a2")).status == 204
    again = await alice.request("POST", f"/uploads/{session}/complete")
    assert again.status == 201, await again.text()
    assert (await ref_names(alice)) == ["a1", "late"]


async def test_a_tus_upload_is_refused_at_its_last_byte_when_the_room_went(server):
    alice = await (await server(quotas={"default": {"max_refs": 2}}))("alice")
    assert (await alice.put(b"held", headers={"Blob-Ref": "a1"})).status == 201
    made = await alice.request("POST", "/tus/", headers={
        **TUS, "Upload-Length": "100", "Upload-Metadata": tus_meta(ref="late")})
    assert made.status == 201
    await alice.request("PUT", "/refs/a2", json={"hash": b3(b"held")})
    before = await snapshot(alice)
    resp = await alice.request("PATCH", made.headers["Location"], data=os.urandom(100),
                               headers={**TUS, "Upload-Offset": "0",
                                        "Content-Type": "application/offset+octet-stream"})
    await assert_refused(resp, "quota_exceeded", "max_refs")
    # The bytes stay with the upload (and were charged as received, as
    # always), for a completion once a name is freed.
    before[0]["monthly_upload_bytes"] += 100
    assert await snapshot(alice) == before
    assert tmp_files(alice.data_dir) == []
    # A HEAD tries the completion again: refused until a name is freed.
    head = await alice.request("HEAD", made.headers["Location"], headers=TUS)
    assert head.status == 507
    assert (await alice.request("DELETE", "/refs/a2")).status == 204
    head = await alice.request("HEAD", made.headers["Location"], headers=TUS)
    assert head.status == 200 and head.headers["Upload-Offset"] == "100"
    assert "Blob-Hash" in head.headers and await ref_names(alice) == ["a1", "late"]


async def test_a_tus_concatenation_is_refused_before_it_takes_the_parts(server):
    alice = await (await server(quotas={"default": {"max_refs": 1}}))("alice")
    part = await alice.request("POST", "/tus/", headers={
        **TUS, "Upload-Length": "10", "Upload-Concat": "partial"})
    url = part.headers["Location"]
    patched = await alice.request("PATCH", url, data=os.urandom(10), headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    assert patched.status == 204
    assert (await alice.put(b"held")).status == 201
    resp = await alice.request("POST", "/tus/", headers={
        **TUS, "Upload-Concat": f"final;{url}", "Upload-Metadata": tus_meta(ref="joined")})
    await assert_refused(resp, "quota_exceeded", "max_refs")
    head = await alice.request("HEAD", url, headers=TUS)
    assert head.status == 200 and head.headers["Upload-Offset"] == "10"


async def test_re_pointing_and_re_putting_at_the_limit_succeed(server):
    _, alice = await at_limit(server)
    # The idempotent re-PUT of the same ref, by name and by upload.
    assert (await alice.request("PUT", "/refs/a2", json={"hash": b3(b"held")})).status == 200
    assert (await alice.put(b"held", headers={"Blob-Ref": "a1"})).status == 200
    # Re-pointing an existing name: at a blob already stored, and at a new one.
    other = os.urandom(1000)
    resp = await alice.put(other, headers={"Blob-Ref": "a3"})
    assert resp.status == 201, await resp.text()
    resp = await alice.request("PUT", "/refs/a2", json={"hash": b3(other)})
    assert resp.status == 200, await resp.text()
    body = await quota(alice)
    assert (body["used_refs"], body["used_blobs"]) == (3, 2)
    assert await ref_names(alice) == ["a1", "a2", "a3"]


async def test_a_put_bound_to_pass_max_refs_is_refused_before_its_body(server):
    """As max_bytes is: an upload adding a name known from its head (its
    Blob-Ref, or the hash a PUT names) at the limit was read to its last
    byte and only then refused."""
    _, alice = await at_limit(server)
    before = await snapshot(alice)
    data = os.urandom(300_000)
    for path, headers in ((f"/blobs/{b3(data)}", {"Blob-Ref": "new"}),
                          (f"/blobs/{b3(data)}", {}), ("/blobs", {"Blob-Ref": "new"})):
        conn = await RawConnection.open(alice.client.host, alice.client.port)
        await conn.send_head("PUT" if path != "/blobs" else "POST", path, alice.headers({
            "Content-Length": str(len(data)), "Expect": "100-continue", **headers}))
        resp = await conn.read_response()  # no body byte was ever sent
        await conn.close()
        assert resp.status == 507 and resp.json()["error"] == "quota_exceeded", headers
        assert "max_refs (3)" in resp.json()["message"]
    assert await snapshot(alice) == before and tmp_files(alice.data_dir) == []
    assert (await quota(alice))["monthly_upload_bytes"] == len(b"held")
    # A name the owner has is only re-pointed: its body is asked for.
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    await conn.send_head("PUT", f"/blobs/{b3(data)}", alice.headers({
        "Content-Length": str(len(data)), "Expect": "100-continue", "Blob-Ref": "a3"}))
    assert (await conn.read_response()).status == 100
    await conn.send(data)
    assert (await conn.read_response()).status == 201
    await conn.close()
    assert (await alice.request("GET", "/refs/a3")).status == 200


async def test_deleting_references_frees_room(server):
    _, alice = await at_limit(server, limit=4)
    await assert_refused(await alice.put(b"next"), "quota_exceeded", "max_refs")
    assert (await alice.request("DELETE", "/refs/a4")).status == 204
    assert (await quota(alice))["used_refs"] == 3
    assert (await alice.put(b"next")).status == 201
    # DELETE /blobs drops every name of the blob: three names freed at once.
    assert (await alice.request("DELETE", f"/blobs/{b3(b'held')}")).status == 204
    assert (await quota(alice))["used_refs"] == 1
    for name in ("x", "y", "z"):
        resp = await alice.request("PUT", f"/refs/{name}", json={"hash": b3(b"next")})
        assert resp.status == 200
    await assert_refused(await alice.request("PUT", "/refs/w", json={"hash": b3(b"next")}),
                         "quota_exceeded", "max_refs (4)")


async def test_an_owner_override_in_the_config_applies(server):
    login = await server(quotas={"default": {"max_refs": 1}, "bob": {"max_refs": 3}})
    alice, bob = await login("alice"), await login("bob")
    for i in range(3):
        assert (await bob.put(f"bob {i}".encode())).status == 201
    await assert_refused(await bob.put(b"bob 3"), "quota_exceeded", "max_refs (3)")
    assert (await alice.put(b"alice 0")).status == 201
    await assert_refused(await alice.put(b"alice 1"), "quota_exceeded", "max_refs (1)")


async def test_admin_sets_and_resets_max_refs(server):
    login = await server(quotas={"default": {"max_refs": 2}})
    admin, alice = await login("root", "read,write,admin"), await login("alice")
    await alice.put(b"one")
    await alice.put(b"two")
    await assert_refused(await alice.put(b"three"), "quota_exceeded", "max_refs (2)")
    resp = await admin.request("PUT", "/admin/owners/alice/quota", json={"max_refs": 3})
    assert resp.status == 200
    body = await resp.json()
    assert (body["used_refs"], body["limits"]["max_refs"]) == (2, 3)
    assert (await alice.put(b"three")).status == 201   # the cached limits were forgotten
    await assert_refused(await alice.put(b"four"), "quota_exceeded", "max_refs (3)")
    resp = await admin.request("PUT", "/admin/owners/alice/quota", json={"max_refs": None})
    assert (await resp.json())["limits"]["max_refs"] == 2
    # Below what is used: nothing is taken away, no new name is made.
    await assert_refused(await alice.put(b"four"), "quota_exceeded", "max_refs (2)")
    assert (await alice.request("DELETE", f"/blobs/{b3(b'one')}")).status == 204
    await assert_refused(await alice.put(b"four"), "quota_exceeded", "max_refs (2)")
    assert (await alice.request("DELETE", f"/blobs/{b3(b'two')}")).status == 204
    assert (await alice.put(b"four")).status == 201


@pytest.mark.parametrize("value", [-1, "5", "1KiB", True, 1.5])
async def test_a_bad_max_refs_is_400_and_changes_nothing(server, value):
    admin = await (await server())("root", "admin")
    resp = await admin.request("PUT", "/admin/owners/bob/quota", json={"max_refs": value})
    assert resp.status == 400 and "max_refs" in (await resp.json())["message"]
    assert await admin.store.db.fetchone("SELECT * FROM owners WHERE owner = 'bob'") is None


async def test_concurrent_new_names_never_pass_max_refs(server):
    limit = 20
    _, alice = await at_limit(server, limit=limit - 1, storage={"fsync": False})
    async with alice.store.write() as tx:
        await tx.conn.execute("UPDATE owners SET max_refs = ? WHERE owner = 'alice'", (limit,))
    alice.store.owner_limits.forget("alice")
    bodies = [os.urandom(1000) for _ in range(15)]
    results = await asyncio.gather(
        *(alice.request("PUT", f"/refs/n{i}", json={"hash": b3(b"held")})
          for i in range(15)),
        *(alice.request("POST", "/blobs", data=body) for body in bodies),
        *(alice.put(body, headers={"Blob-Ref": f"p{i}"}) for i, body in enumerate(bodies)))
    ok = [r for r in results if r.status in (200, 201)]
    assert len(ok) == 1, sorted(r.status for r in results)
    for resp in results:
        if resp not in ok:
            await assert_refused(resp, "quota_exceeded", "max_refs")
    body = await quota(alice)
    assert body["used_refs"] == limit == len(await ref_names(alice))
    assert len(blob_files(alice.data_dir)) == body["used_blobs"]
    assert tmp_files(alice.data_dir) == []

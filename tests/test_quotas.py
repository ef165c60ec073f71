"""Quotas (API.md "Quotas") against a real app, SQLite file and disk."""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import os
import sqlite3

import pytest

from blobd import index
from conftest import b3, blob_files, tmp_files
from rawhttp import RawConnection


async def usage_row(api) -> dict:
    row = await api.store.db.fetchone("SELECT * FROM owners WHERE owner = ?", (api.owner,))
    return dict(row) if row else {}


async def quota(api) -> dict:
    resp = await api.request("GET", "/quota")
    assert resp.status == 200
    return await resp.json()


async def assert_refused(resp, code: str, limit: str) -> None:
    body = await resp.json()
    assert (resp.status, body["error"]) == (413 if code == "too_large" else 507, code), body
    assert limit in body["message"], body


async def test_quota_body_shows_usage_and_configured_limits(server):
    login = await server(quotas={"default": {"max_bytes": "1MiB", "max_blobs": 7},
                                 "bob": {"max_blobs": 2}})
    alice, bob = await login("alice"), await login("bob")
    await alice.put(b"x" * 1000)
    await alice.put(b"x" * 1000, headers={"Blob-Ref": "again"})  # same blob: charged once
    assert await quota(alice) == {
        "owner": "alice", "used_bytes": 1000, "used_blobs": 1, "used_refs": 2,
        "monthly_upload_bytes": 2000, "reserved_bytes": 0, "reserved_blobs": 0,
        "limits": {"max_bytes": 1 << 20, "max_blobs": 7, "max_blob_size": 2 << 30,
                   "max_monthly_upload_bytes": 100 << 30, "max_refs": 1_000_000}}
    assert (await quota(bob))["limits"]["max_blobs"] == 2
    assert (await quota(bob))["limits"]["max_bytes"] == 1 << 20


async def test_admin_overrides_and_resets_limits(server):
    login = await server()
    admin, bob = await login("root", "read,write,admin"), await login("bob")
    resp = await admin.request("PUT", "/admin/owners/bob/quota",
                               json={"max_bytes": "1KiB", "max_blobs": 3})
    assert resp.status == 200
    body = await resp.json()
    assert body["owner"] == "bob"
    assert body["limits"]["max_bytes"] == 1024 and body["limits"]["max_blobs"] == 3
    assert (await quota(bob))["limits"] == body["limits"]
    assert await (await admin.request("GET", "/admin/owners/bob/quota")).json() == body
    reset = await admin.request("PUT", "/admin/owners/bob/quota", json={"max_bytes": None})
    limits = (await reset.json())["limits"]
    assert limits["max_bytes"] == 50 << 30 and limits["max_blobs"] == 3


@pytest.mark.parametrize("body", [
    {"max_gigs": 1}, {"max_bytes": "lots"}, {"max_blobs": "5"}, {"max_blobs": -1},
    {"max_blobs": True}, {"max_bytes": -5},
    {"max_bytes": "1" * 400},  # float() is inf: it was a 500 (found by review)
])
async def test_bad_quota_changes_are_400_and_change_nothing(server, body):
    login = await server()
    admin = await login("root", "admin")
    resp = await admin.request("PUT", "/admin/owners/bob/quota", json=body)
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"
    assert await admin.store.db.fetchone("SELECT * FROM owners WHERE owner = 'bob'") is None


async def test_quota_admin_needs_the_admin_scope(server):
    login = await server()
    alice = await login("alice", "read,write")
    resp = await alice.request("PUT", "/admin/owners/alice/quota", json={"max_bytes": 1})
    assert resp.status == 403
    bad_owner = await (await login("root", "admin")).request(
        "PUT", "/admin/owners/no%20spaces/quota", json={})
    assert bad_owner.status == 400


async def test_max_bytes_refuses_and_leaves_nothing_behind(server):
    login = await server(quotas={"default": {"max_bytes": 2500}})
    alice = await login("alice")
    assert (await alice.put(b"a" * 1000)).status == 201
    assert (await alice.put(b"b" * 1000)).status == 201
    before = await usage_row(alice)
    # Named address: refused from Content-Length, before the body is read.
    await assert_refused(await alice.put(b"c" * 1000), "quota_exceeded", "max_bytes")
    # Unnamed (POST): refused inside the commit transaction.
    await assert_refused(await alice.request("POST", "/blobs", data=b"d" * 1000),
                         "quota_exceeded", "max_bytes")
    assert await usage_row(alice) == before
    assert len(blob_files(alice.data_dir)) == 2 and tmp_files(alice.data_dir) == []
    # Something the owner already holds costs nothing, so it is not refused.
    assert (await alice.put(b"a" * 1000, headers={"Blob-Ref": "copy"})).status == 200
    assert (await alice.put(b"e" * 500)).status == 201


async def test_max_blobs_and_dedup_across_owners_is_charged(server):
    login = await server(quotas={"default": {"max_blobs": 2}})
    alice, bob = await login("alice"), await login("bob")
    shared = os.urandom(3000)
    assert (await bob.put(shared)).status == 201
    await alice.put(b"one")
    await alice.put(b"two")
    await assert_refused(await alice.put(shared), "quota_exceeded", "max_blobs")
    resp = await alice.request("PUT", "/refs/shared", json={"hash": b3(shared)})
    await assert_refused(resp, "quota_exceeded", "max_blobs")
    assert (await usage_row(alice))["used_blobs"] == 2
    meta = await (await bob.request("GET", f"/blobs/{b3(shared)}/meta")).json()
    assert meta["refcount"] == 1


async def test_repointing_a_name_at_the_limit_swaps_blobs(server):
    login = await server(quotas={"default": {"max_blobs": 1}})
    alice = await login("alice")
    assert (await alice.put(b"first take", headers={"Blob-Ref": "take"})).status == 201
    resp = await alice.put(b"second take", headers={"Blob-Ref": "take"})
    assert resp.status == 201, await resp.text()
    assert (await usage_row(alice))["used_bytes"] == len(b"second take")
    assert blob_files(alice.data_dir)[0].name == b3(b"second take")


async def test_reserved_bytes_count_against_max_bytes(server):
    login = await server(quotas={"default": {"max_bytes": 1000}})
    alice = await login("alice")
    async with alice.store.write() as tx:  # as a resumable session reserves
        await index.reserve(tx.conn, "alice", 900)
    assert (await quota(alice))["reserved_bytes"] == 900
    await assert_refused(await alice.put(os.urandom(200)), "quota_exceeded", "max_bytes")
    await assert_refused(await alice.request("POST", "/blobs", data=os.urandom(200)),
                         "quota_exceeded", "max_bytes")
    assert (await alice.put(os.urandom(100))).status == 201
    async with alice.store.write() as tx:
        await index.reserve(tx.conn, "alice", -900)
    assert (await alice.put(os.urandom(800))).status == 201


async def test_concurrent_uploads_never_pass_the_quota(server):
    size, room = 1000, 10
    login = await server(quotas={"default": {"max_bytes": size * room}},
                         storage={"fsync": False})
    alice = await login("alice")
    bodies = [os.urandom(size) for _ in range(40)]

    async def chunked(data: bytes):
        yield data[:500]
        await asyncio.sleep(0)
        yield data[500:]

    # Half with Content-Length, half chunked (no early check: only the
    # commit transaction stands between them and the limit).
    results = await asyncio.gather(*(
        alice.put(body) if i % 2 else
        alice.request("POST", "/blobs", data=chunked(body))
        for i, body in enumerate(bodies)))
    statuses = sorted(r.status for r in results)
    assert statuses.count(201) == room, statuses
    assert statuses.count(507) == len(bodies) - room, statuses
    row = await usage_row(alice)
    assert (row["used_bytes"], row["used_blobs"]) == (size * room, room)
    assert len(blob_files(alice.data_dir)) == room and tmp_files(alice.data_dir) == []


async def test_concurrent_references_never_pass_max_blobs(server):
    login = await server(quotas={"default": {"max_blobs": 5}})
    alice, bob = await login("alice"), await login("bob")
    digests = []
    for i in range(30):
        data = f"bob's blob {i}".encode()
        await bob.put(data)
        digests.append(b3(data))
    results = await asyncio.gather(*(
        alice.request("PUT", f"/refs/r{i}", json={"hash": d}) for i, d in enumerate(digests)))
    assert sorted(r.status for r in results).count(200) == 5
    assert (await usage_row(alice))["used_blobs"] == 5


async def test_monthly_upload_quota_counts_bytes_received(server):
    login = await server(quotas={"default": {"max_monthly_upload_bytes": 3000}})
    alice = await login("alice")
    data = os.urandom(1200)
    assert (await alice.put(data)).status == 201
    assert (await alice.put(data)).status == 200  # re-sent bytes count too
    assert (await quota(alice))["monthly_upload_bytes"] == 2400
    await assert_refused(await alice.put(os.urandom(1000)), "quota_exceeded",
                         "max_monthly_upload_bytes")

    async def chunked():
        yield os.urandom(1000)
    await assert_refused(await alice.request("POST", "/blobs", data=chunked()),
                         "quota_exceeded", "max_monthly_upload_bytes")
    assert (await quota(alice))["monthly_upload_bytes"] == 2400
    # A dedup hit answered from Expect: 100-continue uploads nothing.
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    await conn.send_head("PUT", f"/blobs/{b3(data)}", alice.headers({
        "Content-Length": str(len(data)), "Expect": "100-continue", "Blob-Ref": "free"}))
    assert (await conn.read_response()).status == 200
    await conn.close()
    assert (await quota(alice))["monthly_upload_bytes"] == 2400


async def test_monthly_counter_rolls_over_with_the_calendar_month(server):
    login = await server(quotas={"default": {"max_monthly_upload_bytes": 1000}})
    alice = await login("alice")
    assert (await alice.put(b"m" * 1000)).status == 201
    await assert_refused(await alice.put(b"n" * 10), "quota_exceeded",
                         "max_monthly_upload_bytes")
    # The month the counter belongs to is over (written as a month that ended).
    async with alice.store.write() as tx:
        await tx.conn.execute("UPDATE owners SET upload_month = '2025-12' WHERE owner = ?",
                              ("alice",))
    assert (await quota(alice))["monthly_upload_bytes"] == 0
    assert (await alice.put(b"n" * 10)).status == 201
    row = await usage_row(alice)
    assert row["monthly_upload_bytes"] == 10 and row["upload_month"] == index.current_month()
    assert row["used_bytes"] == 1010  # storage is not monthly


@pytest.mark.parametrize("moment, month", [
    ((2025, 12, 31, 23, 59, 59), "2025-12"), ((2026, 1, 1, 0, 0, 0), "2026-01"),
    ((2024, 2, 29, 12, 0, 0), "2024-02"), ((2024, 3, 1, 0, 0, 0), "2024-03"),
])
def test_months_are_calendar_months_in_utc(moment, month):
    assert index.current_month(calendar.timegm(moment + (0, 0, 0))) == month


async def test_owner_max_blob_size_is_413_before_the_body(server):
    login = await server()
    admin, alice = await login("root", "admin"), await login("alice")
    await admin.request("PUT", "/admin/owners/alice/quota", json={"max_blob_size": 1000})
    for method, path in (("PUT", f"/blobs/{b3(b'z' * 5000)}"), ("POST", "/blobs")):
        conn = await RawConnection.open(alice.client.host, alice.client.port)
        await conn.send_head(method, path, alice.headers({"Content-Length": "5000"}))
        resp = await conn.read_response()  # no body byte was ever sent
        await conn.close()
        assert resp.status == 413 and resp.json()["error"] == "too_large"
        assert "max_blob_size" in resp.json()["message"]
    assert tmp_files(alice.data_dir) == []


@pytest.mark.parametrize("owner_limit, server_limit", [(1000, None), (None, 1000),
                                                        (1000, 5000), (5000, 1000)])
async def test_max_blob_size_while_streaming(server, owner_limit, server_limit):
    sections = {"quotas": {"alice": {"max_blob_size": owner_limit}}} if owner_limit else {}
    if server_limit:
        sections["limits"] = {"max_blob_size": server_limit}
    login = await server(**sections)
    alice = await login("alice")

    async def chunked():
        for _ in range(6):
            yield os.urandom(200)
    resp = await alice.request("POST", "/blobs", data=chunked())
    assert resp.status == 413 and (await resp.json())["error"] == "too_large"
    assert blob_files(alice.data_dir) == [] and tmp_files(alice.data_dir) == []
    assert (await alice.request("POST", "/blobs", data=os.urandom(1000))).status == 201


async def test_referencing_a_blob_over_the_owners_max_blob_size_is_413(server):
    login = await server(quotas={"alice": {"max_blob_size": 100}})
    alice, bob = await login("alice"), await login("bob")
    big = os.urandom(500)
    await bob.put(big)
    resp = await alice.request("PUT", "/refs/big", json={"hash": b3(big)})
    assert resp.status == 413 and (await resp.json())["error"] == "too_large"


async def test_min_free_bytes_refuses_before_the_disk_is_full(server):
    login = await server(storage={"min_free_bytes": "1000TiB"})
    alice = await login("alice")
    await assert_refused(await alice.put(b"x" * 100), "insufficient_storage", "disk")

    async def chunked():
        yield b"y" * 100
    await assert_refused(await alice.request("POST", "/blobs", data=chunked()),
                         "insufficient_storage", "disk")
    assert blob_files(alice.data_dir) == [] and tmp_files(alice.data_dir) == []
    assert await usage_row(alice) == {}


async def test_limits_lowered_elsewhere_bind_small_uploads_at_once(server):
    # Small bodies are checked early against limits this process read up
    # to a second ago; a limit lowered meanwhile by another process (here:
    # straight in the index) must still hold, in the commit.
    login = await server()
    alice = await login("alice")
    assert (await alice.put(os.urandom(2000))).status == 201   # limits now cached
    db = sqlite3.connect(alice.data_dir / "index.sqlite3")
    with db:
        db.execute("UPDATE owners SET max_blob_size = 1000, max_blobs = 1"
                   " WHERE owner = 'alice'")
    db.close()
    before = await usage_row(alice)
    resp = await alice.request("POST", "/blobs", data=os.urandom(2000))
    assert resp.status == 413 and (await resp.json())["error"] == "too_large"
    await assert_refused(await alice.put(os.urandom(500)), "quota_exceeded", "max_blobs")
    assert await usage_row(alice) == before
    assert len(blob_files(alice.data_dir)) == 1 and tmp_files(alice.data_dir) == []


async def test_an_owner_without_room_never_makes_the_server_allocate(server):
    """Found by review: a session's file was allocated at its full size
    before max_bytes was checked, so concurrent creations by an owner with
    no room held 1.35 GiB of disk for a moment (all of them refused)."""
    alice = await (await server(quotas={"default": {"max_bytes": 1000}}))("alice")
    uploads = alice.data_dir / "uploads"
    seen, done = [], asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            seen.append(len(os.listdir(uploads)))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    answers = await asyncio.gather(*(
        alice.request("POST", "/uploads", json={"size": 50 << 20}) for _ in range(10)))
    done.set()
    await watcher
    assert [a.status for a in answers] == [507] * 10
    assert len(seen) > 10 and max(seen) == 0


async def test_an_open_session_holds_a_blob_slot(server):
    """Found by review: sessions checked max_blobs but did not reserve it,
    so two were accepted for the last slot and the second refused only at
    its commit, after every byte (and a PUT could take the slot too)."""
    alice = await (await server(quotas={"default": {"max_blobs": 1}}))("alice")
    first = await alice.request("POST", "/uploads", json={"size": 3000, "chunk_size": 1000})
    assert first.status == 201
    assert (await quota(alice))["reserved_blobs"] == 1
    second = await alice.request("POST", "/tus/", headers={
        "Tus-Resumable": "1.0.0", "Upload-Length": "3000"})
    await assert_refused(second, "quota_exceeded", "max_blobs (1)")
    deferred = await alice.request("POST", "/tus/", headers={
        "Tus-Resumable": "1.0.0", "Upload-Defer-Length": "1"})
    await assert_refused(deferred, "quota_exceeded", "reserved by open upload sessions")
    await assert_refused(await alice.put(b"another blob"), "quota_exceeded", "max_blobs (1)")
    # The session's commit takes its own slot.
    session = (await first.json())["id"]
    data = os.urandom(3000)
    for i in range(3):
        put = await alice.request("PUT", f"/uploads/{session}/{i}",
                                  data=data[i * 1000:(i + 1) * 1000])
        assert put.status == 204
    done = await alice.request("POST", f"/uploads/{session}/complete")
    assert done.status == 201, await done.text()
    after = await quota(alice)
    assert (after["used_blobs"], after["reserved_blobs"], after["reserved_bytes"]) == (1, 0, 0)


async def test_an_aborted_or_expired_session_gives_its_slot_back(server):
    alice = await (await server(quotas={"default": {"max_blobs": 1}}))("alice")
    first = await alice.request("POST", "/uploads", json={"size": 10})
    await assert_refused(await alice.put(b"x" * 10), "quota_exceeded", "max_blobs")
    assert (await alice.request("DELETE", f"/uploads/{(await first.json())['id']}")).status == 204
    assert (await quota(alice))["reserved_blobs"] == 0
    assert (await alice.put(b"x" * 10)).status == 201


async def _expect(api, method: str, path: str, body: bytes, headers: dict | None = None):
    """Announce ``body`` with Expect: 100-continue; send it only if invited.
    (first answer, final answer or None)."""
    conn = await RawConnection.open(api.client.host, api.client.port)
    try:
        await conn.send_head(method, path, api.headers({
            "Content-Length": str(len(body)), "Expect": "100-continue", **(headers or {})}))
        first = await conn.read_response()
        if first.status != 100:
            return first, None
        await conn.send(body)
        return first, await conn.read_response()
    finally:
        await conn.close()


async def test_a_new_blob_past_max_blobs_is_refused_before_its_body(server):
    """Found by review: only bytes were checked before 100 Continue, so an
    owner at max_blobs was invited to send a whole body for a 507."""
    login = await server(quotas={"default": {"max_blobs": 1}})
    alice, bob = await login("alice"), await login("bob")
    assert (await alice.put(b"the one")).status == 201
    before = await quota(alice)
    new = os.urandom(200_000)
    sha = hashlib.sha256(new).hexdigest()
    for path in (f"/blobs/{b3(new)}", f"/blobs/sha256:{sha}"):
        first, final = await _expect(alice, "PUT", path, new)
        assert final is None, (path, first.status)
        assert (first.status, first.json()["error"]) == (507, "quota_exceeded"), first.body
        assert "max_blobs (1)" in first.json()["message"]
    # Bob's blob, stored but new to alice, with a size that is not its own
    # (the shortcut cannot take it): refused before the body too.
    assert (await bob.put(new)).status == 201
    first, final = await _expect(alice, "PUT", f"/blobs/{b3(new)}", new + b"x")
    assert final is None and first.status == 507
    assert await quota(alice) == before and tmp_files(alice.data_dir) == []


async def test_at_max_blobs_what_would_be_accepted_is_still_invited(server):
    login = await server(quotas={"default": {"max_blobs": 1}})
    alice = await login("alice")
    held = b"first take" * 1000
    assert (await alice.put(held, headers={"Blob-Ref": "take"})).status == 201
    # A blob she holds, under a size that is not its own: read, then
    # refused as any wrong body is (never 507).
    first, final = await _expect(alice, "PUT", f"/blobs/{b3(held)}", held + b"!")
    assert first.status == 100 and final.status == 400
    # Re-pointing her only reference to it frees its slot at the commit.
    second = b"second take" * 1000
    first, final = await _expect(alice, "PUT", f"/blobs/{b3(second)}", second,
                                 {"Blob-Ref": "take"})
    assert first.status == 100 and final.status == 201, final.body
    # POST has no hash before its body: the bytes may be hers already.
    first, final = await _expect(alice, "POST", "/blobs", second, {"Blob-Ref": "again"})
    assert first.status == 100 and final.status == 200, final.body
    assert (await quota(alice))["used_blobs"] == 1


async def test_a_repointed_name_frees_its_bytes_before_the_body(server):
    """max_bytes the same: the early check refused a re-point the commit
    would take."""
    login = await server(quotas={"default": {"max_bytes": 150_000}})
    alice = await login("alice")
    assert (await alice.put(os.urandom(100_000), headers={"Blob-Ref": "take"})).status == 201
    second = os.urandom(100_000)
    first, final = await _expect(alice, "PUT", f"/blobs/{b3(second)}", second,
                                 {"Blob-Ref": "take"})
    assert first.status == 100 and final.status == 201, final.body
    first, final = await _expect(alice, "PUT", f"/blobs/{b3(os.urandom(8))}",
                                 os.urandom(100_000), {"Blob-Ref": "other"})
    assert final is None and first.status == 507 and "max_bytes" in first.json()["message"]


async def test_a_post_by_an_owner_holding_nothing_is_refused_before_its_body(server):
    """Whatever a POST's bytes are, they are new to an owner who holds
    nothing: with every slot reserved by a session, 507 before the body."""
    alice = await (await server(quotas={"default": {"max_blobs": 1}}))("alice")
    session = await alice.request("POST", "/uploads", json={"size": 10})
    assert session.status == 201
    first, final = await _expect(alice, "POST", "/blobs", os.urandom(200_000))
    assert final is None and first.status == 507, first.body
    assert "reserved by open upload sessions" in first.json()["message"]

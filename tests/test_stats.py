"""GET /stats (API.md "Operations"): the deduplication figures."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time

import pytest

from conftest import b3

A, B = os.urandom(4000), os.urandom(1500)


async def stats(api) -> dict:
    resp = await api.request("GET", "/stats")
    assert resp.status == 200, await resp.text()
    return await resp.json()


def sql(api, statement: str, params=()):
    with sqlite3.connect(api.data_dir / "index.sqlite3") as conn:
        conn.execute(statement, params)


async def test_empty_store(server):
    login = await server(scrub={})   # the scrub's defaults, which tests turn off
    admin = await login("root", "admin")
    body = await stats(admin)
    disk = shutil.disk_usage(admin.data_dir)
    assert body["disk"]["total_bytes"] == disk.total
    assert 0 < body["disk"]["free_bytes"] <= disk.total
    del body["disk"]
    scrub = body.pop("scrub")
    # When its first pass (over nothing) ran depends on the moment.
    assert scrub.pop("pass_started") is None or scrub["last_pass_ended"] is None
    # Known once a pass has ended (one over nothing finds nothing missing).
    assert scrub.pop("missing") == (None if scrub["last_pass_ended"] is None else 0)
    del scrub["last_pass_ended"]
    assert scrub == {"enabled": True, "bytes_per_second": 16 << 20,
                     "period_seconds": 30 * 86400.0, "blobs_checked": 0,
                     "bytes_checked": 0, "damaged": 0, "continuous": False}
    assert body == {"blobs": 0, "stored_bytes": 0, "references": 0, "logical_bytes": 0,
                    "dedup_ratio": 1.0, "bytes_saved": 0, "puts": 0, "put_dedup_hits": 0,
                    "hash_hit_rate": 0.0,
                    "mirror": {"pending": 0, "failed": 0, "last_error": None,
                               "oldest_pending_seconds": 0.0},
                    "grace": {"blobs": 0, "bytes": 0}, "sessions_open": 0}


async def test_dedup_figures(server):
    login = await server()
    admin, alice, bob = await login("root", "admin"), await login("alice"), await login("bob")
    assert (await alice.put(A)).status == 201
    assert (await alice.put(B)).status == 201
    assert (await bob.put(A)).status == 200
    assert (await alice.put(A, headers={"Blob-Ref": "again"})).status == 200
    # A reference made without a store is a reference, not a put.
    assert (await bob.request("PUT", "/refs/b", json={"hash": b3(B)})).status == 200
    body = await stats(admin)
    assert {k: body[k] for k in ("blobs", "stored_bytes", "references", "logical_bytes",
                                 "bytes_saved", "puts", "put_dedup_hits")} == {
        "blobs": 2, "stored_bytes": len(A) + len(B), "references": 5,
        "logical_bytes": 3 * len(A) + 2 * len(B), "bytes_saved": 2 * len(A) + len(B),
        "puts": 4, "put_dedup_hits": 2}
    assert body["dedup_ratio"] == pytest.approx(2.5)
    assert body["hash_hit_rate"] == pytest.approx(0.5)


async def test_blobs_in_their_grace_period_are_counted_apart(server):
    login = await server(gc={"grace_seconds": 3600})
    admin, alice = await login("root", "admin"), await login("alice")
    await alice.put(A)
    await alice.put(B)
    await alice.request("DELETE", f"/blobs/{b3(B)}")
    body = await stats(admin)
    assert (body["blobs"], body["stored_bytes"], body["references"]) == (1, len(A), 1)
    assert body["grace"] == {"blobs": 1, "bytes": len(B)}
    assert body["dedup_ratio"] == 1.0 and body["bytes_saved"] == 0


async def test_mirror_and_session_figures_come_from_their_tables(server):
    login = await server()
    admin = await login("root", "admin")
    now = time.time()
    rows = [("a" * 64, "put", 0, None, now, now - 3600),
            ("b" * 64, "put", 2, "timeout", now + 10, now - 60),
            ("c" * 64, "delete", 5, "403 Forbidden", now + 300, now - 5)]
    for row in rows:
        sql(admin, "INSERT INTO mirror_queue (hash, op, attempts, last_error, next_at,"
                   " enqueued_at) VALUES (?, ?, ?, ?, ?, ?)", row)
    # Two open, one committed, one expired that the sweeper has not removed
    # yet (its client already gets 404: it is not open any more).
    for i, (result, expires) in enumerate([(None, 9e9), (None, 9e9), ("d" * 64, 9e9),
                                           (None, now - 1)]):
        sql(admin, "INSERT INTO uploads (id, owner, protocol, size, chunk_size, created_at,"
                   " expires_at, result_hash) VALUES (?, 'alice', 'native', 10, 10, 0,"
                   " ?, ?)", (f"s{i}", expires, result))
    body = await stats(admin)
    oldest = body["mirror"].pop("oldest_pending_seconds")
    assert 3600 <= oldest < 3600 + (time.time() - now) + 1
    assert body["mirror"] == {"pending": 3, "failed": 2, "last_error": "403 Forbidden"}
    assert body["sessions_open"] == 2


@pytest.mark.parametrize("scopes, status", [("read,write", 403), (None, 401)])
async def test_stats_are_for_admins(server, scopes, status):
    login = await server()
    api = await login("alice", scopes or "read")
    if scopes is None:
        api.token = None
    assert (await api.request("GET", "/stats")).status == status

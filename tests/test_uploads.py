"""Native resumable upload sessions (``/uploads``) on a real server and disk."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from blobd import index, sessions
from blobd.client import BlobdClient
from blobd.sessions import sweep_sessions
from conftest import Api, b3, tmp_files
from rawhttp import RawConnection
from serverproc import BlobdServer, http as request

CHUNK = 1000


def payload(size: int, seed: int = 1) -> bytes:
    """Deterministic, non-repeating bytes (a repeated pattern would hide
    chunks written at the wrong offset)."""
    out, counter = bytearray(), 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


async def create(api: Api, data: bytes, *, status: int = 201, **fields) -> dict:
    body = {"size": len(data), "chunk_size": CHUNK, **fields}
    resp = await api.request("POST", "/uploads", json=body)
    assert resp.status == status, await resp.text()
    return await resp.json()


def chunk_of(data: bytes, idx: int) -> bytes:
    return data[idx * CHUNK:(idx + 1) * CHUNK]


async def send(api: Api, session: dict, idx: int, data: bytes, *, status: int = 204,
               headers: dict | None = None):
    resp = await api.request("PUT", f"/uploads/{session['id']}/{idx}", data=data,
                             headers=headers)
    assert resp.status == status, await resp.text()
    return resp


async def status_of(api: Api, session: dict) -> dict:
    resp = await api.request("GET", f"/uploads/{session['id']}")
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def usage(api: Api) -> dict:
    return await index.usage(api.store.db.reader, api.owner)


async def test_chunks_in_any_order_commit_like_a_put(alice: Api) -> None:
    data = payload(3 * CHUNK + 123)
    session = await create(alice, data, hash=b3(data), ref="songs:long",
                           content_type="audio/x-test")
    assert session["chunks"] == 4 and session["chunk_size"] == CHUNK
    assert session["missing"] == [0, 1, 2, 3] and session["expires_at"].endswith("Z")
    # One preallocated file: its full size is allocated on disk already.
    path = alice.data_dir / "uploads" / session["id"]
    info = path.stat()
    assert info.st_size == len(data) and info.st_blocks * 512 >= len(data)
    assert (await usage(alice))["reserved_bytes"] == len(data)

    for idx in (3, 1, 0):
        await send(alice, session, idx, chunk_of(data, idx))
    state = await status_of(alice, session)
    assert state["received"] == [0, 1, 3] and state["missing"] == [2]
    assert state["bytes_received"] == 2 * CHUNK + 123
    await send(alice, session, 2, chunk_of(data, 2))

    resp = await alice.request("POST", f"/uploads/{session['id']}/complete")
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert resp.headers["Location"] == f"/blobs/{b3(data)}"
    assert body == {"hash": b3(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data), "content_type": "audio/x-test", "created": True,
                    "ref": "songs:long"}
    got = await alice.request("GET", f"/blobs/{b3(data)}")
    assert await got.read() == data
    assert not path.exists() and tmp_files(alice.data_dir) == []
    after = await usage(alice)
    assert after["reserved_bytes"] == 0 and after["used_bytes"] == len(data)
    # The same content PUT afterwards answers with the same fields.
    again = await alice.put(data)
    assert set(await again.json()) == set(body)


async def test_parallel_chunks_and_a_repeat_are_harmless(alice: Api) -> None:
    data = payload(20 * CHUNK + 7)
    session = await create(alice, data)
    indexes = list(range(21))
    await asyncio.gather(*(send(alice, session, i, chunk_of(data, i)) for i in indexes))
    # A chunk sent again - even with other bytes - never changes what was
    # acknowledged.
    await send(alice, session, 5, b"x" * CHUNK)
    assert (await status_of(alice, session))["missing"] == []
    resp = await alice.request("POST", f"/uploads/{session['id']}/complete")
    assert (await resp.json())["hash"] == b3(data)
    # Bytes received are charged to the month once, the repeat not at all.
    assert (await usage(alice))["monthly_upload_bytes"] == len(data)


@pytest.mark.parametrize("idx, body, why", [
    ("3", b"a" * 100, "index past the last chunk"),
    ("-1", b"a" * CHUNK, "negative index"),
    ("one", b"a" * CHUNK, "not a number"),
    ("0", b"a" * (CHUNK - 1), "short chunk"),
    ("0", b"a" * (CHUNK + 1), "long chunk"),
    ("2", b"a" * CHUNK, "last chunk must be 500 bytes"),
])
async def test_wrong_index_or_length_is_400(alice: Api, idx: str, body: bytes,
                                            why: str) -> None:
    session = await create(alice, payload(2 * CHUNK + 500))
    resp = await alice.request("PUT", f"/uploads/{session['id']}/{idx}", data=body)
    assert resp.status == 400, why
    assert (await resp.json())["error"] == "bad_request"
    assert (await status_of(alice, session))["received"] == []


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def sha256_digest(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


@pytest.mark.parametrize("header, make", [
    ("Content-MD5", md5_b64),
    ("Content-Digest", sha256_digest),
])
async def test_chunk_digest_is_checked(alice: Api, header: str, make) -> None:
    data = payload(2 * CHUNK)
    session = await create(alice, data)
    first = chunk_of(data, 0)
    resp = await send(alice, session, 0, first, status=400,
                      headers={header: make(b"not the chunk")})
    assert (await resp.json())["error"] == "digest_mismatch"
    assert (await status_of(alice, session))["received"] == []
    await send(alice, session, 0, first, headers={header: make(first)})
    assert (await status_of(alice, session))["received"] == [0]


async def test_complete_with_missing_chunks_is_409_listing_them(alice: Api) -> None:
    data = payload(5 * CHUNK)
    session = await create(alice, data)
    await send(alice, session, 1, chunk_of(data, 1))
    await send(alice, session, 3, chunk_of(data, 3))
    resp = await alice.request("POST", f"/uploads/{session['id']}/complete")
    assert resp.status == 409
    body = await resp.json()
    assert body["error"] == "conflict" and body["missing"] == [0, 2, 4]


async def test_declared_hash_mismatch_stores_nothing_and_keeps_the_session(
        alice: Api) -> None:
    data = payload(2 * CHUNK)
    wrong = b3(b"something else")
    session = await create(alice, data, hash=wrong)
    for idx in (0, 1):
        await send(alice, session, idx, chunk_of(data, idx))
    resp = await alice.request("POST", f"/uploads/{session['id']}/complete")
    assert resp.status == 400 and (await resp.json())["error"] == "digest_mismatch"
    assert (await alice.request("GET", f"/blobs/{b3(data)}")).status == 404
    assert (await usage(alice))["used_bytes"] == 0
    assert (await status_of(alice, session))["missing"] == []
    assert tmp_files(alice.data_dir) == []


async def test_sha256_declared_hash_is_accepted(alice: Api) -> None:
    data = payload(CHUNK + 1)
    session = await create(alice, data, hash="sha256:" + hashlib.sha256(data).hexdigest())
    for idx in (0, 1):
        await send(alice, session, idx, chunk_of(data, idx))
    resp = await alice.request("POST", f"/uploads/{session['id']}/complete")
    assert resp.status == 201 and (await resp.json())["hash"] == b3(data)


async def test_limits_are_checked_and_reserved_at_creation(server) -> None:
    login = await server(limits={"max_blob_size": 10_000},
                         quotas={"default": {"max_bytes": 10_000}})
    alice = await login("alice")
    resp = await alice.request("POST", "/uploads", json={"size": 10_001})
    assert resp.status == 413 and (await resp.json())["error"] == "too_large"

    first = await create(alice, payload(6_000))
    # Together the two would overshoot the quota: the second is refused.
    resp = await alice.request("POST", "/uploads", json={"size": 6_000})
    assert resp.status == 507 and (await resp.json())["error"] == "quota_exceeded"
    # Nor can a plain PUT take the room a session holds.
    resp = await alice.put(payload(5_000, seed=2))
    assert resp.status == 507
    assert (await alice.request("DELETE", f"/uploads/{first['id']}")).status == 204
    assert (await usage(alice))["reserved_bytes"] == 0
    await create(alice, payload(6_000))


async def test_session_count_is_limited(server) -> None:
    alice = await (await server(uploads={"max_sessions_per_owner": 2}))("alice")
    await create(alice, payload(10))
    await create(alice, payload(10))
    resp = await alice.request("POST", "/uploads", json={"size": 10})
    assert resp.status == 507


async def test_another_owners_session_is_404(server) -> None:
    login = await server()
    alice, bob = await login("alice"), await login("bob")
    data = payload(CHUNK)
    session = await create(alice, data)
    sid = session["id"]
    for method, path, body in [("GET", f"/uploads/{sid}", None),
                               ("PUT", f"/uploads/{sid}/0", data),
                               ("POST", f"/uploads/{sid}/complete", None),
                               ("DELETE", f"/uploads/{sid}", None),
                               ("GET", "/uploads/..%2F..%2Findex.sqlite3", None)]:
        resp = await bob.request(method, path, data=body)
        assert resp.status == 404, (method, path)
    assert (await bob.request("GET", "/uploads")).status == 200
    assert (await (await bob.request("GET", "/uploads")).json())["uploads"] == []
    assert (await status_of(alice, session))["received"] == []


async def test_abort_removes_the_session_and_its_file(alice: Api) -> None:
    data = payload(2 * CHUNK)
    session = await create(alice, data)
    await send(alice, session, 0, chunk_of(data, 0))
    path = alice.data_dir / "uploads" / session["id"]
    assert path.exists()
    assert (await alice.request("DELETE", f"/uploads/{session['id']}")).status == 204
    assert not path.exists()
    assert (await alice.request("GET", f"/uploads/{session['id']}")).status == 404
    assert (await usage(alice))["reserved_bytes"] == 0


async def test_expired_sessions_and_stray_files_are_swept(alice: Api) -> None:
    data = payload(2 * CHUNK)
    session = await create(alice, data)
    before = (await status_of(alice, session))["expires_at"]
    await asyncio.sleep(0.01)
    await send(alice, session, 0, chunk_of(data, 0))
    # Progress keeps a session alive: expiry slides with every chunk.
    assert (await status_of(alice, session))["expires_at"] > before
    stray = alice.data_dir / "uploads" / "0123abc"
    stray.write_bytes(b"left by a crash")
    store = alice.store

    assert await sweep_sessions(store) == 0  # nothing has expired yet
    ttl = store.config.uploads.session_ttl_seconds
    assert await sweep_sessions(store, now=time.time() + ttl + 3600) == 2
    assert sorted(os.listdir(alice.data_dir / "uploads")) == []
    assert (await alice.request("GET", f"/uploads/{session['id']}")).status == 404
    assert (await usage(alice))["reserved_bytes"] == 0


async def test_a_session_whose_file_was_never_made_is_swept(alice: Api) -> None:
    """With workers = N a worker killed between a session's row and its
    file left a session nobody could see or delete, its bytes reserved
    until it expired (found by the crash campaign). The sweeper gives a
    fresh one time to get its file, then removes it."""
    data = payload(2 * CHUNK)
    session = await create(alice, data)
    kept = await create(alice, payload(CHUNK))
    (alice.data_dir / "uploads" / session["id"]).unlink()   # as the kill leaves it
    store = alice.store
    assert await sweep_sessions(store) == 0     # it may be getting its file now
    assert (await usage(alice))["reserved_bytes"] == len(data) + CHUNK
    assert await sweep_sessions(store, now=time.time() + 3600) == 1
    assert (await usage(alice))["reserved_bytes"] == CHUNK
    assert (await alice.request("GET", f"/uploads/{session['id']}")).status == 404
    assert (await status_of(alice, kept))["missing"] == [0]


async def test_known_hash_skips_the_upload(alice: Api) -> None:
    """API.md's answer (201, a session) with nothing left to send: the
    reference is the caller's at once, and the completion answers like a
    PUT of known content."""
    data = payload(3 * CHUNK)
    assert (await alice.put(data)).status == 201
    before = await usage(alice)
    resp = await alice.request("POST", "/uploads", json={
        "size": len(data), "hash": b3(data), "ref": "again", "chunk_size": CHUNK})
    assert resp.status == 201
    session = await resp.json()
    assert resp.headers["Location"] == f"/uploads/{session['id']}"
    assert session["chunks"] == 3 and session["chunk_size"] == CHUNK
    assert session["missing"] == [] and session["received"] == [0, 1, 2]
    assert session["blob_hash"] == b3(data) and session["expires_at"]
    assert (await alice.request("GET", "/refs/again")).status == 200
    assert (await status_of(alice, session))["missing"] == []
    # Nothing reserved, nothing charged twice, not listed as open.
    after = await usage(alice)
    assert after["reserved_bytes"] == 0 and after["used_bytes"] == before["used_bytes"]
    assert after["monthly_upload_bytes"] == before["monthly_upload_bytes"]
    listing = await (await alice.request("GET", "/uploads")).json()
    assert listing["uploads"] == []
    done = await alice.request("POST", f"/uploads/{session['id']}/complete")
    assert done.status == 200
    body = await done.json()
    assert body["hash"] == b3(data) and body["created"] is False and body["ref"] == "again"


async def test_a_client_that_sends_chunks_anyway_gets_the_blob(alice: Api) -> None:
    """A client written from API.md alone sends every chunk, then completes:
    each chunk is answered 204 (its bytes are not kept), a wrong index or
    length is still 400."""
    data = payload(2 * CHUNK + 5)
    assert (await alice.put(data)).status == 201
    session = await (await alice.request("POST", "/uploads", json={
        "size": len(data), "hash": b3(data), "chunk_size": CHUNK})).json()
    for idx in range(3):
        piece = data[idx * CHUNK:(idx + 1) * CHUNK]
        resp = await alice.request("PUT", f"/uploads/{session['id']}/{idx}", data=piece)
        assert resp.status == 204, await resp.text()
    wrong = await alice.request("PUT", f"/uploads/{session['id']}/3", data=b"x")
    assert wrong.status == 400
    short = await alice.request("PUT", f"/uploads/{session['id']}/0", data=b"x")
    assert short.status == 400
    done = await alice.request("POST", f"/uploads/{session['id']}/complete")
    assert done.status == 200 and (await done.json())["hash"] == b3(data)
    assert not list((alice.data_dir / "uploads").iterdir())


@pytest.mark.parametrize("known", [False, True], ids=["new", "known hash"])
async def test_an_unknown_field_is_400_naming_it(alice: Api, known: bool) -> None:
    """A misspelt field would otherwise be dropped without a word: the
    session made without its chunk size, the blob without its reference."""
    data = payload(3)
    body = {"size": 3, "chunksize": 1, "reference": "memos:x"}
    if known:
        assert (await alice.put(data)).status == 201
        body["hash"] = b3(data)
    resp = await alice.request("POST", "/uploads", json=body)
    assert resp.status == 400
    error = await resp.json()
    assert error["error"] == "bad_request"
    assert error["message"].startswith("unknown field 'chunksize'; expected some of size,")
    assert (await (await alice.request("GET", "/uploads")).json())["uploads"] == []
    assert (await alice.request("GET", "/refs/memos:x")).status == 404
    assert (await usage(alice))["reserved_bytes"] == 0


async def test_complete_twice_answers_the_same_blob(alice: Api) -> None:
    data = payload(CHUNK)
    session = await create(alice, data)
    await send(alice, session, 0, data)
    first = await alice.request("POST", f"/uploads/{session['id']}/complete")
    second = await alice.request("POST", f"/uploads/{session['id']}/complete")
    assert first.status == 201 and second.status == 200
    assert (await second.json())["hash"] == (await first.json())["hash"] == b3(data)
    # A chunk sent again after the completion is as harmless as before it.
    await send(alice, session, 0, data[::-1])
    again = await alice.request("POST", f"/uploads/{session['id']}/complete")
    assert again.status == 200 and (await again.json())["hash"] == b3(data)


async def test_listing_shows_open_sessions_for_resuming(alice: Api) -> None:
    data = payload(3 * CHUNK)
    session = await create(alice, data, hash=b3(data))
    await send(alice, session, 2, chunk_of(data, 2))
    listing = (await (await alice.request("GET", "/uploads")).json())["uploads"]
    assert [(s["id"], s["hash"], s["size"], s["missing"]) for s in listing] == [
        (session["id"], b3(data), len(data), [0, 1])]


async def test_server_chooses_the_chunk_size(alice: Api) -> None:
    sizes = {1 << 20: 1 << 20, 30 << 20: 5 << 20, 200 << 20: 10 << 20}
    for size, chunk in sizes.items():
        resp = await alice.request("POST", "/uploads", json={"size": size})
        body = await resp.json()
        assert resp.status == 201 and body["chunk_size"] == chunk
        assert (await alice.request("DELETE", f"/uploads/{body['id']}")).status == 204


async def test_a_session_has_at_most_10000_chunks(server) -> None:
    """Found by review: 1-byte chunks made sessions of 100,000 entries for
    100 kB of quota each, and GET /uploads of 100 of them was 69 MB of
    JSON built on the event loop (10 at once took ~4 GB)."""
    login = await server(limits={"max_blob_size": 200 << 30},
                         quotas={"default": {"max_bytes": 500 << 30,
                                             "max_monthly_upload_bytes": 500 << 30}},
                         storage={"min_free_bytes": 0})
    alice = await login("alice")
    refused = await alice.request("POST", "/uploads", json={"size": 10_001, "chunk_size": 1})
    assert refused.status == 400
    assert "more than 10000 chunks" in (await refused.json())["message"]
    made = await alice.request("POST", "/uploads", json={"size": 10_000, "chunk_size": 1})
    assert made.status == 201 and (await made.json())["chunks"] == 10_000
    assert sessions.pick_chunk_size(150 << 30) * 10_000 >= 150 << 30
    assert sessions.pick_chunk_size(150 << 30) % (1 << 20) == 0


async def test_deeply_nested_json_is_400_not_500(alice: Api) -> None:
    resp = await alice.request("POST", "/uploads", data=b"[" * 30_000 + b"]" * 30_000,
                               headers={"Content-Type": "application/json"})
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"] == "bad_request"


@pytest.mark.parametrize("chunk_size", [0, -1, 64 * 1024 * 1024 + 1, "1024", 1.5, True])
async def test_a_bad_chunk_size_is_400(alice: Api, chunk_size: object) -> None:
    resp = await alice.request("POST", "/uploads", json={"size": 10, "chunk_size": chunk_size})
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"
    assert (await (await alice.request("GET", "/uploads")).json())["uploads"] == []


async def test_zero_byte_upload(alice: Api) -> None:
    session = await create(alice, b"")
    assert session["chunks"] == 0
    resp = await alice.request("POST", f"/uploads/{session['id']}/complete")
    assert resp.status == 201 and (await resp.json())["hash"] == b3(b"")


async def test_read_only_token_cannot_upload(server) -> None:
    reader = await (await server())("alice", "read")
    resp = await reader.request("POST", "/uploads", json={"size": 10})
    assert resp.status == 403


def test_sessions_survive_a_restart(tmp_path: Path) -> None:
    data = payload(4 * CHUNK + 10)
    with BlobdServer(tmp_path, {"storage": {"fsync": True}}) as server:
        token = server.token("alice")
        status, raw = request("POST", server.url + "/uploads", token, json.dumps(
            {"size": len(data), "chunk_size": CHUNK}).encode())
        assert status == 201
        sid = json.loads(raw)["id"]
        for idx in (0, 4):
            assert request("PUT", f"{server.url}/uploads/{sid}/{idx}", token,
                           chunk_of(data, idx))[0] == 204
        server.kill9()
        server.start()
        status, raw = request("GET", f"{server.url}/uploads/{sid}", token)
        assert status == 200 and json.loads(raw)["missing"] == [1, 2, 3]
        for idx in (1, 2, 3):
            assert request("PUT", f"{server.url}/uploads/{sid}/{idx}", token,
                           chunk_of(data, idx))[0] == 204
        status, raw = request("POST", f"{server.url}/uploads/{sid}/complete", token)
        assert status == 201, raw
        assert request("GET", f"{server.url}/blobs/{b3(data)}", token) == (200, data)


def test_tus_offsets_survive_a_restart(tmp_path: Path) -> None:
    data = payload(5000, seed=9)
    with BlobdServer(tmp_path, {"storage": {"fsync": True}}) as server:
        token = server.token("alice")
        tus = {"Authorization": f"Bearer {token}", "Tus-Resumable": "1.0.0"}
        created = http("POST", server.url + "/tus/", {**tus, "Upload-Length": "5000"})
        url = server.url + created.headers["Location"]
        patch = {**tus, "Content-Type": "application/offset+octet-stream"}
        assert http("PATCH", url, {**patch, "Upload-Offset": "0"}, data[:3000]).status == 204
        server.kill9()
        server.start()
        url = server.url + created.headers["Location"]
        assert http("HEAD", url, tus).headers["Upload-Offset"] == "3000"
        done = http("PATCH", url, {**patch, "Upload-Offset": "3000"}, data[3000:])
        assert done.headers["Blob-Hash"] == b3(data)


def http(method: str, url: str, headers: dict, body: bytes | None = None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()
        return resp


def test_a_huge_chunk_streams_through_bounded_memory(tmp_path: Path) -> None:
    size = 48 << 20
    piece = payload(1 << 20, seed=3)
    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        token = server.token("alice")
        status, raw = request("POST", server.url + "/uploads", token, json.dumps(
            {"size": size, "chunk_size": size}).encode())
        sid = json.loads(raw)["id"]
        baseline = server.rss()
        with server.sample_rss():
            req = urllib.request.Request(
                f"{server.url}/uploads/{sid}/0", method="PUT",
                data=(piece for _ in range(size >> 20)),
                headers={"Authorization": f"Bearer {token}",
                         "Content-Length": str(size)})
            with urllib.request.urlopen(req, timeout=60) as resp:
                assert resp.status == 204
        # The chunk went to disk in pieces: the server never held it.
        assert server.rss_peak - baseline < 24 << 20, server.rss_peak - baseline
        status, raw = request("POST", f"{server.url}/uploads/{sid}/complete", token)
        assert status == 201 and json.loads(raw)["size"] == size


async def test_expect_continue_invites_only_a_chunk_that_fits(alice: Api) -> None:
    data = payload(2 * CHUNK)
    session = await create(alice, data)
    head = {**alice.headers(), "Expect": "100-continue"}
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    try:
        await conn.send_head("PUT", f"/uploads/{session['id']}/1",
                             {**head, "Content-Length": str(CHUNK + 5)})
        refused = await conn.read_response()
        assert refused.status == 400  # at once, no 100 Continue first
    finally:
        await conn.close()
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    try:
        await conn.send_head("PUT", f"/uploads/{session['id']}/1",
                             {**head, "Content-Length": str(CHUNK)})
        assert (await conn.read_response()).status == 100
        await conn.send(chunk_of(data, 1))
        assert (await conn.read_response()).status == 204
    finally:
        await conn.close()
    assert (await status_of(alice, session))["received"] == [1]


async def first_500_bytes_of_chunk_0(api: Api, session: dict, data: bytes) -> RawConnection:
    """A copy of chunk 0 whose sender's network vanished after 500 bytes."""
    conn = await RawConnection.open(api.client.host, api.client.port)
    await conn.send_head("PUT", f"/uploads/{session['id']}/0", {
        **api.headers(), "Content-Length": str(CHUNK)})
    await conn.send(data[:500])
    return conn


async def test_a_chunk_whose_body_stops_coming_lets_go_of_its_range(server) -> None:
    """A phone's network vanishes mid-chunk without a FIN: after
    [uploads] idle_timeout_seconds the request ends, and lets the chunk go."""
    login = await server(uploads={"idle_timeout_seconds": 1.5})
    alice = await login()
    data = payload(CHUNK)
    session = await create(alice, data)
    conn = await first_500_bytes_of_chunk_0(alice, session, data)
    try:
        stalled = await conn.read_response(timeout=5)
        assert stalled.status == 400 and "no bytes" in stalled.json()["message"]
    finally:
        await conn.close()
    await send(alice, session, 0, data)
    done = await alice.request("POST", f"/uploads/{session['id']}/complete")
    assert done.status == 201 and (await done.json())["hash"] == b3(data)


async def test_a_new_copy_of_a_chunk_takes_it_over_from_a_stalled_one(alice: Api) -> None:
    """Found by review: the resumed copy was refused (409) until the stalled
    one's idle timeout, 60 s, and `blobd put` sent the whole chunk again
    every second meanwhile. Now the new copy asks the old to let go."""
    data = payload(CHUNK)
    session = await create(alice, data)
    conn = await first_500_bytes_of_chunk_0(alice, session, data)
    try:
        await asyncio.sleep(0.3)  # its handler has the chunk's range by now
        started = time.monotonic()
        await send(alice, session, 0, data)
        assert time.monotonic() - started < 3
        stalled = await conn.read_response(timeout=5)
        assert stalled.status == 409 and "took it over" in stalled.json()["message"]
    finally:
        await conn.close()
    done = await alice.request("POST", f"/uploads/{session['id']}/complete")
    assert done.status == 201 and (await done.json())["hash"] == b3(data)


async def test_the_client_resumes_past_a_stalled_copy_of_its_chunk(alice: Api, tmp_path) -> None:
    """An earlier try of `blobd put` stalled mid-chunk (its network gone)
    still holds that chunk on the server: the resumed upload takes it over
    at once, sending each chunk once, and never waits out the timeout."""
    data = payload(CHUNK * 2 + 10)
    path = tmp_path / "song.bin"
    path.write_bytes(data)
    session = await create(alice, data, hash=b3(data))
    conn = await first_500_bytes_of_chunk_0(alice, session, data)
    try:
        await asyncio.sleep(0.3)  # its handler has the chunk's range by now
        url = f"http://{alice.client.host}:{alice.client.port}"
        token = alice.headers()["Authorization"].removeprefix("Bearer ")
        started = time.monotonic()
        async with BlobdClient(url, token) as client:
            result = await client.upload_file(path, session_threshold=1, chunk_size=CHUNK)
        assert time.monotonic() - started < 10
    finally:
        await conn.close()
    assert result.mode == "resumed" and result.session_id == session["id"]
    assert result.sent_bytes == len(data)
    assert result.blob["hash"] == b3(data)
    got = await alice.request("GET", f"/blobs/{b3(data)}")
    assert await got.read() == data


async def test_a_session_s_content_type_is_a_media_type_or_nothing(alice: Api) -> None:
    """Stored as sent, a 60,000-character content_type was 60 kB of index
    row per session (found by review); it is normalised as PUT's is."""
    for sent, kept in [("Audio/MPEG; charset=x", "audio/mpeg"), ("a" * 60000, None),
                       ("audio/" + "x" * 128, None)]:
        resp = await alice.request("POST", "/uploads", json={"size": 10, "content_type": sent})
        body = await resp.json()
        assert resp.status == 201 and body["content_type"] == kept
        assert (await alice.request("DELETE", f"/uploads/{body['id']}")).status == 204

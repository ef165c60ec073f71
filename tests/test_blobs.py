"""The Blobs section of API.md against a real app, SQLite file and disk."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os

import pytest

from blobd.http.takeover import MIN_SIZE
from conftest import b3, blob_files, tmp_files
from rawhttp import RawConnection

DATA = os.urandom(100_000)


async def test_put_new_then_again(alice):
    resp = await alice.put(DATA)
    assert resp.status == 201
    body = await resp.json()
    digest = b3(DATA)
    assert body == {"hash": digest, "sha256": hashlib.sha256(DATA).hexdigest(),
                    "size": len(DATA), "content_type": "application/octet-stream",
                    "created": True, "ref": digest}
    assert resp.headers["Location"] == f"/blobs/{digest}"
    path = alice.data_dir / "blobs" / digest[:2] / digest[2:4] / digest
    assert path.read_bytes() == DATA
    again = await alice.put(DATA)
    assert again.status == 200
    assert (await again.json())["created"] is False
    assert blob_files(alice.data_dir) == [path]


async def test_upper_case_address_answers_lower_case(alice):
    resp = await alice.put(DATA, address=b3(DATA).upper())
    assert resp.status == 201
    assert (await resp.json())["hash"] == b3(DATA)
    get = await alice.request("GET", f"/blobs/{b3(DATA).upper()}")
    assert await get.read() == DATA


async def test_post_computes_the_address(alice):
    resp = await alice.request("POST", "/blobs", data=DATA,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 201
    body = await resp.json()
    assert body["hash"] == b3(DATA)
    assert body["content_type"] == "application/octet-stream"
    again = await alice.request("POST", "/blobs", data=DATA)
    assert again.status == 200


async def test_client_content_type_is_recorded_when_specific(alice):
    resp = await alice.put(b"hello", headers={"Content-Type": "text/plain; charset=utf-8"})
    assert (await resp.json())["content_type"] == "text/plain"
    get = await alice.request("GET", f"/blobs/{b3(b'hello')}")
    assert get.headers["Content-Type"] == "text/plain"


async def test_sha256_alias(alice):
    sha = hashlib.sha256(DATA).hexdigest()
    resp = await alice.put(DATA, address=f"sha256:{sha}")
    assert resp.status == 201
    assert (await resp.json())["hash"] == b3(DATA)
    get = await alice.request("GET", f"/blobs/sha256:{sha.upper()}.mp3")
    assert get.status == 200 and await get.read() == DATA
    meta = await alice.request("GET", f"/blobs/sha256:{sha}/meta")
    assert (await meta.json())["hash"] == b3(DATA)
    bad = await alice.put(b"other", address=f"sha256:{sha}")
    assert bad.status == 400 and (await bad.json())["error"] == "digest_mismatch"


async def test_empty_blob(alice):
    resp = await alice.put(b"")
    assert resp.status == 201
    get = await alice.request("GET", f"/blobs/{b3(b'')}")
    assert get.status == 200 and await get.read() == b""
    rng = await alice.request("GET", f"/blobs/{b3(b'')}", headers={"Range": "bytes=0-"})
    assert rng.status == 416 and rng.headers["Content-Range"] == "bytes */0"
    suffix = await alice.request("GET", f"/blobs/{b3(b'')}", headers={"Range": "bytes=-5"})
    assert suffix.status == 200 and await suffix.read() == b""


async def test_digest_mismatch_leaves_nothing(alice):
    resp = await alice.put(DATA, address=b3(b"something else"))
    assert resp.status == 400
    assert (await resp.json())["error"] == "digest_mismatch"
    assert blob_files(alice.data_dir) == []
    assert tmp_files(alice.data_dir) == []
    quota = await alice.store.db.fetchone("SELECT count(*) n FROM blobs")
    assert quota["n"] == 0
    refs = await alice.store.db.fetchone("SELECT count(*) n FROM refs")
    assert refs["n"] == 0


@pytest.mark.parametrize("address", [
    "a" * 63, "a" * 65, "g" * 64, "%2e%2e", "..%2f..%2fetc%2fpasswd", "%2e%2e%2f" + "a" * 64,
    "sha256:abc", "sha512:" + "a" * 64, "a" * 64 + ".", "a" * 64 + "/../x", "a" * 64 + "%00",
])
async def test_malformed_addresses_are_400_and_touch_nothing(alice, address):
    # Sent by hand: client libraries would normalise "%2e%2e" away.
    for method in ("GET", "PUT", "DELETE"):
        conn = await RawConnection.open(alice.client.host, alice.client.port)
        await conn.send_head(method, f"/blobs/{address}",
                             alice.headers({"Content-Length": "1"}))
        await conn.send(b"x")
        resp = await conn.read_response()
        await conn.close()
        assert resp.status == 400, (method, address, resp.status)
        assert resp.json()["error"] == "invalid_hash"
    assert blob_files(alice.data_dir) == [] and tmp_files(alice.data_dir) == []


async def test_path_traversal_never_escapes(alice, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"top secret")
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    await conn.send_head("GET", "/blobs/../../secret", alice.headers())
    resp = await conn.read_response()
    await conn.close()
    assert resp.status in (400, 404) and b"top secret" not in resp.body


async def test_get_headers_and_head(alice):
    await alice.put(DATA)
    digest = b3(DATA)
    get = await alice.request("GET", f"/blobs/{digest}")
    assert get.status == 200
    assert await get.read() == DATA
    expected = {"ETag": f'"{digest}"', "Accept-Ranges": "bytes",
                "Cache-Control": "public, max-age=31536000, immutable",
                "Content-Length": str(len(DATA)), "Content-Type": "application/octet-stream",
                "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}
    for key, value in expected.items():
        assert get.headers[key] == value
    assert get.headers["Last-Modified"].endswith("GMT")
    head = await alice.request("HEAD", f"/blobs/{digest}.mp3")
    assert head.status == 200
    for key, value in expected.items():
        assert head.headers[key] == value
    assert await head.read() == b""


@pytest.mark.parametrize("header,start,end", [
    ("bytes=0-0", 0, 0), ("bytes=10-19", 10, 19), ("bytes=99990-", 99990, 99999),
    ("bytes=-10", 99990, 99999), ("bytes=50-200000", 50, 99999),
    ("bytes=-200000", 0, 99999),
    # Empty list elements count for nothing (RFC 9110 section 5.6.1).
    ("bytes=0-9,", 0, 9), ("bytes=,-10", 99990, 99999), ("bytes=10-19 , ,", 10, 19),
    # Positions of thousands of digits (int() refuses past 4,300: it was a 500).
    ("bytes=10-" + "9" * 5000, 10, 99999), ("bytes=-" + "9" * 5000, 0, 99999),
])
async def test_ranges(alice, header, start, end):
    await alice.put(DATA)
    resp = await alice.request("GET", f"/blobs/{b3(DATA)}", headers={"Range": header})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{len(DATA)}"
    assert await resp.read() == DATA[start:end + 1]


@pytest.mark.parametrize("header", ["bytes=100000-", "bytes=200000-300000", "bytes=-0",
                                    "bytes=" + "9" * 5000 + "-"])
async def test_unsatisfiable_ranges(alice, header):
    await alice.put(DATA)
    resp = await alice.request("GET", f"/blobs/{b3(DATA)}", headers={"Range": header})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{len(DATA)}"
    assert (await resp.json())["error"] == "bad_range"


@pytest.mark.parametrize("header", ["items=0-5", "bytes=5-2", "bytes=0-1,5-6", "bytes=x-",
                                    "bytes=0-1,,5-6", "bytes=,", "bytes=100000-,200000-",
                                    "bytes=" + "9" * 5000 + "-10"])
async def test_ignorable_range_headers_give_the_whole_blob(alice, header):
    await alice.put(DATA)
    resp = await alice.request("GET", f"/blobs/{b3(DATA)}", headers={"Range": header})
    assert resp.status == 200 and await resp.read() == DATA


async def test_if_range(alice):
    await alice.put(DATA)
    digest = b3(DATA)
    same = await alice.request("GET", f"/blobs/{digest}",
                               headers={"Range": "bytes=0-9", "If-Range": f'"{digest}"'})
    assert same.status == 206
    other = await alice.request("GET", f"/blobs/{digest}",
                                headers={"Range": "bytes=0-9", "If-Range": '"nope"'})
    assert other.status == 200 and len(await other.read()) == len(DATA)


@pytest.mark.parametrize("tag", ['"{}"', 'W/"{}"', '"x", "{}"', "*"])
async def test_if_none_match_gives_304(alice, tag):
    await alice.put(DATA)
    digest = b3(DATA)
    resp = await alice.request("GET", f"/blobs/{digest}",
                               headers={"If-None-Match": tag.format(digest)})
    assert resp.status == 304
    assert resp.headers["ETag"] == f'"{digest}"'
    miss = await alice.request("GET", f"/blobs/{digest}", headers={"If-None-Match": '"x"'})
    assert miss.status == 200


async def test_unknown_blob_is_404(alice):
    for path in (f"/blobs/{b3(b'nope')}", f"/blobs/{b3(b'nope')}/meta"):
        resp = await alice.request("GET", path)
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"
    head = await alice.request("HEAD", f"/blobs/{b3(b'nope')}")
    assert head.status == 404


async def test_meta(alice):
    await alice.put(DATA)
    resp = await alice.request("GET", f"/blobs/{b3(DATA)}/meta")
    meta = await resp.json()
    assert meta["hash"] == b3(DATA) and meta["size"] == len(DATA)
    assert meta["sha256"] == hashlib.sha256(DATA).hexdigest()
    assert meta["refcount"] == 1 and meta["audio"] is None
    assert meta["mirror"] == {"state": "off"}
    assert meta["created_at"].endswith("Z")


async def test_delete_drops_all_of_the_callers_references(server):
    login = await server()
    alice, bob = await login("alice"), await login("bob")
    digest = b3(DATA)
    await alice.put(DATA)
    await alice.put(DATA, headers={"Blob-Ref": "song.mp3"})
    await bob.put(DATA)
    meta = await (await alice.request("GET", f"/blobs/{digest}/meta")).json()
    assert meta["refcount"] == 3
    resp = await alice.request("DELETE", f"/blobs/{digest}")
    assert resp.status == 204
    assert (await alice.request("GET", "/refs/song.mp3")).status == 404
    meta = await (await bob.request("GET", f"/blobs/{digest}/meta")).json()
    assert meta["refcount"] == 1
    assert (await alice.request("DELETE", f"/blobs/{digest}")).status == 404
    assert len(blob_files(alice.data_dir)) == 1
    assert (await bob.request("DELETE", f"/blobs/{digest}")).status == 204
    assert blob_files(alice.data_dir) == [] and tmp_files(alice.data_dir) == []
    assert (await bob.request("GET", f"/blobs/{digest}")).status == 404


async def test_delete_unknown_is_404(alice):
    resp = await alice.request("DELETE", f"/blobs/{b3(b'never')}")
    assert resp.status == 404 and (await resp.json())["error"] == "not_found"


async def test_listing_is_newest_first_with_a_cursor(alice):
    bodies = [f"blob {i}".encode() for i in range(6)]
    for body in bodies:
        assert (await alice.put(body)).status == 201
    seen, sizes, cursor = [], [], None
    while True:
        query = "?limit=3" + (f"&after={cursor}" if cursor else "")
        page = await (await alice.request("GET", f"/blobs{query}")).json()
        seen += [b["hash"] for b in page["blobs"]]
        sizes.append(len(page["blobs"]))
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [b3(b) for b in reversed(bodies)]
    assert sizes == [3, 3]  # an exactly full last page says there is no next one
    bad = await alice.request("GET", "/blobs?limit=0")
    assert bad.status == 400


async def test_listing_is_private(server):
    login = await server()
    alice, bob = await login("alice"), await login("bob")
    await alice.put(b"alice's")
    page = await (await bob.request("GET", "/blobs")).json()
    assert page == {"blobs": [], "next": None}


async def test_invalid_blob_ref_stores_nothing(alice):
    resp = await alice.put(DATA, headers={"Blob-Ref": "bad/name"})
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"
    assert blob_files(alice.data_dir) == []


async def test_blob_ref_header_names_the_reference(alice):
    resp = await alice.put(DATA, headers={"Blob-Ref": "voice:2026-11-21@home"})
    assert (await resp.json())["ref"] == "voice:2026-11-21@home"
    ref = await (await alice.request("GET", "/refs/voice:2026-11-21@home")).json()
    assert ref["hash"] == b3(DATA)


async def test_expect_continue_skips_the_upload_of_a_stored_blob(alice):
    await alice.put(DATA)
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    await conn.send_head("PUT", f"/blobs/{b3(DATA)}", alice.headers({
        "Content-Length": str(len(DATA)), "Expect": "100-continue",
        "Blob-Ref": "again"}))
    resp = await conn.read_response()  # no body was sent
    await conn.close()
    assert resp.status == 200
    assert resp.json()["created"] is False and resp.json()["ref"] == "again"


# The larger body is read off the socket (blobd.sockbody) once 100 is sent.
@pytest.mark.parametrize("size", [len(DATA), MIN_SIZE + 1])
async def test_expect_continue_for_a_new_blob_sends_100(alice, size):
    data = DATA if size == len(DATA) else os.urandom(size)
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    await conn.send_head("PUT", f"/blobs/{b3(data)}", alice.headers({
        "Content-Length": str(len(data)), "Expect": "100-continue"}))
    interim = await conn.read_response()
    assert interim.status == 100
    await conn.send(data)
    final = await conn.read_response(timeout=30)
    await conn.close()
    assert final.status == 201 and final.json()["hash"] == b3(data)
    got = await alice.request("GET", f"/blobs/{b3(data)}")
    assert await got.read() == data


async def test_expect_continue_rejects_before_the_body(server):
    login = await server(limits={"max_blob_size": 1000})
    alice = await login("alice")
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    await conn.send_head("PUT", f"/blobs/{b3(DATA)}", alice.headers({
        "Content-Length": str(len(DATA)), "Expect": "100-continue"}))
    resp = await conn.read_response()
    await conn.close()
    assert resp.status == 413 and resp.json()["error"] == "too_large"


async def test_too_large_from_content_length_and_while_streaming(server):
    login = await server(limits={"max_blob_size": 1000})
    alice = await login("alice")
    resp = await alice.put(b"x" * 1001)
    assert resp.status == 413 and (await resp.json())["error"] == "too_large"

    async def chunked():
        for _ in range(5):
            yield b"y" * 400
    resp = await alice.request("POST", "/blobs", data=chunked())
    assert resp.status == 413
    assert blob_files(alice.data_dir) == [] and tmp_files(alice.data_dir) == []
    ok = await alice.put(b"z" * 1000)
    assert ok.status == 201


async def test_truncated_body_stores_nothing(alice):
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    await conn.send_head("PUT", f"/blobs/{b3(DATA)}", alice.headers({
        "Content-Length": str(len(DATA))}))
    await conn.send(DATA[:50_000])
    await conn.close()
    for _ in range(50):
        await asyncio.sleep(0.02)
        if not tmp_files(alice.data_dir):
            break
    assert tmp_files(alice.data_dir) == [] and blob_files(alice.data_dir) == []
    rows = await alice.store.db.fetchone("SELECT count(*) n FROM blobs")
    assert rows["n"] == 0


async def test_chunked_upload(alice):
    async def body():
        for i in range(0, len(DATA), 7000):
            yield DATA[i:i + 7000]
    resp = await alice.request("PUT", f"/blobs/{b3(DATA)}", data=body())
    assert resp.status == 201


async def test_unknown_route_is_json_404(alice):
    resp = await alice.request("GET", "/nothing-here")
    assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    resp = await alice.request("PATCH", f"/blobs/{b3(DATA)}")
    assert resp.status == 405


@pytest.mark.parametrize("size", [50_000, MIN_SIZE + 1000])
async def test_content_encoded_body_is_stored_decoded(alice, size):
    """A gzip-encoded upload stores the decoded bytes, under their hash,
    whether or not the encoded body is large enough to be read off the
    socket (it never is: aiohttp decodes it)."""
    data = os.urandom(size)
    encoded = gzip.compress(data, compresslevel=1)
    resp = await alice.request("PUT", f"/blobs/{b3(data)}", data=encoded,
                               headers={"Content-Encoding": "gzip"})
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["size"] == len(data)
    got = await alice.request("GET", f"/blobs/{b3(data)}")
    assert await got.read() == data
    posted = await alice.request("POST", "/blobs", data=gzip.compress(data[::-1]),
                                 headers={"Content-Encoding": "gzip"})
    assert posted.status == 201 and (await posted.json())["hash"] == b3(data[::-1])


async def test_get_racing_the_delete_of_the_last_reference_is_200_or_404(alice):
    """The GET finds the row, the DELETE moves the file out and commits,
    the GET opens nothing: the blob is gone, not damaged (never a 500)."""
    data = os.urandom(4096)
    digest = b3(data)
    seen: dict[int, int] = {}
    stop = asyncio.get_running_loop().time() + 4

    async def churn():
        while asyncio.get_running_loop().time() < stop:
            (await alice.put(data)).release()
            (await alice.request("DELETE", f"/blobs/{digest}")).release()

    async def read():
        while asyncio.get_running_loop().time() < stop:
            resp = await alice.request("GET", f"/blobs/{digest}")
            await resp.read()
            seen[resp.status] = seen.get(resp.status, 0) + 1

    await asyncio.gather(churn(), *(read() for _ in range(6)))
    assert set(seen) <= {200, 404} and seen.get(200) and seen.get(404), seen


@pytest.mark.parametrize("size", [100_000, 16 << 20], ids=["aiohttp-read", "socket-read"])
async def test_an_upload_whose_body_stops_coming_ends_and_leaves_nothing(server, size):
    """Found by review: a PUT or POST body that stopped coming held its
    connection (and, read off the socket, one of the server's slots for
    such bodies) until TCP gave up; now [uploads] idle_timeout_seconds."""
    alice = await (await server(uploads={"idle_timeout_seconds": 1.0}))("alice")
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    try:
        await conn.send_head("POST", "/blobs", {**alice.headers(),
                                                "Content-Length": str(size)})
        await conn.send(os.urandom(50_000))
        stalled = await conn.read_response(timeout=10)
    finally:
        await conn.close()
    assert stalled.status == 400 and "no bytes of the body came for 1 s" in stalled.json()["message"]
    assert blob_files(alice.data_dir) == [] and tmp_files(alice.data_dir) == []
    quota = await (await alice.request("GET", "/quota")).json()
    assert quota["used_bytes"] == 0 and quota["reserved_bytes"] == 0

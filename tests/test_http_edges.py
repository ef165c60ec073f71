"""Requests real clients (and careless or hostile ones) send at the edges
of API.md: malformed numbers and headers, Expect, If-Range, encodings,
paths no route has. Each must get the contract's JSON error, never a 500,
and leave nothing behind."""

from __future__ import annotations

import asyncio
import base64
import gzip
import os

import pytest

from conftest import b3, blob_files, tmp_files
from rawhttp import RawConnection

DATA = os.urandom(10_000)
TUS = {"Tus-Resumable": "1.0.0"}


async def _usage(api) -> dict:
    resp = await api.request("GET", "/quota")
    return await resp.json()


async def _raw(api) -> RawConnection:
    return await RawConnection.open(api.client.host, api.client.port)


# ---------------------------------------------------------------- Expect


async def _announce(api, digest: str, length: int):
    """A PUT that announces its size and waits for 100 Continue; the first answer."""
    conn = await _raw(api)
    try:
        await conn.send_head("PUT", f"/blobs/{digest}", {
            **api.headers(), "Content-Length": str(length), "Expect": "100-continue"})
        return await conn.read_response()
    finally:
        await conn.close()


async def test_expect_shortcut_is_not_taken_for_a_body_of_another_size(alice):
    """Content-Length says the bytes are not the stored blob: they are read
    and refused as any wrong body is, never answered with the blob's 200."""
    await alice.put(DATA)
    before = await _usage(alice)
    other = os.urandom(len(DATA) + 1)
    conn = await _raw(alice)
    try:
        await conn.send_head("PUT", f"/blobs/{b3(DATA)}", {
            **alice.headers(), "Content-Length": str(len(other)), "Expect": "100-continue",
            "Blob-Ref": "mine"})
        assert (await conn.read_response()).status == 100
        await conn.send(other)
        resp = await conn.read_response()
    finally:
        await conn.close()
    assert resp.status == 400 and resp.json()["error"] == "digest_mismatch"
    assert (await alice.request("GET", "/refs/mine")).status == 404
    assert await _usage(alice) == before
    assert tmp_files(alice.data_dir) == []


async def test_expect_shortcut_still_checks_the_size_limit(server):
    login = await server(limits={"max_blob_size": 1 << 20})
    alice = await login()
    await alice.put(DATA)
    resp = await _announce(alice, b3(DATA), 1 << 30)
    assert resp.status == 413 and resp.json()["error"] == "too_large"


async def test_expect_shortcut_with_the_right_size_skips_the_body(alice):
    await alice.put(DATA)
    resp = await _announce(alice, b3(DATA), len(DATA))
    assert resp.status == 200 and resp.headers["connection"] == "close"


async def test_an_error_before_100_continue_closes_the_connection(alice):
    """The client may send the body after all; it must never be parsed as
    the connection's next request."""
    conn = await _raw(alice)
    try:
        await conn.send_head("PUT", f"/blobs/{b3(DATA)}", {
            "Authorization": "Bearer wrong", "Content-Length": str(len(DATA)),
            "Expect": "100-continue"})
        resp = await conn.read_response()
        assert resp.status == 401 and resp.headers["connection"] == "close"
        await conn.send(DATA)
        assert await asyncio.wait_for(conn.reader.read(), 5) == b""  # closed, nothing more
    finally:
        await conn.close()


async def test_expect_100_continue_is_ignored_in_http_1_0(alice):
    """RFC 9110 section 10.1.1: the body simply follows; no 417."""
    conn = await _raw(alice)
    try:
        head = ["POST /blobs HTTP/1.0", "Host: test",
                f"Authorization: Bearer {alice.token}", f"Content-Length: {len(DATA)}",
                "Expect: 100-continue"]
        await conn.send(("\r\n".join(head) + "\r\n\r\n").encode() + DATA)
        resp = await conn.read_response()
    finally:
        await conn.close()
    assert resp.status == 201 and resp.json()["hash"] == b3(DATA)


@pytest.mark.parametrize("method, path, extra", [
    ("PUT", f"/blobs/{b3(DATA)}", {}),
    ("POST", "/blobs", {}),
    ("POST", "/tus/", {**TUS, "Upload-Length": str(len(DATA)),
                       "Content-Type": "application/offset+octet-stream"}),
    ("GET", "/quota", {}),
], ids=["put", "post", "tus-creation", "get"])
async def test_an_unmeetable_expect_is_417_expectation_failed(alice, method, path, extra):
    """Found by review: the 417 said bad_request, a code whose status is
    400. Each code has one status; 417 has its own code."""
    conn = await _raw(alice)
    try:
        length = 0 if method == "GET" else len(DATA)
        await conn.send_head(method, path, {
            **alice.headers(), **extra, "Content-Length": str(length), "Expect": "200-ok"})
        resp = await conn.read_response()
    finally:
        await conn.close()
    assert resp.status == 417 and resp.json()["error"] == "expectation_failed", resp
    usage = await _usage(alice)
    assert (usage["used_bytes"], usage["reserved_bytes"]) == (0, 0)
    assert blob_files(alice.data_dir) == []


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize("if_range", ["W/\"{}\"", "garbage", "0",
                                      "Sat, 99 Nov 2026 15:05:42 GMT", ""])
async def test_if_range_that_is_no_validator_sends_the_whole_blob(alice, if_range):
    await alice.put(DATA)
    digest = b3(DATA)
    for method in ("GET", "HEAD"):
        resp = await alice.request(method, f"/blobs/{digest}", headers={
            "Range": "bytes=0-9", "If-Range": if_range.format(digest)})
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Length"] == str(len(DATA))


async def test_range_unit_is_case_insensitive(alice):
    await alice.put(DATA)
    resp = await alice.request("GET", f"/blobs/{b3(DATA)}", headers={"Range": "Bytes=0-1"})
    assert resp.status == 206 and await resp.read() == DATA[:2]


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize("path", ["/blobs?limit=%C2%B2", "/refs?limit=%C2%B2",
                                  "/blobs?after=99999999999999999999999",
                                  "/blobs?after=%C2%B2", "/refs?limit=0"])
async def test_malformed_listing_parameters_are_400(alice, path):
    resp = await alice.request("GET", path)
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"


async def test_malformed_chunk_index_is_400(alice):
    created = await alice.request("POST", "/uploads", json={"size": 10})
    upload = (await created.json())["id"]
    resp = await alice.request("PUT", f"/uploads/{upload}/%C2%B2", data=b"x" * 10)
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"


async def test_malformed_tus_numbers_are_400_with_the_tus_mark(alice):
    created = await alice.request("POST", "/tus/", headers={**TUS, "Upload-Length": "²"})
    assert created.status == 400 and created.headers["Tus-Resumable"] == "1.0.0"
    created = await alice.request("POST", "/tus/", headers={**TUS, "Upload-Length": "10"})
    location = created.headers["Location"]
    resp = await alice.request("PATCH", location, data=b"x", headers={
        **TUS, "Upload-Offset": "²", "Content-Type": "application/offset+octet-stream"})
    assert resp.status == 400 and resp.headers["Tus-Resumable"] == "1.0.0"


async def test_a_quota_beyond_64_bits_is_400(server):
    login = await server()
    admin = await login("root", "admin")
    for value in (99999999999999999999999999, "99999999999999999999 TiB"):
        resp = await admin.request("PUT", "/admin/owners/carol/quota",
                                   json={"max_bytes": value})
        assert resp.status == 400, await resp.text()
    resp = await admin.request("PUT", "/admin/owners/carol/quota",
                               json={"max_blobs": 2**63})
    assert resp.status == 400


# ---------------------------------------------------------------- bytes that are not UTF-8


async def _raw_request(api, head: bytes, body: bytes = b"") -> int:
    conn = await _raw(api)
    try:
        await conn.send(head + b"\r\n\r\n" + body)
        return (await conn.read_response()).status
    finally:
        await conn.close()


async def test_a_token_that_is_not_utf8_is_401(server):
    login = await server(auth={"anonymous_read": True})
    alice = await login()
    await alice.put(DATA)
    head = (f"GET /blobs/{b3(DATA)} HTTP/1.1\r\nHost: test\r\n"
            "Authorization: Bearer abc").encode() + b"\xff"
    assert await _raw_request(alice, head) == 401


async def test_a_content_type_that_is_no_media_type_is_not_recorded(alice):
    head = (f"POST /blobs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {alice.token}\r\n"
            f"Content-Length: {len(DATA)}\r\nContent-Type: audio/x").encode() + b"\xff"
    assert await _raw_request(alice, head, DATA) == 201
    for claimed in ("a b", "bogus", "x/y=z"):
        resp = await alice.request("POST", "/blobs", data=os.urandom(100),
                                   headers={"Content-Type": claimed})
        assert (await resp.json())["content_type"] == "application/octet-stream"


async def test_tus_metadata_that_is_not_ascii_is_400(alice):
    head = (b"POST /tus/ HTTP/1.1\r\nHost: test\r\nTus-Resumable: 1.0.0\r\n"
            b"Upload-Length: 10\r\nAuthorization: Bearer " + alice.token.encode()
            + b"\r\nUpload-Metadata: filename\xff YQ==")
    assert await _raw_request(alice, head) == 400


# ---------------------------------------------------------------- encodings


@pytest.mark.parametrize("repeat", [100, 300_000])  # the second one arrives in many reads
async def test_a_body_that_does_not_decode_is_400_and_leaves_nothing(alice, caplog, repeat):
    resp = await alice.request("POST", "/blobs", data=b"not gzip at all" * repeat,
                               headers={"Content-Encoding": "gzip"})
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"
    # The connection ends with the answer: what is left of the body is no request.
    assert resp.headers["Connection"] == "close"
    assert blob_files(alice.data_dir) == [] and tmp_files(alice.data_dir) == []
    await asyncio.sleep(0.05)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


async def test_gzip_bodies_are_stored_decoded(alice):
    resp = await alice.request("POST", "/blobs", data=gzip.compress(DATA),
                               headers={"Content-Encoding": "gzip"})
    assert resp.status == 201 and (await resp.json())["hash"] == b3(DATA)


@pytest.mark.parametrize("coding", ["foo", "compress"])
async def test_a_coding_blobd_cannot_decode_is_415(alice, coding):
    resp = await alice.request("POST", "/blobs", data=DATA,
                               headers={"Content-Encoding": coding})
    assert resp.status == 415 and (await resp.json())["error"] == "unsupported_media_type"
    assert blob_files(alice.data_dir) == []


# What the HTTP parser cannot read (br and zstd bodies among it):
# tests/test_protocol_errors.py.


# ---------------------------------------------------------------- paths and methods


@pytest.mark.parametrize("method,path", [("PUT", "/refs/a/b"), ("GET", "/refs/a/b"),
                                         ("PUT", "/refs/"), ("DELETE", "/refs/")])
async def test_reference_names_with_a_slash_or_empty_are_400(alice, method, path):
    resp = await alice.request(method, path)
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"


@pytest.mark.parametrize("method,path,allow", [
    ("PATCH", "/refs/x", "DELETE,GET,HEAD,PUT"),
    ("POST", f"/blobs/{b3(DATA)}", "DELETE,GET,HEAD,PUT"),
    ("PUT", f"/blobs/{b3(DATA)}/meta", "GET,HEAD"),
])
async def test_405_says_what_is_allowed(alice, method, path, allow):
    resp = await alice.request(method, path)
    assert resp.status == 405 and resp.headers["Allow"] == allow
    assert (await resp.json())["error"] == "method_not_allowed"


async def test_every_blob_answer_varies_on_origin_when_cors_is_on(server):
    # (Token-protected blobs vary on Authorization too: tests/test_conditional.py.)
    login = await server(server={"cors_origins": ["http://app.example"]},
                         auth={"anonymous_read": True})
    alice = await login()
    await alice.put(DATA)
    for origin in (None, "http://evil.example", "http://app.example"):
        headers = {"Origin": origin} if origin else {}
        resp = await alice.request("GET", f"/blobs/{b3(DATA)}", headers=headers)
        assert resp.status == 200
        assert resp.headers.getall("Vary") == ["Origin"], origin


async def test_cors_lets_a_page_send_gzip_and_read_retry_after_and_www_authenticate(server):
    """Found by review: a page's fetch() could not send the documented gzip
    uploads (the preflight did not allow Content-Encoding), nor read
    Retry-After (409/423 on a busy upload) or WWW-Authenticate (401)."""
    login = await server(server={"cors_origins": ["http://app.example"]})
    alice = await login()
    origin = {"Origin": "http://app.example"}
    preflight = await alice.client.options("/blobs", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-encoding"})
    allowed = {h.strip().lower()
               for h in preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert preflight.status == 204 and {"authorization", "content-encoding"} <= allowed
    stored = await alice.request("POST", "/blobs", data=gzip.compress(DATA), headers={
        **origin, "Content-Encoding": "gzip"})
    assert stored.status == 201 and (await stored.json())["hash"] == b3(DATA)
    refused = await alice.client.get("/blobs", headers=origin)
    assert refused.status == 401 and "WWW-Authenticate" in refused.headers
    for answer in (stored, refused):
        exposed = {h.strip().lower()
                   for h in answer.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"retry-after", "www-authenticate"} <= exposed


async def test_no_vary_without_cors(server):
    alice = await (await server(auth={"anonymous_read": True}))()
    await alice.put(DATA)
    resp = await alice.request("GET", f"/blobs/{b3(DATA)}")
    assert "Vary" not in resp.headers


# ---------------------------------------------------------------- sessions and tus


async def test_a_session_over_the_size_limit_is_413_whatever_its_chunking(server):
    login = await server(limits={"max_blob_size": 1 << 20})
    alice = await login()
    resp = await alice.request("POST", "/uploads", json={"size": 2_000_000_000_000})
    assert resp.status == 413 and (await resp.json())["error"] == "too_large"


async def test_tus_refuses_a_body_too_long_before_inviting_it(alice):
    created = await alice.request("POST", "/tus/", headers={**TUS, "Upload-Length": "10"})
    location = created.headers["Location"]
    conn = await _raw(alice)
    try:
        await conn.send_head("PATCH", location, {
            **alice.headers(), **TUS, "Upload-Offset": "0", "Content-Length": "5000000",
            "Content-Type": "application/offset+octet-stream", "Expect": "100-continue"})
        resp = await conn.read_response()
    finally:
        await conn.close()
    assert resp.status == 400  # not 100 Continue
    head = await alice.request("HEAD", location, headers=TUS)
    assert head.headers["Upload-Offset"] == "0"


async def test_tus_upload_whose_commit_can_never_succeed_is_removed(alice):
    """A wrong declared hash: the bytes are all there and are not that blob.
    The upload goes at once, its reservation with it."""
    wrong = base64.b64encode(b3(b"something else").encode()).decode()
    resp = await alice.request("POST", "/tus/", data=b"hello world", headers={
        **TUS, "Upload-Length": "11", "Content-Type": "application/offset+octet-stream",
        "Upload-Metadata": f"hash {wrong}"})
    assert resp.status == 400 and (await resp.json())["error"] == "digest_mismatch"
    assert "Location" not in resp.headers
    assert (await _usage(alice))["reserved_bytes"] == 0
    assert list((alice.data_dir / "uploads").iterdir()) == []


async def test_a_sha256_address_nobody_has_is_held_to_max_bytes_before_its_body(server):
    login = await server(**{"quotas": {"default": {"max_bytes": 1000}}})
    alice = await login()
    import hashlib
    body = os.urandom(600_000)
    conn = await _raw(alice)
    try:
        await conn.send_head("PUT", f"/blobs/sha256:{hashlib.sha256(body).hexdigest()}", {
            **alice.headers(), "Content-Length": str(len(body)), "Expect": "100-continue"})
        resp = await conn.read_response()
    finally:
        await conn.close()
    assert resp.status == 507 and resp.json()["error"] == "quota_exceeded"


JSON_ROUTES = [("POST", "/uploads", b'{"size": 1000, "content_type": "audio/mpeg"}', 201),
               ("PUT", "/refs/later", b'{"hash": "' + b"0" * 64 + b'"}', 404)]


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
@pytest.mark.parametrize("method, path, body, status", JSON_ROUTES, ids=["session", "ref"])
async def test_a_json_body_in_two_pieces_is_read_whole(alice, method, path, body, status,
                                                       chunked):
    """Found by the adversary review: one read returned only the first
    piece of a JSON body, so one split over two packets was 400 'not valid
    JSON'."""
    conn = await _raw(alice)
    try:
        framing = ({"Transfer-Encoding": "chunked"} if chunked
                   else {"Content-Length": str(len(body))})
        await conn.send_head(method, path, {**alice.headers(), **framing})
        first, rest = body[:10], body[10:]
        await conn.send(b"%x\r\n%s\r\n" % (len(first), first) if chunked else first)
        await asyncio.sleep(0.2)
        await conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest) if chunked else rest)
        resp = await conn.read_response()
    finally:
        await conn.close()
    assert resp.status == status, resp.body


@pytest.mark.parametrize("method, path, body, status", JSON_ROUTES, ids=["session", "ref"])
async def test_a_json_body_that_stops_coming_ends(server, method, path, body, status):
    """Found by the adversary review: a JSON body (a session, a ref, the
    admin API) that never came held its connection for as long as the
    client liked; now it ends after [uploads] idle_timeout_seconds, as an
    upload body does."""
    alice = await (await server(uploads={"idle_timeout_seconds": 1.0}))("alice")
    conn = await _raw(alice)
    try:
        await conn.send_head(method, path, {**alice.headers(),
                                            "Content-Length": str(len(body))})
        await conn.send(body[:5])
        stalled = await conn.read_response(timeout=10)
    finally:
        await conn.close()
    assert stalled.status == 400
    assert "no bytes of the body came for 1 s" in stalled.json()["message"]
    assert (await (await alice.request("GET", "/uploads")).json())["uploads"] == []


async def test_a_chunked_json_body_past_the_limit_is_413(alice):
    """However its pieces come, a JSON body over 64 KiB is 413, not a
    truncated 'not valid JSON'."""
    conn = await _raw(alice)
    try:
        await conn.send_head("POST", "/uploads", {**alice.headers(),
                                                  "Transfer-Encoding": "chunked"})
        piece = b" " * 20_000
        for _ in range(4):
            await conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            await asyncio.sleep(0.05)
        await conn.send(b"0\r\n\r\n")
        resp = await conn.read_response()
    finally:
        await conn.close()
    assert resp.status == 413, resp.body
    assert resp.json()["error"] == "too_large"

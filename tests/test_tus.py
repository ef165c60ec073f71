"""The tus 1.0.0 protocol at ``/tus/``, request by request."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os

import pytest

from blobd import files, index_sessions
from conftest import Api, b3
from rawhttp import RawConnection
from test_uploads import payload

TUS = {"Tus-Resumable": "1.0.0"}
STREAM = {"Content-Type": "application/offset+octet-stream"}


def meta(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


async def create(api: Api, length: int | None, *, status: int = 201,
                 headers: dict | None = None, data: bytes | None = None) -> str:
    extra = {**TUS, **(headers or {})}
    if length is not None:
        extra["Upload-Length"] = str(length)
    resp = await api.request("POST", "/tus/", headers=extra, data=data)
    assert resp.status == status, await resp.text()
    return resp.headers.get("Location", "")


async def patch(api: Api, url: str, offset: int, data: bytes, *, status: int = 204,
                headers: dict | None = None):
    resp = await api.request("PATCH", url, data=data, headers={
        **TUS, **STREAM, "Upload-Offset": str(offset), **(headers or {})})
    assert resp.status == status, await resp.text()
    return resp


async def head(api: Api, url: str, status: int = 200):
    resp = await api.request("HEAD", url, headers=TUS)
    assert resp.status == status
    return resp


async def test_options_describes_the_server(alice: Api) -> None:
    resp = await alice.client.options("/tus/")
    assert resp.status == 204
    assert resp.headers["Tus-Version"] == "1.0.0"
    extensions = set(resp.headers["Tus-Extension"].split(","))
    assert {"creation", "creation-with-upload", "termination", "checksum", "expiration",
            "concatenation"} <= extensions
    assert int(resp.headers["Tus-Max-Size"]) == alice.store.config.limits.max_blob_size
    assert {"sha1", "md5", "sha256"} <= set(resp.headers["Tus-Checksum-Algorithm"].split(","))
    # Found by review: the spec's own OPTIONS example answer carries it.
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    url = await create(alice, 10)
    on_upload = await alice.client.options(url)
    assert on_upload.status == 204 and on_upload.headers["Tus-Resumable"] == "1.0.0"


@pytest.mark.parametrize("version", [None, "0.2.2", "1.0"])
async def test_other_protocol_versions_are_412(alice: Api, version: str | None) -> None:
    headers = {"Upload-Length": "10"}
    if version:
        headers["Tus-Resumable"] = version
    resp = await alice.request("POST", "/tus/", headers=headers)
    assert resp.status == 412
    assert resp.headers["Tus-Version"] == "1.0.0"
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    assert (await resp.json())["error"] == "precondition_failed"


async def test_errors_carry_tus_resumable(alice: Api) -> None:
    no_token = await alice.client.post("/tus/", headers={**TUS, "Upload-Length": "1"})
    assert no_token.status == 401 and no_token.headers["Tus-Resumable"] == "1.0.0"
    unknown = await head(alice, "/tus/0123456789abcdef", status=404)
    assert unknown.headers["Tus-Resumable"] == "1.0.0"
    assert "Upload-Offset" not in unknown.headers


async def test_full_upload_commits_and_names_the_blob(alice: Api) -> None:
    data = payload(5000)
    url = await create(alice, len(data), headers={"Upload-Metadata": meta(
        filename="take 1.wav", filetype="audio/x-test", ref="takes:1", hash=b3(data))})
    assert url.startswith("/tus/")
    first = await head(alice, url)
    assert first.headers["Upload-Offset"] == "0"
    assert first.headers["Upload-Length"] == "5000"
    assert first.headers["Cache-Control"] == "no-store"
    assert "filename" in first.headers["Upload-Metadata"]
    assert "Blob-Hash" not in first.headers

    resp = await patch(alice, url, 0, data[:3000])
    assert resp.headers["Upload-Offset"] == "3000" and "Upload-Expires" in resp.headers
    assert "Blob-Hash" not in resp.headers
    resp = await patch(alice, url, 3000, data[3000:])
    assert resp.headers["Upload-Offset"] == "5000"
    assert resp.headers["Blob-Hash"] == b3(data)
    assert (await head(alice, url)).headers["Blob-Hash"] == b3(data)

    blob = await alice.request("GET", f"/blobs/{b3(data)}")
    assert await blob.read() == data and blob.content_type == "audio/x-test"
    ref = await (await alice.request("GET", "/refs/takes:1")).json()
    assert ref["hash"] == b3(data)
    assert list((alice.data_dir / "uploads").iterdir()) == []


async def test_empty_metadata_and_empty_upload(alice: Api) -> None:
    # tuspy sends an empty Upload-Metadata header.
    url = await create(alice, 0, headers={"Upload-Metadata": ""})
    resp = await head(alice, url)
    assert resp.headers["Blob-Hash"] == b3(b"")
    assert "Upload-Metadata" not in resp.headers


@pytest.mark.parametrize("headers, status", [
    ({}, 400),                                             # no length at all
    ({"Upload-Length": "-1"}, 400),
    ({"Upload-Length": "10", "Upload-Defer-Length": "1"}, 400),
    ({"Upload-Length": str(3 << 30)}, 413),                # over Tus-Max-Size
    ({"Upload-Length": "10", "Upload-Metadata": "ref"}, 201),
    ({"Upload-Length": "10", "Upload-Metadata": "ref !!!"}, 400),
    ({"Upload-Length": "10", "Upload-Metadata": meta(hash="nope")}, 400),
    ({"Upload-Length": "10", "Upload-Metadata": meta(ref="no spaces")}, 400),
    ({"Upload-Length": "10", "Upload-Concat": "whole"}, 400),
    ({"Upload-Concat": "final;http://[x/tus/abc"}, 400),  # not a URL: was a 500
])
async def test_creation_headers_are_validated(alice: Api, headers: dict, status: int) -> None:
    await create(alice, None, headers=headers, status=status)


async def test_patch_preconditions(alice: Api) -> None:
    data = payload(100)
    url = await create(alice, len(data))
    resp = await alice.request("PATCH", url, data=data, headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "application/octet-stream"})
    assert resp.status == 415
    await patch(alice, url, 10, data[10:], status=409)
    await patch(alice, url, 0, data + b"extra", status=400)
    assert (await head(alice, url)).headers["Upload-Offset"] == "0"
    await patch(alice, url, 0, data)


@pytest.mark.parametrize("algorithm", ["sha1", "md5", "sha256"])
async def test_checksum_mismatch_is_460_and_keeps_the_offset(alice: Api,
                                                             algorithm: str) -> None:
    data = payload(4000)
    url = await create(alice, len(data))

    def checksum(body: bytes) -> dict:
        digest = hashlib.new(algorithm, body).digest()
        return {"Upload-Checksum": f"{algorithm} {base64.b64encode(digest).decode()}"}

    resp = await patch(alice, url, 0, data[:2000], status=460,
                       headers=checksum(b"other bytes"))
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    assert (await head(alice, url)).headers["Upload-Offset"] == "0"
    await patch(alice, url, 0, data[:2000], headers=checksum(data[:2000]))
    resp = await patch(alice, url, 2000, data[2000:], headers=checksum(data[2000:]))
    assert resp.headers["Blob-Hash"] == b3(data)


async def test_unsupported_checksum_algorithm_is_400(alice: Api) -> None:
    url = await create(alice, 3)
    await patch(alice, url, 0, b"abc", status=400,
                headers={"Upload-Checksum": "crc32 AAAAAA=="})


async def raw_patch(api: Api, url: str, offset: int, total: int,
                    extra: dict | None = None) -> RawConnection:
    conn = await RawConnection.open(api.client.host, api.client.port)
    await conn.send_head("PATCH", url, {
        **api.headers(), **TUS, **STREAM, "Upload-Offset": str(offset),
        "Content-Length": str(total), **(extra or {})})
    return conn


async def wait_for_offset(api: Api, url: str, want: str) -> str:
    for _ in range(100):
        offset = (await head(api, url)).headers["Upload-Offset"]
        if offset == want:
            return offset
        await asyncio.sleep(0.02)
    return offset


async def test_bytes_before_a_dropped_connection_are_kept(alice: Api) -> None:
    data = payload(100_000)
    url = await create(alice, len(data))
    conn = await raw_patch(alice, url, 0, len(data))
    await conn.send(data[:30_000])
    await asyncio.sleep(0.1)
    await conn.close()
    assert await wait_for_offset(alice, url, "30000") == "30000"
    resp = await patch(alice, url, 30_000, data[30_000:])
    assert resp.headers["Blob-Hash"] == b3(data)
    assert await (await alice.request("GET", f"/blobs/{b3(data)}")).read() == data


async def test_with_a_checksum_a_dropped_body_counts_for_nothing(alice: Api) -> None:
    data = payload(50_000)
    url = await create(alice, len(data))
    digest = base64.b64encode(hashlib.sha1(data).digest()).decode()
    conn = await raw_patch(alice, url, 0, len(data), {"Upload-Checksum": f"sha1 {digest}"})
    await conn.send(data[:20_000])
    await asyncio.sleep(0.1)
    await conn.close()
    await asyncio.sleep(0.2)
    assert (await head(alice, url)).headers["Upload-Offset"] == "0"


async def test_a_second_patch_takes_the_upload_over_from_the_first(alice: Api) -> None:
    """The newer request wins (as tusd's lock release does): a client whose
    network vanished mid-PATCH resumes without waiting out the stalled
    request's idle timeout, which stock clients do not retry for (found by
    review: 423 for 60 s, tus-js-client gave up after ~10). What the older
    one received is kept; the newer one's stale offset is then refused,
    and the client resumes from HEAD's."""
    data = payload(60_000)
    url = await create(alice, len(data))
    first = await raw_patch(alice, url, 0, len(data))
    await first.send(data[:10_000])
    await asyncio.sleep(0.1)  # the first request holds the upload now
    second = await alice.request("PATCH", url, data=b"z" * 60_000, headers={
        **TUS, **STREAM, "Upload-Offset": "0"})
    assert second.status == 409, await second.text()
    assert second.headers["Tus-Resumable"] == "1.0.0"
    answer = await first.read_response()
    await first.close()
    assert answer.status == 409 and "took it over" in answer.json()["message"]
    assert (await head(alice, url)).headers["Upload-Offset"] == "10000"
    resp = await patch(alice, url, 10_000, data[10_000:])
    assert resp.headers["Blob-Hash"] == b3(data)
    assert await (await alice.request("GET", f"/blobs/{b3(data)}")).read() == data


async def test_a_patch_at_the_right_offset_resumes_past_a_stalled_one(alice: Api) -> None:
    data = payload(60_000)
    url = await create(alice, len(data))
    stalled = await raw_patch(alice, url, 0, len(data))
    try:
        await stalled.send(data[:20_000])
        await wait_for_offset(alice, url, "0")
        await asyncio.sleep(0.2)
        # The client saw 0 (nothing recorded yet); its PATCH takes over,
        # finds the 20,000 bytes kept and says so; the retry completes.
        retry = await alice.request("PATCH", url, data=data, headers={
            **TUS, **STREAM, "Upload-Offset": "0"})
        assert retry.status == 409 and "stands at 20000" in (await retry.json())["message"]
        done = await patch(alice, url, 20_000, data[20_000:])
        assert done.headers["Blob-Hash"] == b3(data)
    finally:
        await stalled.close()


async def test_a_completion_is_not_taken_over(alice: Api) -> None:
    """Only a request receiving a body lets go; one that holds the upload
    otherwise (a completion hashing it) is waited for, then 423."""
    import fcntl
    import os
    url = await create(alice, 100)
    fd = os.open(alice.data_dir / "uploads" / url.rsplit("/", 1)[1], os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        busy = await alice.request("PATCH", url, data=b"x" * 100, headers={
            **TUS, **STREAM, "Upload-Offset": "0"})
        assert busy.status == 423
    finally:
        os.close(fd)
    done = await patch(alice, url, 0, b"x" * 100)
    assert done.headers["Blob-Hash"] == b3(b"x" * 100)


async def test_method_override_and_termination(alice: Api) -> None:
    data = payload(300)
    url = await create(alice, len(data) * 2)
    resp = await alice.request("POST", url, data=data, headers={
        **TUS, **STREAM, "Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"})
    assert resp.status == 204 and resp.headers["Upload-Offset"] == "300"
    path = alice.data_dir / "uploads" / url.rsplit("/", 1)[1]
    assert path.exists()
    resp = await alice.request("POST", url, headers={**TUS, "X-HTTP-Method-Override":
                                                     "DELETE"})
    assert resp.status == 204 and await resp.read() == b""
    await head(alice, url, status=404)
    assert not path.exists()


async def test_delete_is_exactly_204(alice: Api) -> None:
    url = await create(alice, 10)
    resp = await alice.request("DELETE", url, headers=TUS)
    assert resp.status == 204 and resp.headers["Tus-Resumable"] == "1.0.0"
    assert (await alice.request("DELETE", url, headers=TUS)).status == 404


async def test_creation_with_upload(alice: Api) -> None:
    data = payload(2500)
    resp = await alice.request("POST", "/tus/", data=data, headers={
        **TUS, **STREAM, "Upload-Length": str(len(data))})
    assert resp.status == 201
    assert resp.headers["Upload-Offset"] == "2500"
    assert resp.headers["Blob-Hash"] == b3(data)
    partial = await alice.request("POST", "/tus/", data=data[:1000], headers={
        **TUS, **STREAM, "Upload-Length": str(len(data))})
    assert partial.headers["Upload-Offset"] == "1000"
    assert "Blob-Hash" not in partial.headers


async def test_deferred_length(alice: Api) -> None:
    data = payload(3000)
    url = await create(alice, None, headers={"Upload-Defer-Length": "1"})
    first = await head(alice, url)
    assert first.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in first.headers
    await patch(alice, url, 0, data[:1000])
    resp = await patch(alice, url, 1000, data[1000:],
                       headers={"Upload-Length": str(len(data))})
    assert resp.headers["Blob-Hash"] == b3(data)


async def test_a_length_set_on_a_session_gone_meanwhile_reserves_nothing(alice: Api) -> None:
    """The PATCH that fixes a deferred length read its session before a
    DELETE (or the sweeper) removed it: setting the length must find no
    row, and reserve nothing no row would ever release."""
    url = await create(alice, None, headers={"Upload-Defer-Length": "1"})
    store = alice.store
    session_id = url.rsplit("/", 1)[1]
    session = await index_sessions.get(store.db.reader, session_id, "alice", 0.0)
    assert (await alice.request("DELETE", url, headers=TUS)).status == 204
    async with store.write() as tx:
        assert await index_sessions.set_length(tx.conn, session, 4096) is False
    quota = await (await alice.request("GET", "/quota")).json()
    assert quota["reserved_bytes"] == 0


async def test_concatenation(alice: Api) -> None:
    data = payload(7000)
    parts = [data[:3000], data[3000:]]
    urls = []
    for part in parts:
        url = await create(alice, len(part), headers={"Upload-Concat": "partial"})
        resp = await patch(alice, url, 0, part)
        assert "Blob-Hash" not in resp.headers  # a part is not a blob
        urls.append(url)
    absolute = [f"http://{alice.client.host}:{alice.client.port}{urls[0]}", urls[1]]
    resp = await alice.request("POST", "/tus/", headers={
        **TUS, "Upload-Concat": "final;" + " ".join(absolute),
        "Upload-Metadata": meta(ref="joined")})
    assert resp.status == 201, await resp.text()
    assert resp.headers["Blob-Hash"] == b3(data)
    final = await head(alice, resp.headers["Location"])
    assert final.headers["Upload-Concat"].startswith("final;")
    assert final.headers["Upload-Length"] == final.headers["Upload-Offset"] == "7000"
    assert final.headers["Blob-Hash"] == b3(data)
    # The concatenation extension: a final upload takes no PATCH, with or without bytes.
    for body in (b"", b"x"):
        refused = await patch(alice, resp.headers["Location"], 7000, body, status=403)
        assert (await refused.json())["error"] == "forbidden"
    assert await (await alice.request("GET", f"/blobs/{b3(data)}")).read() == data
    for url in urls:
        await head(alice, url, status=404)
    assert (await alice.request("GET", "/refs/joined")).status == 200


async def test_concatenation_needs_finished_parts_of_your_own(server) -> None:
    login = await server()
    alice, bob = await login("alice"), await login("bob")
    mine = await create(alice, 10, headers={"Upload-Concat": "partial"})
    await patch(alice, mine, 0, b"12345")
    for owner in (alice, bob):
        resp = await owner.request("POST", "/tus/", headers={
            **TUS, "Upload-Concat": f"final;{mine}"})
        assert resp.status == 400


@pytest.mark.parametrize("tail", [b"?\xff\xfe", b"#\xed\xa0\x80", b"?caf\xc3\xa9"])
async def test_concatenation_with_bytes_not_ascii_is_400(alice: Api, tail: bytes) -> None:
    """Bytes that are not UTF-8 (or not ASCII) after a part's URL: 400,
    and the part is still there (they were a 500, the part kept)."""
    part = await create(alice, 5, headers={"Upload-Concat": "partial"})
    await patch(alice, part, 0, b"12345")
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    try:
        await conn.send(b"POST /tus/ HTTP/1.1\r\nHost: test\r\nTus-Resumable: 1.0.0\r\n"
                        b"Authorization: Bearer " + alice.token.encode() + b"\r\n"
                        b"Upload-Concat: final;" + part.encode() + tail + b"\r\n"
                        b"Content-Length: 0\r\n\r\n")
        resp = await conn.read_response()
    finally:
        await conn.close()
    assert resp.status == 400, resp.body
    assert resp.json()["error"] == "bad_request"
    assert (await head(alice, part)).headers["Upload-Offset"] == "5"


async def test_declared_hash_mismatch_on_last_patch(alice: Api) -> None:
    data = payload(100)
    url = await create(alice, len(data), headers={"Upload-Metadata": meta(hash=b3(b"x"))})
    resp = await patch(alice, url, 0, data, status=400)
    assert (await resp.json())["error"] == "digest_mismatch"
    assert (await alice.request("GET", f"/blobs/{b3(data)}")).status == 404


async def test_another_owners_upload_is_404(server) -> None:
    login = await server()
    alice, bob = await login("alice"), await login("bob")
    url = await create(alice, 5)
    await head(bob, url, status=404)
    await patch(bob, url, 0, b"12345", status=404)
    assert (await bob.request("DELETE", url, headers=TUS)).status == 404
    assert (await head(alice, url)).headers["Upload-Offset"] == "0"


async def test_cors_for_configured_origins(server) -> None:
    login = await server(server={"cors_origins": ["http://app.example"]})
    alice = await login("alice")
    preflight = await alice.client.options("/tus/", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "tus-resumable, upload-length"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://app.example"
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "upload-offset" in allowed and "authorization" in allowed
    assert "PATCH" in preflight.headers["Access-Control-Allow-Methods"]

    url = await create(alice, 3, headers={"Origin": "http://app.example"})
    resp = await alice.request("HEAD", url, headers={**TUS, "Origin": "http://app.example"})
    exposed = {h.strip().lower() for h in
               resp.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"upload-offset", "upload-length", "location", "tus-resumable",
            "blob-hash"} <= exposed
    resp = await patch(alice, url, 0, b"abc", headers={"Origin": "http://app.example"})
    blob = await alice.request("GET", f"/blobs/{b3(b'abc')}",
                               headers={"Origin": "http://app.example"})
    assert blob.headers["Access-Control-Allow-Origin"] == "http://app.example"
    other = await alice.request("HEAD", url, headers={**TUS, "Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    denied = await alice.client.options("/tus/", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in denied.headers


async def test_a_patch_that_cannot_fit_is_refused_before_its_body(alice: Api) -> None:
    url = await create(alice, 100)
    conn = await raw_patch(alice, url, 50, 50, {"Expect": "100-continue"})
    try:
        answer = await conn.read_response()
        assert answer.status == 409 and answer.headers["tus-resumable"] == "1.0.0"
    finally:
        await conn.close()
    conn = await raw_patch(alice, url, 0, 100, {"Expect": "100-continue"})
    try:
        assert (await conn.read_response()).status == 100
        await conn.send(b"a" * 100)
        assert (await conn.read_response()).headers["blob-hash"] == b3(b"a" * 100)
    finally:
        await conn.close()


def wrong_checksum() -> dict:
    return {"Upload-Checksum": "sha1 " + base64.b64encode(hashlib.sha1(b"not it").digest()).decode()}


async def test_bytes_of_a_refused_patch_never_join_a_deferred_length_upload(alice: Api) -> None:
    """A PATCH refused for its checksum wrote its bytes before they were
    checked; with no length set yet they lay past the offset, and the
    file kept them when the length came: the blob was 1,000 bytes with
    the refused ones at its end, and a declared hash failed for good."""
    data = payload(500)
    url = await create(alice, None, headers={"Upload-Defer-Length": "1",
                                             "Upload-Metadata": meta(hash=b3(data))})
    await patch(alice, url, 0, b"J" * 1000, status=460, headers=wrong_checksum())
    assert (await head(alice, url)).headers["Upload-Offset"] == "0"
    resp = await patch(alice, url, 0, data, headers={"Upload-Length": "500"})
    assert resp.headers["Blob-Hash"] == b3(data)
    assert await (await alice.request("GET", f"/blobs/{b3(data)}")).read() == data
    quota = await (await alice.request("GET", "/quota")).json()
    assert quota["used_bytes"] == 500


async def test_concatenation_takes_each_part_s_recorded_bytes_only(alice: Api) -> None:
    data = payload(200)
    first = await create(alice, None, headers={"Upload-Defer-Length": "1",
                                               "Upload-Concat": "partial"})
    await patch(alice, first, 0, b"j" * 300, status=460, headers=wrong_checksum())
    await patch(alice, first, 0, data[:100], headers={"Upload-Length": "100"})
    second = await create(alice, 100, headers={"Upload-Concat": "partial"})
    await patch(alice, second, 0, data[100:])
    resp = await alice.request("POST", "/tus/", headers={
        **TUS, "Upload-Concat": f"final;{first} {second}"})
    assert resp.status == 201, await resp.text()
    assert resp.headers["Blob-Hash"] == b3(data)
    assert await (await alice.request("GET", f"/blobs/{b3(data)}")).read() == data


async def test_a_deferred_length_upload_growing_past_the_size_limit_is_413(server) -> None:
    alice = await (await server(limits={"max_blob_size": 1000}))("alice")
    url = await create(alice, None, headers={"Upload-Defer-Length": "1"})
    await patch(alice, url, 0, b"a" * 600)
    declared = await patch(alice, url, 600, b"b" * 600, status=413)
    assert (await declared.json())["error"] == "too_large"

    async def streamed():  # no Content-Length: refused as it runs past
        for _ in range(6):
            yield b"c" * 100

    resp = await alice.request("PATCH", url, data=streamed(), headers={
        **TUS, **STREAM, "Upload-Offset": "600"})
    assert resp.status == 413 and (await resp.json())["error"] == "too_large"
    assert (await head(alice, url)).headers["Upload-Offset"] == "600"
    resp = await patch(alice, url, 600, b"d" * 400, headers={"Upload-Length": "1000"})
    assert resp.headers["Blob-Hash"] == b3(b"a" * 600 + b"d" * 400)


async def quota(api: Api) -> dict:
    return await (await api.request("GET", "/quota")).json()


async def test_a_deferred_length_upload_keeps_to_the_owner_s_limits(server) -> None:
    """Found by review: with its length deferred an upload took any number
    of bytes, past the owner's max_blob_size and max_bytes, reserving none."""
    login = await server(quotas={"default": {"max_bytes": 3000, "max_blob_size": 2000}})
    alice = await login("alice")
    url = await create(alice, None, headers={"Upload-Defer-Length": "1"})
    await patch(alice, url, 0, b"a" * 1500)
    # What it holds is reserved as it arrives, so the owner's figures say so.
    assert (await quota(alice))["reserved_bytes"] == 1500
    too_big = await patch(alice, url, 1500, b"b" * 600, status=413)  # 2,100 > max_blob_size
    assert (await too_big.json())["error"] == "too_large"

    # A second one shares max_bytes with it: 1,500 held + 1,600 > 3,000.
    other = await create(alice, None, headers={"Upload-Defer-Length": "1"})
    over = await patch(alice, other, 0, b"c" * 1600, status=507)
    assert (await over.json())["error"] == "quota_exceeded"

    async def streamed():  # no Content-Length: stopped as it passes the room
        for _ in range(16):
            yield b"d" * 100

    resp = await alice.request("PATCH", other, data=streamed(), headers={
        **TUS, **STREAM, "Upload-Offset": "0"})
    assert resp.status == 507 and (await resp.json())["error"] == "quota_exceeded"
    assert (await head(alice, other)).headers["Upload-Offset"] == "0"
    assert (await quota(alice))["reserved_bytes"] == 1500

    await patch(alice, other, 0, b"e" * 1000)
    assert (await quota(alice))["reserved_bytes"] == 2500
    # Setting the length reserves the rest; committing turns it into use.
    done = await patch(alice, url, 1500, b"f" * 400, headers={"Upload-Length": "1900"})
    assert done.headers["Blob-Hash"] == b3(b"a" * 1500 + b"f" * 400)
    figures = await quota(alice)
    assert (figures["used_bytes"], figures["reserved_bytes"]) == (1900, 1000)
    assert (await alice.request("DELETE", other, headers=TUS)).status == 204
    figures = await quota(alice)
    assert (figures["used_bytes"], figures["reserved_bytes"]) == (1900, 0)


async def test_a_deferred_length_upload_keeps_to_the_month(server) -> None:
    login = await server(quotas={"default": {"max_monthly_upload_bytes": 1000}})
    alice = await login("alice")
    url = await create(alice, None, headers={"Upload-Defer-Length": "1"})
    await patch(alice, url, 0, b"a" * 800)
    resp = await patch(alice, url, 800, b"b" * 300, status=507)
    assert "max_monthly_upload_bytes" in (await resp.json())["message"]


async def test_a_deferred_length_upload_is_refused_below_the_free_space_floor(server) -> None:
    bob = await (await server(storage={"min_free_bytes": "1000TiB"}))("bob")
    resp = await bob.request("POST", "/tus/", headers={**TUS, "Upload-Defer-Length": "1"})
    assert resp.status == 507 and (await resp.json())["error"] == "insufficient_storage"


async def test_finished_uploads_are_forgotten_past_the_session_limit(server) -> None:
    """Found by review: a finished upload counted against no limit, so a
    writer could keep creating (empty) uploads and grow the index at will.
    Past max_sessions_per_owner the oldest finished ones are forgotten."""
    alice = await (await server(uploads={"max_sessions_per_owner": 3}))("alice")
    urls = []
    for n in range(6):
        url = await create(alice, 0, headers={"Upload-Metadata": meta(filename=f"{n}" * 4000)})
        assert (await head(alice, url)).headers["Blob-Hash"] == b3(b"")
        urls.append(url)
    for url in urls[:3]:
        await head(alice, url, status=404)
    for url in urls[3:]:
        assert (await head(alice, url)).headers["Blob-Hash"] == b3(b"")
    rows = await alice.store.db.fetchall("SELECT count(*) FROM uploads WHERE owner = 'alice'")
    assert rows[0][0] == 3


async def test_a_creation_refused_before_its_body_leaves_nothing(alice: Api) -> None:
    """Found by review: the 400 carried a Location and the upload stayed,
    reserving its length."""
    resp = await alice.request("POST", "/tus/", data=b"x" * 100, headers={
        **TUS, **STREAM, "Upload-Length": "10"})
    assert resp.status == 400 and "Location" not in resp.headers
    quota = await (await alice.request("GET", "/quota")).json()
    assert quota["reserved_bytes"] == 0
    assert list((alice.data_dir / "uploads").iterdir()) == []
    async with alice.store.db.reader.execute("SELECT count(*) FROM uploads") as cur:
        assert (await cur.fetchone())[0] == 0


async def _nothing_left(api: Api) -> tuple:
    quota = await (await api.request("GET", "/quota")).json()
    async with api.store.db.reader.execute("SELECT count(*) FROM uploads") as cur:
        rows = (await cur.fetchone())[0]
    return rows, quota["reserved_bytes"], quota.get("reserved_blobs"), sorted(
        os.listdir(api.data_dir / "uploads"))


async def test_a_creation_with_a_bad_checksum_header_leaves_nothing(alice: Api) -> None:
    resp = await alice.request("POST", "/tus/", data=b"x" * 100, headers={
        **TUS, **STREAM, "Upload-Length": "100", "Upload-Checksum": "sha1 notbase64!"})
    assert resp.status == 400
    left = await _nothing_left(alice)
    assert "Location" not in resp.headers and left[:3] == (0, 0, 0), (
        resp.headers.get("Location"), left)


async def test_a_creation_with_a_bad_expect_leaves_nothing(alice: Api) -> None:
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    try:
        await conn.send_head("POST", "/tus/", {
            **alice.headers(), **TUS, **STREAM, "Upload-Length": "100",
            "Content-Length": "100", "Expect": "200-ok"})
        answer = await conn.read_response(timeout=10)
    finally:
        await conn.close()
    assert answer.status == 417
    left = await _nothing_left(alice)
    assert left[:3] == (0, 0, 0), (answer.headers, left)


# Over any disk this test runs on, and over every max_blob_size it sets.
HUGE = 10**17


@pytest.mark.parametrize("sections", [{}, {"quotas": {"default": {"max_blob_size": 1000}}}],
                         ids=["server-limit", "owner-limit"])
async def test_a_deferred_length_over_the_size_limit_is_413_even_over_the_disk(
        server, sections: dict) -> None:
    """Found by review: setting a deferred length checked the free disk
    first, so a length over max_blob_size (and the disk) was 507."""
    alice = await (await server(**sections))("alice")
    url = await create(alice, None, headers={"Upload-Defer-Length": "1"})
    resp = await patch(alice, url, 0, b"", status=413, headers={"Upload-Length": str(HUGE)})
    assert (await resp.json())["error"] == "too_large"
    after = await head(alice, url)
    assert after.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in after.headers
    assert (await quota(alice))["reserved_bytes"] == 0


async def test_a_deferred_length_body_over_the_size_limit_is_413_even_over_the_disk(
        server, tmp_path) -> None:
    """The same for a body whose Content-Length passes every bound while
    the disk has less room than max_blob_size (2 GiB): the size limit is
    named, not the disk, and the body is never invited."""
    free, _ = files.free_bytes(tmp_path)
    floor = max(free - (1 << 30), 0)  # about 1 GiB of room left
    alice = await (await server(storage={"min_free_bytes": floor}))("alice")
    url = await create(alice, None, headers={"Upload-Defer-Length": "1"})
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    try:
        await conn.send_head("PATCH", url, {
            **alice.headers(), **TUS, **STREAM, "Upload-Offset": "0",
            "Content-Length": str(HUGE), "Expect": "100-continue"})
        answer = await conn.read_response(timeout=10)
    finally:
        await conn.close()
    assert answer.status == 413 and answer.json()["error"] == "too_large", answer
    assert (await head(alice, url)).headers["Upload-Offset"] == "0"


UPLOAD_METHODS = "HEAD, PATCH, DELETE, POST, OPTIONS"


@pytest.mark.parametrize("method, path, status, allow", [
    ("GET", "/tus/", 405, "POST, OPTIONS"),
    ("PUT", "/tus", 405, "POST, OPTIONS"),
    ("DELETE", "/tus/", 405, "POST, OPTIONS"),
    ("GET", "/tus/0123456789abcdef", 405, UPLOAD_METHODS),
    ("PUT", "/tus/0123456789abcdef", 405, UPLOAD_METHODS),
    ("GET", "/tus/x/y", 404, None),
    ("PATCH", "/tus/x/y", 404, None),
    ("POST", "/tus/0123456789abcdef/", 404, None),
])
async def test_other_tus_paths_and_methods(alice: Api, method: str, path: str, status: int,
                                           allow: str | None) -> None:
    """Found by review: every path under /tus/ was 405 with the upload
    URL's Allow, nothing lives at /tus/x/y, and the collection takes only
    POST and OPTIONS (RFC 9110 section 10.2.1)."""
    resp = await alice.request(method, path, headers=TUS)
    body = await resp.json()
    assert resp.status == status, body
    assert body["error"] == ("not_found" if status == 404 else "method_not_allowed")
    assert resp.headers.get("Allow") == allow
    assert resp.headers["Tus-Resumable"] == "1.0.0"


async def test_a_post_without_a_method_override_is_405_with_the_upload_s_methods(
        alice: Api) -> None:
    url = await create(alice, 10)
    resp = await alice.request("POST", url, headers=TUS)
    assert resp.status == 405 and resp.headers["Allow"] == UPLOAD_METHODS


async def test_a_set_length_cannot_be_changed_by_a_patch(alice: Api) -> None:
    """Found by review: an Upload-Length on a PATCH to a committed upload
    was ignored. Once set, it must not change (tus); the same value again
    is no change."""
    data = payload(100)
    declared = await create(alice, len(data))
    wrong = await patch(alice, declared, 0, data, status=400, headers={"Upload-Length": "99"})
    assert (await wrong.json())["error"] == "bad_request"
    assert (await head(alice, declared)).headers["Upload-Offset"] == "0"
    same = await patch(alice, declared, 0, data[:50], headers={"Upload-Length": "100"})
    assert same.headers["Upload-Offset"] == "50"

    deferred = await create(alice, None, headers={"Upload-Defer-Length": "1"})
    await patch(alice, deferred, 0, data[:40], headers={"Upload-Length": "100"})
    await patch(alice, deferred, 40, data[40:60], status=400, headers={"Upload-Length": "60"})
    still = await head(alice, deferred)
    assert (still.headers["Upload-Length"], still.headers["Upload-Offset"]) == ("100", "40")
    done = await patch(alice, deferred, 40, data[40:], headers={"Upload-Length": "100"})
    assert done.headers["Blob-Hash"] == b3(data)

    # Committed: a PATCH with no body at the final offset is answered again,
    # but not one that would change the length.
    empty = await create(alice, None, headers={"Upload-Defer-Length": "1"})
    assert (await patch(alice, empty, 0, b"", headers={"Upload-Length": "0"})).headers[
        "Blob-Hash"] == b3(b"")
    changed = await patch(alice, empty, 0, b"", status=400, headers={"Upload-Length": "5"})
    assert (await changed.json())["error"] == "bad_request"
    again = await patch(alice, empty, 0, b"", headers={"Upload-Length": "0"})
    assert again.headers["Blob-Hash"] == b3(b"")
    assert (await head(alice, empty)).headers["Upload-Length"] == "0"


async def test_a_patch_answered_on_a_committed_upload_says_when_it_expires(
        alice: Api) -> None:
    data = payload(100)
    url = await create(alice, len(data))
    first = await patch(alice, url, 0, data)
    again = await patch(alice, url, len(data), b"")
    assert again.headers["Blob-Hash"] == first.headers["Blob-Hash"] == b3(data)
    assert again.headers["Upload-Expires"] == (await head(alice, url)).headers["Upload-Expires"]


# -- deferred-length PATCHes reserve their room before their bytes ----------

def upload_files(api: Api) -> dict[str, os.stat_result]:
    """The upload files on disk, by upload id."""
    return {entry.name: entry.stat() for entry in os.scandir(api.store.layout.uploads_dir)}


def on_disk(api: Api) -> int:
    """Bytes the upload files take: their length or their blocks, the larger."""
    return sum(max(st.st_size, st.st_blocks * 512) for st in upload_files(api).values())


async def assert_nothing_past_the_offsets(api: Api, urls: list[str]) -> int:
    """Each upload's file holds its recorded bytes and nothing past them;
    the offsets' sum, which the owner's reservation must be."""
    stats, total = upload_files(api), 0
    for url in urls:
        offset = int((await head(api, url)).headers["Upload-Offset"])
        assert stats[url.rsplit("/", 1)[1]].st_size == offset, url
        total += offset
    return total


async def test_parallel_deferred_patches_never_put_more_than_the_quota_on_disk(
        server) -> None:
    """Found by review: the room of a deferred-length PATCH was checked only
    once its bytes were written; five parallel 9 MiB PATCHes against a
    20 MiB quota left 46 MiB on disk (the refused bytes stayed in their
    files, uncharged). Each now reserves its Content-Length first."""
    max_bytes, body = 2_000_000, 900_000
    alice = await (await server(quotas={"default": {"max_bytes": max_bytes}}))("alice")
    urls = [await create(alice, None, headers={"Upload-Defer-Length": "1"})
            for _ in range(5)]
    answers = await asyncio.gather(*(alice.request(
        "PATCH", url, data=os.urandom(body),
        headers={**TUS, **STREAM, "Upload-Offset": "0"}) for url in urls))
    statuses = sorted(resp.status for resp in answers)
    assert statuses == [204, 204, 507, 507, 507], statuses
    for resp in answers:
        if resp.status == 507:
            assert (await resp.json())["error"] == "quota_exceeded"
    assert on_disk(alice) <= max_bytes
    held = await assert_nothing_past_the_offsets(alice, urls)
    assert held == 2 * body
    figures = await quota(alice)
    assert (figures["used_bytes"], figures["reserved_bytes"],
            figures["monthly_upload_bytes"]) == (0, held, held)


async def test_a_chunked_deferred_patch_over_the_quota_leaves_nothing(server) -> None:
    """Without Content-Length the room is reserved a slice at a time as the
    body comes; refused, the PATCH leaves no byte in the file (they were
    kept past the offset), nothing reserved and nothing charged."""
    alice = await (await server(quotas={"default": {"max_bytes": 2_000_000}}))("alice")
    url = await create(alice, None, headers={"Upload-Defer-Length": "1"})
    before = await quota(alice)

    async def streamed():
        for _ in range(48):
            yield os.urandom(64 << 10)
            await asyncio.sleep(0)

    resp = await alice.request("PATCH", url, data=streamed(), headers={
        **TUS, **STREAM, "Upload-Offset": "0"})
    assert resp.status == 507 and (await resp.json())["error"] == "quota_exceeded"
    assert await assert_nothing_past_the_offsets(alice, [url]) == 0
    assert await quota(alice) == before
    data = payload(1_000_000)
    done = await patch(alice, url, 0, data, headers={"Upload-Length": str(len(data))})
    assert done.headers["Blob-Hash"] == b3(data)


async def test_a_deferred_patch_is_refused_before_its_body_while_another_holds_the_room(
        server) -> None:
    """A PATCH in flight holds the room of its Content-Length from its
    start, so a second one that would pass max_bytes with it is refused
    before its body is invited, not after it was written."""
    alice = await (await server(quotas={"default": {"max_bytes": 2_000_000}}))("alice")
    first_url = await create(alice, None, headers={"Upload-Defer-Length": "1"})
    second_url = await create(alice, None, headers={"Upload-Defer-Length": "1"})
    data = payload(1_500_000)
    first = await raw_patch(alice, first_url, 0, len(data))
    try:
        await first.send(data[:100_000])
        await asyncio.sleep(0.2)  # the first one holds its upload (and room) now
        assert (await quota(alice))["reserved_bytes"] == len(data)
        second = await raw_patch(alice, second_url, 0, 1_000_000, {"Expect": "100-continue"})
        try:
            answer = await second.read_response()
        finally:
            await second.close()
        assert answer.status == 507 and answer.json()["error"] == "quota_exceeded", answer
        await first.send(data[100_000:])
        assert (await first.read_response()).status == 204
    finally:
        await first.close()
    assert await assert_nothing_past_the_offsets(alice, [first_url, second_url]) == len(data)
    assert (await quota(alice))["reserved_bytes"] == len(data)
    await patch(alice, second_url, 0, b"x" * 500_000)
    figures = await quota(alice)
    assert (figures["reserved_bytes"], figures["monthly_upload_bytes"]) == (2_000_000,) * 2


async def _wait_until_nothing_left(api: Api) -> tuple:
    for _ in range(100):
        left = await _nothing_left(api)
        if left == (0, 0, 0, []):
            break
        await asyncio.sleep(0.05)
    return left


async def test_a_creation_whose_body_is_cut_leaves_nothing(alice: Api) -> None:
    """Found by review: the client never got the Location, so nothing could
    reach the upload, which held its reservation for a day."""
    conn = await RawConnection.open(alice.client.host, alice.client.port)
    await conn.send_head("POST", "/tus/", {
        **alice.headers(), **TUS, **STREAM, "Upload-Length": "100000",
        "Content-Length": "100000"})
    await conn.send(payload(30_000))
    await asyncio.sleep(0.1)
    await conn.close()
    assert await _wait_until_nothing_left(alice) == (0, 0, 0, [])


async def test_a_creation_whose_body_fails_later_can_be_resumed_or_ended(
        alice: Api) -> None:
    """A body refused while it streams (longer than Upload-Length, sent
    chunked so it could not be refused before) is answered with the
    upload's Location: the client can ask its offset, resume it or end it."""
    data = payload(10_000)

    async def longer():
        yield data
        yield b"x" * 10

    resp = await alice.request("POST", "/tus/", data=longer(), headers={
        **TUS, **STREAM, "Upload-Length": str(len(data))})
    assert resp.status in (400, 413), await resp.text()
    url = resp.headers["Location"]
    offset = int((await head(alice, url)).headers["Upload-Offset"])
    assert offset in (0, len(data))
    assert (await quota(alice))["reserved_bytes"] == len(data)
    assert (await alice.request("DELETE", url, headers=TUS)).status == 204
    assert await _nothing_left(alice) == (0, 0, 0, [])

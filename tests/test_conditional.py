"""Preconditions on /blobs/<address> (RFC 9110 section 13): If-Match,
If-Unmodified-Since, If-None-Match and If-Modified-Since on GET, HEAD, PUT
and DELETE, evaluated in the order of section 13.2.2; If-Range with a date;
and the Vary a token-protected blob answer carries."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from conftest import b3, blob_files, tmp_files
from rawhttp import RawConnection

DATA = os.urandom(10_000)
OTHER = os.urandom(10_000)
LONG_AGO = "Sat, 01 Jan 2000 00:00:00 GMT"
FUTURE = "Fri, 01 Jan 2100 00:00:00 GMT"
# What a 304 carries (the If-None-Match one always did): the headers a
# cache refreshes its stored copy with.
NOT_MODIFIED_HEADERS = ("ETag", "Cache-Control", "Accept-Ranges", "Last-Modified",
                        "X-Content-Type-Options", "Content-Security-Policy", "Vary")


async def _stored(api, data: bytes = DATA) -> tuple[str, str]:
    """Store ``data``; (its ETag, its Last-Modified)."""
    assert (await api.put(data)).status in (200, 201)
    resp = await api.request("HEAD", f"/blobs/{b3(data)}")
    return resp.headers["ETag"], resp.headers["Last-Modified"]


async def _usage(api) -> dict:
    return await (await api.request("GET", "/quota")).json()


async def _assert_412(resp) -> None:
    assert resp.status == 412, await resp.text()
    if resp.method != "HEAD":
        assert (await resp.json())["error"] == "precondition_failed"


# ---------------------------------------------------------------- GET and HEAD


@pytest.mark.parametrize("headers", [
    {"If-Match": '"nope"'},
    {"If-Match": 'W/"{hash}"'},  # If-Match compares strongly
    {"If-Unmodified-Since": LONG_AGO},
    # 13.2.2: If-Match first; its 412 wins over the 304 of If-None-Match,
    # and over the 416 of the Range that comes after all preconditions.
    {"If-Match": '"nope"', "If-None-Match": '"{hash}"'},
    {"If-Match": '"nope"', "Range": "bytes=999999-"},
])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_false_precondition_on_a_read_is_412(alice, method, headers):
    await alice.put(DATA)
    digest = b3(DATA)
    resp = await alice.request(method, f"/blobs/{digest}", headers={
        k: v.format(hash=digest) for k, v in headers.items()})
    await _assert_412(resp)


@pytest.mark.parametrize("headers", [
    {"If-Match": '"{hash}"'}, {"If-Match": "*"}, {"If-Match": '"x", "{hash}"'},
    {"If-Unmodified-Since": "{last_modified}"}, {"If-Unmodified-Since": FUTURE},
    {"If-Unmodified-Since": "not a date"},
    # Without If-Match only: here the true If-Match decides.
    {"If-Match": '"{hash}"', "If-Unmodified-Since": LONG_AGO},
    {"If-Modified-Since": LONG_AGO}, {"If-Modified-Since": "not a date"},
    # If-Modified-Since counts only without If-None-Match.
    {"If-None-Match": '"x"', "If-Modified-Since": FUTURE},
])
async def test_a_true_precondition_on_a_read_sends_the_blob(alice, headers):
    _, last_modified = await _stored(alice)
    digest = b3(DATA)
    resp = await alice.request("GET", f"/blobs/{digest}", headers={
        k: v.format(hash=digest, last_modified=last_modified) for k, v in headers.items()})
    assert resp.status == 200 and await resp.read() == DATA


@pytest.mark.parametrize("since", ["{last_modified}", FUTURE])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_if_modified_since_gives_the_same_304_as_if_none_match(alice, method, since):
    etag, last_modified = await _stored(alice)
    path = f"/blobs/{b3(DATA)}"
    by_date = await alice.request(method, path, headers={
        "If-Modified-Since": since.format(last_modified=last_modified), "Range": "bytes=0-9"})
    by_tag = await alice.request(method, path, headers={"If-None-Match": etag})
    assert by_date.status == by_tag.status == 304
    assert await by_date.read() == b""
    for name in NOT_MODIFIED_HEADERS:
        assert by_date.headers.get(name) == by_tag.headers.get(name), name


@pytest.mark.parametrize("headers", [{"If-Match": "*"}, {"If-None-Match": "*"},
                                     {"If-Match": '"nope"'}])
async def test_preconditions_never_turn_a_404_into_something_else(alice, headers):
    resp = await alice.request("GET", f"/blobs/{b3(b'nobody has this')}", headers=headers)
    assert resp.status == 404 and (await resp.json())["error"] == "not_found"


# ---------------------------------------------------------------- PUT


async def _announce(api, digest: str, headers: dict[str, str], body: bytes):
    """A PUT that waits for 100 Continue: the first answer, and what follows
    should the body be invited."""
    conn = await RawConnection.open(api.client.host, api.client.port)
    try:
        await conn.send_head("PUT", f"/blobs/{digest}", {
            **api.headers(headers), "Content-Length": str(len(body)),
            "Expect": "100-continue"})
        first = await conn.read_response()
        if first.status != 100:
            return first
        await conn.send(body)
        return await conn.read_response()
    finally:
        await conn.close()


@pytest.mark.parametrize("headers", [
    {"If-None-Match": "*"}, {"If-None-Match": '"{hash}"'}, {"If-Match": '"nope"'},
    {"If-Unmodified-Since": LONG_AGO},
])
@pytest.mark.parametrize("expect", [False, True])
async def test_a_put_with_a_false_precondition_changes_nothing(server, headers, expect):
    login = await server()
    alice, bob = await login("alice"), await login("bob")
    await alice.put(DATA)
    digest = b3(DATA)
    headers = {k: v.format(hash=digest) for k, v in headers.items()} | {"Blob-Ref": "mine"}
    before = await _usage(bob)
    if expect:
        # Refused before the body is invited: the first answer is the 412.
        resp = await _announce(bob, digest, headers, DATA)
        assert resp.status == 412 and resp.json()["error"] == "precondition_failed"
    else:
        await _assert_412(await bob.put(DATA, headers=headers))
    assert (await bob.request("GET", "/refs/mine")).status == 404
    assert (await bob.request("GET", "/blobs")).status == 200
    assert (await (await bob.request("GET", "/blobs")).json())["blobs"] == []
    assert await _usage(bob) == before
    assert tmp_files(alice.data_dir) == []


@pytest.mark.parametrize("headers", [{"If-Match": "*"}, {"If-Match": '"{hash}"'}])
async def test_a_put_that_requires_the_blob_stores_nothing_new(alice, headers):
    digest = b3(DATA)
    resp = await alice.put(DATA, headers={k: v.format(hash=digest) for k, v in headers.items()})
    await _assert_412(resp)
    assert blob_files(alice.data_dir) == [] and tmp_files(alice.data_dir) == []
    assert (await alice.request("GET", f"/blobs/{digest}")).status == 404


@pytest.mark.parametrize("headers,status", [
    ({"If-None-Match": "*"}, 201), ({"If-Unmodified-Since": LONG_AGO}, 201),
    ({"If-Match": "*"}, 200), ({"If-Match": '"{hash}"'}, 200),
    ({"If-Unmodified-Since": FUTURE}, 200),
])
async def test_a_put_with_a_true_precondition_stores(alice, headers, status):
    digest = b3(DATA)
    if status == 200:
        await alice.put(DATA)
    resp = await alice.put(DATA, headers={k: v.format(hash=digest) for k, v in headers.items()}
                           | {"Blob-Ref": "mine"})
    assert resp.status == status, await resp.text()
    assert (await alice.request("GET", "/refs/mine")).status == 200


async def test_if_none_match_star_takes_a_blob_back_from_its_grace_period(server):
    """A blob waiting for deletion is not served: for the client it does not exist."""
    login = await server(gc={"grace_seconds": 300})
    alice = await login()
    await alice.put(DATA)
    assert (await alice.request("DELETE", f"/blobs/{b3(DATA)}")).status == 204
    resp = await alice.put(DATA, headers={"If-None-Match": "*"})
    assert resp.status == 200 and (await resp.json())["created"] is False


async def test_a_put_whose_blob_appears_while_its_body_arrives_is_412(server):
    """The preconditions hold where the reference is added, not only when
    the request began: bob's create-only PUT loses to alice's."""
    login = await server()
    alice, bob = await login("alice"), await login("bob")
    digest = b3(DATA)
    conn = await RawConnection.open(bob.client.host, bob.client.port)
    try:
        await conn.send_head("PUT", f"/blobs/{digest}", {
            **bob.headers(), "Content-Length": str(len(DATA)), "If-None-Match": "*",
            "Expect": "100-continue"})
        assert (await conn.read_response()).status == 100
        await conn.send(DATA[:100])
        assert (await alice.put(DATA)).status == 201
        await conn.send(DATA[100:])
        resp = await conn.read_response()
    finally:
        await conn.close()
    assert resp.status == 412 and resp.json()["error"] == "precondition_failed"
    assert (await (await bob.request("GET", "/blobs")).json())["blobs"] == []
    assert (await _usage(bob))["used_bytes"] == 0
    assert tmp_files(alice.data_dir) == []


# ---------------------------------------------------------------- DELETE


@pytest.mark.parametrize("headers", [
    {"If-Match": '"nope"'}, {"If-Match": 'W/"{hash}"'}, {"If-None-Match": "*"},
    {"If-None-Match": '"{hash}"'}, {"If-Unmodified-Since": LONG_AGO},
])
async def test_a_delete_with_a_false_precondition_drops_nothing(alice, headers):
    await alice.put(DATA, headers={"Blob-Ref": "mine"})
    await alice.put(DATA)
    digest = b3(DATA)
    before = await _usage(alice)
    resp = await alice.request("DELETE", f"/blobs/{digest}", headers={
        k: v.format(hash=digest) for k, v in headers.items()})
    await _assert_412(resp)
    assert (await alice.request("GET", "/refs/mine")).status == 200
    assert (await alice.request("GET", f"/blobs/{digest}")).status == 200
    assert await _usage(alice) == before


@pytest.mark.parametrize("headers", [
    {"If-Match": '"{hash}"'}, {"If-Match": "*"}, {"If-None-Match": '"x"'},
    {"If-Unmodified-Since": FUTURE}, {"If-Modified-Since": FUTURE},  # GET/HEAD only
])
async def test_a_delete_with_a_true_precondition_drops(alice, headers):
    await alice.put(DATA)
    digest = b3(DATA)
    resp = await alice.request("DELETE", f"/blobs/{digest}", headers={
        k: v.format(hash=digest) for k, v in headers.items()})
    assert resp.status == 204
    assert (await alice.request("GET", f"/blobs/{digest}")).status == 404


@pytest.mark.parametrize("headers", [{"If-Match": "*"}, {"If-None-Match": "*"}])
async def test_a_delete_of_a_blob_the_caller_does_not_hold_stays_404(server, headers):
    """bob sees the blob (GET works) but holds no reference: 404 as without
    preconditions, and alice's reference stays."""
    login = await server()
    alice, bob = await login("alice"), await login("bob")
    await alice.put(DATA)
    resp = await bob.request("DELETE", f"/blobs/{b3(DATA)}", headers=headers)
    assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    assert (await alice.request("GET", f"/blobs/{b3(DATA)}")).status == 200


# ---------------------------------------------------------------- If-Range


async def test_if_range_with_the_last_modified_date_keeps_the_range(alice):
    _, last_modified = await _stored(alice)
    await asyncio.sleep(1.05 - time.time() % 1)  # a second later: a strong validator
    resp = await alice.request("GET", f"/blobs/{b3(DATA)}", headers={
        "Range": "bytes=0-9", "If-Range": last_modified})
    assert resp.status == 206 and await resp.read() == DATA[:10]


@pytest.mark.parametrize("if_range", [FUTURE, LONG_AGO])
async def test_if_range_with_another_date_sends_the_whole_blob(alice, if_range):
    """RFC 9110 section 13.1.5: only an exact match with Last-Modified."""
    await alice.put(DATA)
    resp = await alice.request("GET", f"/blobs/{b3(DATA)}", headers={
        "Range": "bytes=0-9", "If-Range": if_range})
    assert resp.status == 200 and await resp.read() == DATA


async def test_if_range_with_a_last_modified_of_this_second_is_weak(alice):
    """Stored in the second the answer is dated: Last-Modified is no strong
    validator yet (RFC 9110 section 8.8.2.2), so the whole blob goes out."""
    for _ in range(5):
        await asyncio.sleep(1.01 - time.time() % 1)  # at the start of a second
        data = os.urandom(1000)
        _, last_modified = await _stored(alice, data)
        resp = await alice.request("GET", f"/blobs/{b3(data)}", headers={
            "Range": "bytes=0-9", "If-Range": last_modified})
        if resp.headers["Date"] == last_modified:  # else too slow: try again
            assert resp.status == 200 and await resp.read() == data
            return
    pytest.fail("never answered within the second the blob was stored")


# ---------------------------------------------------------------- Vary


def _blob_answers(digest: str, etag: str):
    """(method, headers, status) of every kind of blob answer."""
    return [("GET", {}, 200), ("HEAD", {}, 200), ("GET", {"Range": "bytes=0-9"}, 206),
            ("GET", {"If-None-Match": etag}, 304),
            ("GET", {"If-Modified-Since": FUTURE}, 304)]


@pytest.mark.parametrize("cors,vary", [(None, "Authorization"),
                                       (["http://app.example"], "Authorization, Origin")])
async def test_token_protected_blob_answers_vary_on_authorization(server, cors, vary):
    login = await server(server={"cors_origins": cors or []})
    alice = await login()
    etag, _ = await _stored(alice)
    for method, headers, status in _blob_answers(b3(DATA), etag):
        for origin in ({}, {"Origin": "http://app.example"}) if cors else ({},):
            resp = await alice.request(method, f"/blobs/{b3(DATA)}",
                                       headers=headers | origin)
            assert resp.status == status
            assert resp.headers.getall("Vary") == [vary], (method, headers, origin)
            assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"


@pytest.mark.parametrize("cors,vary", [(None, None), (["http://app.example"], ["Origin"])])
async def test_anonymously_readable_blob_answers_do_not_vary_on_authorization(
        server, cors, vary):
    login = await server(auth={"anonymous_read": True}, server={"cors_origins": cors or []})
    alice = await login()
    etag, _ = await _stored(alice)
    for method, headers, status in _blob_answers(b3(DATA), etag):
        resp = await alice.request(method, f"/blobs/{b3(DATA)}", headers=headers)
        assert resp.status == status
        assert resp.headers.getall("Vary", None) == vary

async def test_browser_pages_may_send_preconditions(server):
    login = await server(server={"cors_origins": ["http://app.example"]})
    alice = await login()
    preflight = await alice.client.options(f"/blobs/{b3(DATA)}", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "authorization, if-match"})
    assert preflight.status == 204
    allowed = {h.strip().lower() for h in
               preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"if-match", "if-none-match", "if-modified-since", "if-unmodified-since",
            "if-range"} <= allowed

"""Large bodies read straight off the socket (blobd.sockbody): the same
contract as every other upload, and nothing left behind when they fail."""

from __future__ import annotations

import asyncio
import os

from conftest import b3, blob_files, tmp_files
from rawhttp import RawConnection
from blobd.http.takeover import MIN_SIZE

import sys; exec(open("/tmp/dbg.py").read()) if False else None
BIG = os.urandom(MIN_SIZE + 123_457)


async def test_large_put_is_stored_and_the_connection_closes(alice):
    resp = await alice.put(BIG)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["hash"] == b3(BIG) and body["size"] == len(BIG)
    assert resp.headers["Connection"].lower() == "close"
    got = await alice.request("GET", f"/blobs/{b3(BIG)}")
    assert got.status == 200 and await got.read() == BIG
    assert [p.name for p in blob_files(alice.data_dir)] == [b3(BIG)]
    assert tmp_files(alice.data_dir) == []

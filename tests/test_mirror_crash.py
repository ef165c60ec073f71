"""kill -9 of a real ``blobd serve`` with mirror work queued loses nothing."""

from __future__ import annotations

import os
import sqlite3

import aiohttp

from conftest import b3
from mirrorhelp import eventually, in_thread, mirror_section
from serverproc import BlobdServer


def queued(server: BlobdServer) -> int:
    with sqlite3.connect(server.data_dir / "index.sqlite3") as conn:
        return conn.execute("SELECT count(*) FROM mirror_queue").fetchone()[0]


async def test_kill9_with_a_full_queue_then_restart_delivers_everything(
        tmp_path, s3server, bucket, mirror_prefix):
    server = BlobdServer(tmp_path, {"mirror": mirror_section(s3server, mirror_prefix,
                                                             backup_interval_seconds=0)})
    blobs = [os.urandom(50_000 + n) for n in range(20)]
    try:
        await in_thread(server.start)
        auth = {"Authorization": f"Bearer {await in_thread(server.token, 'alice')}"}
        await s3server.astop()
        try:
            async with aiohttp.ClientSession(headers=auth) as http:
                for data in blobs:
                    async with http.put(f"{server.url}/blobs/{b3(data)}", data=data) as resp:
                        assert resp.status == 201
            assert await in_thread(queued, server) == len(blobs)
            await in_thread(server.kill9)
        finally:
            await s3server.astart()
        assert await in_thread(queued, server) == len(blobs)
        assert await in_thread(bucket.digests) == set()

        await in_thread(server.start)
        await eventually(lambda: in_thread(lambda: bucket.digests() == {b3(d) for d in blobs}),
                         what="every blob in the bucket")
        for data in blobs:
            assert await in_thread(bucket.get, bucket.key(b3(data))) == data
        await eventually(lambda: in_thread(lambda: queued(server) == 0), what="queue drained")
        async with aiohttp.ClientSession(headers=auth) as http:
            async with http.get(f"{server.url}/blobs/{b3(blobs[0])}/meta") as resp:
                assert (await resp.json())["mirror"]["state"] == "done"
    finally:
        await in_thread(server.stop)

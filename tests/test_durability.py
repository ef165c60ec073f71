"""With ``[storage] fsync = true`` an answered upload is on the disk.

A power cut cannot be staged in a test, so this checks the state it would
find: after the 201, no page of the blob's file is dirty or still under
writeback in the page cache. Linux's cachestat(2) (6.5+) reports exactly
that per file. Small bodies are written without their own fsync and made
durable by their commit (one syncfs(2) for a busy batch, an fsync each for
a lone upload), so both paths are exercised: one upload at a time, and
many at once. With fsync off, the same probe finds dirty pages, which shows
it can tell the difference.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from pathlib import Path

import blake3
import pytest

from blobd.http.takeover import MIN_SIZE
from conftest import blob_files

_SYS_CACHESTAT = 451  # x86_64 and aarch64 alike (the generic syscall table)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def not_yet_durable(path: Path) -> int:
    """Pages of ``path`` dirty or under writeback (cachestat(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = _Stat()
        if libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_Range(0, 0)),
                        ctypes.byref(stat), 0) != 0:
            err = ctypes.get_errno()
            pytest.skip(f"cachestat(2) unavailable here: {os.strerror(err)}")
        return stat.dirty + stat.writeback
    finally:
        os.close(fd)


async def _upload_many(alice, count: int, concurrently: bool) -> None:
    bodies = [os.urandom(64 << 10) for _ in range(count)]
    if concurrently:
        results = await asyncio.gather(*(alice.request("POST", "/blobs", data=b)
                                         for b in bodies))
    else:
        results = [await alice.request("POST", "/blobs", data=b) for b in bodies]
    assert [r.status for r in results] == [201] * count


@pytest.mark.parametrize("concurrently", [False, True])
async def test_answered_uploads_have_no_dirty_pages(server, concurrently):
    alice = await (await server())("alice")
    await _upload_many(alice, 24, concurrently)
    files = blob_files(alice.data_dir)
    assert len(files) == 24
    assert {f.name: not_yet_durable(f) for f in files} == {f.name: 0 for f in files}


async def test_without_fsync_the_probe_sees_dirty_pages(server):
    alice = await (await server(storage={"fsync": False}))("alice")
    await _upload_many(alice, 24, concurrently=True)
    assert sum(not_yet_durable(f) for f in blob_files(alice.data_dir)) > 0



async def test_a_body_read_off_the_socket_has_no_dirty_pages(server):
    """Large bodies are written with O_DIRECT (no page cache) but for an
    unaligned tail, which the fsync before the answer covers."""
    alice = await (await server())("alice")
    body = os.urandom(MIN_SIZE + 4096 * 3 + 123)
    # Its shard directories made beforehand: the commit then fsyncs one
    # directory, where a syncfs (for new directories) would flush the file
    # too and hide a missing fsync of its own.
    digest = blake3.blake3(body).hexdigest()
    (alice.data_dir / "blobs" / digest[:2] / digest[2:4]).mkdir(parents=True)
    resp = await alice.request("POST", "/blobs", data=body)
    assert resp.status == 201
    (path,) = blob_files(alice.data_dir)
    assert path.stat().st_size == len(body)
    assert not_yet_durable(path) == 0

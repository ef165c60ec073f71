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

from blobd import files
from blobd.http.takeover import MIN_SIZE
from conftest import blob_files

_SYS_CACHESTAT = 451  # x86_64 and aarch64 alike (the generic syscall table)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def cachestat(path: Path) -> _Stat:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = _Stat()
        if libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_Range(0, 0)),
                        ctypes.byref(stat), 0) != 0:
            err = ctypes.get_errno()
            pytest.skip(f"cachestat(2) unavailable here: {os.strerror(err)}")
        return stat
    finally:
        os.close(fd)


def not_yet_durable(path: Path) -> int:
    """Pages of ``path`` dirty or under writeback (cachestat(2))."""
    stat = cachestat(path)
    return stat.dirty + stat.writeback


def takes_o_direct(directory: Path) -> bool:
    probe = directory / "o_direct-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.mark.parametrize("size", [0, 100, 4096, 4097, 65536, 65536 + 123,
                                  (512 << 10) + 5000, (1 << 20) + 8192])
def test_a_direct_write_leaves_only_its_last_partial_page_cached(tmp_path, size):
    """write_new_file(direct=True): whole pages go around the page cache
    (from an aligned copy, in pieces when over the buffer), the partial
    last page through it; the file is the data either way. Where the file
    system refuses O_DIRECT, the ordinary write is the fallback."""
    data = os.urandom(size)
    path = tmp_path / "file"
    files.write_new_file(path, data, fsync=False, direct=True)
    assert path.read_bytes() == data
    files.remove_quietly(path)  # reading it cached every page: measure an unread copy
    files.write_new_file(path, data, fsync=False, direct=True)
    cached = cachestat(path).cache
    if takes_o_direct(tmp_path):
        assert cached == (1 if size % 4096 else 0)
    else:
        assert cached == -(-size // 4096)


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


@pytest.mark.parametrize("fsync", [True, False])
async def test_a_small_durable_body_is_written_around_the_page_cache(server, fsync):
    """With fsync on, a body held in memory reaches the disk before its
    answer anyway: its whole pages skip the page cache (only the last,
    partial one is cached). With fsync off it is written through it."""
    body = os.urandom(65536 + 123)
    alice = await (await server(storage={"fsync": fsync}))("alice")
    resp = await alice.request("POST", "/blobs", data=body)
    assert resp.status == 201
    (path,) = blob_files(alice.data_dir)
    direct = fsync and takes_o_direct(path.parent)
    assert cachestat(path).cache == (1 if direct else 17)

"""The server's memory stays flat while a 256 MiB blob goes in and out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import blake3

from serverproc import BlobdServer

SIZE = 256 << 20
CHUNK = 1 << 20
RSS_LIMIT = 100 * 1000 * 1000  # "under 100 MB"
SEED = b"blobd memory test"


def piece(index: int) -> bytes:
    """Piece ``index`` of a deterministic pseudo-random stream (the BLAKE3
    XOF), so the body is never held whole: it is made again as it is sent."""
    return blake3.blake3(SEED).digest(length=CHUNK, seek=index * CHUNK)


def stream_digest() -> str:
    hasher = blake3.blake3()
    for index in range(SIZE // CHUNK):
        hasher.update(piece(index))
    return hasher.hexdigest()


async def body() -> AsyncIterator[bytes]:
    for index in range(SIZE // CHUNK):
        yield piece(index)


def mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


async def test_256_mib_put_and_get_keep_server_rss_under_100_mb(tmp_path: Path) -> None:
    digest = stream_digest()
    # fsync = false: memory, not durability, is under test here, and syncing
    # 256 MiB would only make the test slower without touching memory use.
    config = {"storage": {"fsync": False}}
    with BlobdServer(tmp_path, config) as server:
        auth = {"Authorization": f"Bearer {server.token('alice')}"}
        idle = server.rss()
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            with server.sample_rss(0.02) as put_rss:
                headers = {**auth, "Content-Length": str(SIZE),
                           "Content-Type": "application/octet-stream"}
                async with http.put(f"{server.url}/blobs/{digest}", data=body(),
                                    headers=headers) as resp:
                    answer = await resp.json()
                    assert resp.status == 201, answer
            assert answer["hash"] == digest and answer["size"] == SIZE

            with server.sample_rss(0.02) as get_rss:
                async with http.get(f"{server.url}/blobs/{digest}", headers=auth) as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Length"] == str(SIZE)
                    hasher, received = blake3.blake3(), 0
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        hasher.update(chunk)
                        received += len(chunk)
        assert received == SIZE
        assert hasher.hexdigest() == digest

        # Enough samples that a peak could not slip between two of them.
        assert len(put_rss.samples) >= 10 and len(get_rss.samples) >= 5
        report = (f"idle {mb(idle)}, PUT peak {mb(put_rss.peak)}, GET peak "
                  f"{mb(get_rss.peak)}, high-water mark {mb(server.rss_hwm())}")
        print(report)
        assert put_rss.peak < RSS_LIMIT, report
        assert get_rss.peak < RSS_LIMIT, report
        assert server.rss_peak == max(put_rss.peak, get_rss.peak)
        # The kernel's own peak also counts what fell between two samples.
        assert server.rss_hwm() < RSS_LIMIT, report


FRAGMENTER = """
from blobd import memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

# What a burst of small GETs leaves: 64 KiB blocks (under the mmap
# threshold, so from the heap) interleaved with small objects that outlive
# them, which keep glibc from shrinking the heap from its top.
memory.keep_large_buffers_unpooled()
big, kept = [], []
for _ in range(800):
    big.append(bytes(64 * 1024))
    kept.append(bytes(600))
big.clear()
before = rss()
assert memory.release_free_memory()
print(before, rss())
"""


def test_release_free_memory_returns_a_bursts_freed_heap_pages() -> None:
    done = subprocess.run([sys.executable, "-c", FRAGMENTER], capture_output=True,
                          text=True, timeout=60, check=True)
    before, after = map(int, done.stdout.split())
    # 800 x 64 KiB = 52 MB were freed (less the pages the small objects
    # share); glibc kept them resident until the trim.
    assert before - after > 30e6, (mb(before), mb(after))

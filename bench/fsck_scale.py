"""How long ``blobd fsck`` takes on a big store (a benchmark, not a test).

Builds a store of N small blobs (default 100,000) straight onto disk and into
the index - files written and rows inserted in bulk, exactly as the commit
pipeline would leave them - then times fsck, fsck --verify, and fsck on the
same store with some damage injected, which it must find.

    python bench/fsck_scale.py [--blobs 100000] [--dir /tmp/blobd-bench] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blobd import fsck  # noqa: E402
from blobd.config import config_from_dict  # noqa: E402
from blobd.store import Store  # noqa: E402

OWNERS = ("alice", "bob", "carol", "dave")


def make_blob(i: int) -> tuple[str, str, bytes]:
    data = i.to_bytes(8, "big") * (8 + i % 120)
    return blake3.blake3(data).hexdigest(), hashlib.sha256(data).hexdigest(), data


def write_files(blobs_dir: Path, blobs: list[tuple[str, str, bytes]]) -> None:
    def write(item: tuple[str, str, bytes]) -> None:
        digest, _, data = item
        path = blobs_dir / digest[:2] / digest[2:4] / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, blobs, chunksize=512))


def write_rows(index_path: Path, blobs: list[tuple[str, str, bytes]]) -> None:
    """Every blob referenced once by one owner and, every fourth, by a second."""
    now = time.time()
    refs = [(OWNERS[i % 4], d, d, now) for i, (d, _, _) in enumerate(blobs)]
    refs += [(OWNERS[(i + 1) % 4], f"shared:{i}", d, now)
             for i, (d, _, _) in enumerate(blobs) if i % 4 == 0]
    counts: dict[str, int] = {}
    for _, _, digest, _ in refs:
        counts[digest] = counts.get(digest, 0) + 1
    sizes = {d: len(data) for d, _, data in blobs}
    usage: dict[str, list[int]] = {o: [0, 0] for o in OWNERS}
    for owner, _, digest, _ in refs:
        usage[owner][0] += sizes[digest]
        usage[owner][1] += 1
    with sqlite3.connect(index_path) as conn:
        conn.executemany("INSERT INTO blobs (hash, sha256, size, content_type, created_at,"
                         " refcount) VALUES (?, ?, ?, 'application/octet-stream', ?, ?)",
                         [(d, s, len(data), now, counts[d]) for d, s, data in blobs])
        conn.executemany("INSERT INTO refs (owner, name, hash, created_at) VALUES (?, ?, ?, ?)",
                         refs)
        conn.executemany("INSERT INTO holdings (owner, hash, refs, created_at)"
                         " VALUES (?, ?, 1, ?)", [(o, d, t) for o, _, d, t in refs])
        conn.executemany("INSERT INTO owners (owner, used_bytes, used_blobs) VALUES (?, ?, ?)",
                         [(o, b, n) for o, (b, n) in usage.items()])


async def build(root: Path, count: int) -> None:
    config = config_from_dict({"server": {"data_dir": str(root)}})
    store = Store(config)
    await store.open()  # creates the tree and the schema
    await store.close()
    blobs = [make_blob(i) for i in range(count)]
    write_files(store.layout.blobs_dir, blobs)
    write_rows(store.layout.index_path, blobs)
    os.sync()  # so write-back of the build does not slow the timings below


def damage(root: Path) -> int:
    """Break a few things; returns how many problems fsck must report."""
    blobs = sorted((root / "blobs").glob("*/*/*"))
    blobs[0].unlink()                                      # missing
    blobs[1].write_bytes(b"short")                         # size
    (blobs[2].parent / "stray.txt").write_text("stray")    # stray
    with sqlite3.connect(root / "index.sqlite3") as conn:  # refcount
        conn.execute("UPDATE blobs SET refcount = refcount + 3 WHERE hash = ?",
                     (blobs[3].name,))
    return 4


async def timed(label: str, root: Path, **options: bool) -> fsck.Report:
    config = config_from_dict({"server": {"data_dir": str(root)}})
    started = time.perf_counter()
    report = await fsck.run(config, **options)
    print(f"{label:28} {time.perf_counter() - started:7.2f} s   "
          f"{report.blobs} blobs, {len(report.problems)} problems")
    return report


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, help="where to build (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = parser.parse_args()
    root = (args.dir or Path(tempfile.mkdtemp(prefix="blobd-bench-"))) / "data"
    if root.exists():
        shutil.rmtree(root)
    started = time.perf_counter()
    await build(root, args.blobs)
    print(f"{'build ' + str(args.blobs) + ' blobs':28} {time.perf_counter() - started:7.2f} s")
    try:
        assert (await timed("fsck", root)).ok
        assert (await timed("fsck --verify", root, verify=True)).ok
        expected = damage(root)
        report = await timed("fsck (damaged)", root)
        assert len(report.problems) == expected, [p.line() for p in report.problems]
        await timed("fsck --repair", root, repair=True)
    finally:
        if not args.keep:
            shutil.rmtree(root.parent if args.dir is None else root)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

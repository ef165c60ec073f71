"""Is a data directory clean and its index consistent? Read straight from
the files and the SQLite index, with nothing of blobd's own code, so a bug
there cannot hide here. Call it only while no server runs on the directory.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path


def blob_files(data_dir: Path) -> dict[str, int]:
    """Every file under blobs/, by name, with its size."""
    return {p.name: p.stat().st_size for p in (data_dir / "blobs").rglob("*") if p.is_file()}


def assert_store_consistent(data_dir: Path) -> dict[str, int]:
    """No temp file left; every indexed blob has its file (of its size) and
    every file its row; reference counts and owners' usage add up. Returns
    the indexed blobs, hash -> size."""
    leftovers = sorted(p.name for p in (data_dir / "tmp").iterdir())
    assert leftovers == [], f"files left in tmp/: {leftovers}"
    db = sqlite3.connect(f"file:{data_dir / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        blobs = dict(db.execute("SELECT hash, size FROM blobs"))
        assert blob_files(data_dir) == blobs, "blob files and index rows differ"
        refcounts = dict(db.execute("SELECT hash, refcount FROM blobs"))
        refs = Counter(h for (h,) in db.execute("SELECT hash FROM refs"))
        assert refcounts == {h: refs.get(h, 0) for h in blobs}, "refcounts are off"
        per_owner = Counter(db.execute("SELECT owner, hash FROM refs"))
        holdings = {(o, h): n for o, h, n in db.execute("SELECT owner, hash, refs FROM holdings")}
        assert holdings == dict(per_owner), "holdings do not match refs"
        for owner, used_bytes, used_blobs in db.execute(
                "SELECT owner, used_bytes, used_blobs FROM owners"):
            held = [h for (o, h) in holdings if o == owner]
            assert used_blobs == len(held), f"{owner}: used_blobs is off"
            assert used_bytes == sum(blobs[h] for h in held), f"{owner}: used_bytes is off"
    finally:
        db.close()
    return blobs

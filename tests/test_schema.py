"""The index's migrations, on real SQLite files."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from blobd import index
from blobd.db import Database
from blobd.schema import MIGRATIONS, _statements


async def store_id_of(path: Path) -> str:
    db = Database(path, durable=False)
    await db.open()
    try:
        return await index.store_id(db.reader)
    finally:
        await db.close()


async def test_every_index_gets_a_store_id_once(tmp_path):
    first, second = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    made = await store_id_of(first)
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert await store_id_of(first) == made  # kept, not made again
    assert await store_id_of(second) != made


async def test_an_index_from_before_store_ids_gets_one(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        for statement in _statements(MIGRATIONS[0]):
            conn.execute(statement)
        conn.execute("INSERT INTO counters (name, value) VALUES ('kept', 7)")
        conn.execute("PRAGMA user_version = 1")
    made = await store_id_of(path)
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("SELECT value FROM counters").fetchall() == [(7,)]

"""The index's migrations, on real SQLite files."""

from __future__ import annotations

import logging
import re
import sqlite3
from pathlib import Path

import pytest

from blobd import index
from blobd.mirror import queue
from blobd.db import Database
from blobd.errors import BlobdError
from blobd.schema import MIGRATIONS, _statements


def index_at(path: Path, version: int) -> Path:
    """An index made by the first ``version`` migrations, as an older
    blobd left it."""
    with sqlite3.connect(path) as conn:
        for script in MIGRATIONS[:version]:
            for statement in _statements(script):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")
    return path


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


async def test_unmirrored_blobs_are_found_through_their_index_after_migrating(tmp_path):
    """Migration 3 re-keys the unmirrored index by creation time (new blobs
    share its last page); the mirror queue's start-up query still reads
    that index alone, and finds the same blobs, old and new."""
    path = tmp_path / "v2.sqlite3"
    with sqlite3.connect(path) as conn:
        for statement in _statements(MIGRATIONS[0]) + _statements(MIGRATIONS[1]):
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO blobs (hash, sha256, size, content_type, created_at, mirror_state)"
            " VALUES (?, ?, 1, 'x/y', ?, ?)",
            [(f"{i:064x}", f"{i:064x}", float(i), "off" if i % 3 else "done")
             for i in range(300)])
        conn.execute("PRAGMA user_version = 2")
    db = Database(path, durable=False)
    await db.open()
    try:
        async with db.transaction() as conn:
            await index.insert_blob(conn, index.BlobRecord(
                "f" * 64, "e" * 64, 1, "x/y", 1e9))
        plan = await db.reader.execute_fetchall(
            "EXPLAIN QUERY PLAN SELECT hash FROM blobs WHERE mirror_state = 'off'")
        async with db.transaction() as conn:
            queued = await queue.enqueue_unmirrored(conn, 0.0)
        rows = await db.reader.execute_fetchall("SELECT hash FROM mirror_queue ORDER BY hash")
    finally:
        await db.close()
    assert [row[3] for row in plan] == ["SCAN blobs USING INDEX blobs_unmirrored"]
    expected = sorted([f"{i:064x}" for i in range(300) if i % 3] + ["f" * 64])
    assert queued == len(expected) and [row[0] for row in rows] == expected


async def test_open_sessions_reserve_their_blob_slots_after_migrating(tmp_path):
    """Migration 5 counts each owner's open sessions into reserved_blobs."""
    path = index_at(tmp_path / "v4.sqlite3", 4)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO owners (owner) VALUES ('alice'), ('bob')")
        conn.executemany(
            "INSERT INTO uploads (id, owner, protocol, size, chunk_size, created_at,"
            " expires_at, result_hash) VALUES (?, ?, 'native', 10, 10, 0, 1e12, ?)",
            [("a1", "alice", None), ("a2", "alice", None), ("a3", "alice", "f" * 64),
             ("b1", "bob", "e" * 64)])
    db = Database(path, durable=False)
    await db.open()
    try:
        rows = await db.reader.execute_fetchall(
            "SELECT owner, reserved_blobs FROM owners ORDER BY owner")
    finally:
        await db.close()
    assert [tuple(r) for r in rows] == [("alice", 2), ("bob", 0)]


async def test_reference_names_are_counted_after_migrating(tmp_path):
    """Migration 6 counts each owner's references into used_refs (kept
    from then on by the transactions that add and drop them), with no
    max_refs override."""
    path = index_at(tmp_path / "v5.sqlite3", 5)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO owners (owner) VALUES ('alice'), ('bob'), ('carol')")
        conn.executemany("INSERT INTO blobs (hash, sha256, size, content_type, created_at)"
                         " VALUES (?, ?, 1, 'x/y', 0)", [("a" * 64, "b" * 64),
                                                         ("c" * 64, "d" * 64)])
        conn.executemany(
            "INSERT INTO refs (owner, name, hash, created_at) VALUES (?, ?, ?, 0)",
            [("alice", "a" * 64, "a" * 64), ("alice", "one", "a" * 64),
             ("alice", "two", "c" * 64), ("bob", "c" * 64, "c" * 64),
             ("dave", "x", "a" * 64)])   # an owner without a row (damage)
    db = Database(path, durable=False)
    await db.open()
    try:
        rows = await db.reader.execute_fetchall(
            "SELECT owner, used_refs, max_refs FROM owners ORDER BY owner")
    finally:
        await db.close()
    assert [tuple(r) for r in rows] == [("alice", 3, None), ("bob", 1, None),
                                        ("carol", 0, None), ("dave", 1, None)]


async def test_an_index_from_a_newer_blobd_is_refused(tmp_path):
    """Found by review: a rollback ran old code on a newer schema without a
    word (code that predates a table stops keeping it)."""
    path = tmp_path / "newer.sqlite3"
    await store_id_of(path)
    newer = len(MIGRATIONS) + 1
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")
    db = Database(path, durable=False)
    with pytest.raises(BlobdError) as info:
        await db.open()
    await db.close()
    assert info.value.message == (f"index schema {newer} is newer than this blobd"
                                  f" ({len(MIGRATIONS)}); upgrade blobd")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == newer


async def test_a_migration_is_logged(tmp_path, caplog):
    path = tmp_path / "v1.sqlite3"
    with sqlite3.connect(path) as conn:
        for statement in _statements(MIGRATIONS[0]):
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
    with caplog.at_level(logging.INFO, logger="blobd.schema"):
        await store_id_of(path)
        await store_id_of(path)  # nothing left to migrate: no line
    assert [r.getMessage() for r in caplog.records if r.name == "blobd.schema"] == [
        f"index schema migrated from 1 to {len(MIGRATIONS)}"]


async def test_a_reading_command_does_not_migrate_an_older_index(tmp_path):
    """Found by review: `blobd stats` from a new install migrated the index
    under the older server still running on it."""
    path = index_at(tmp_path / "v4.sqlite3", 4)
    db = Database(path, durable=False)
    with pytest.raises(BlobdError) as info:
        await db.open(read_only=True)
    await db.close()
    assert "older than this blobd" in info.value.message
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4

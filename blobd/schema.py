"""The index's schema: a plain list of migrations stepped by ``PRAGMA
user_version``, each applied in one transaction.

A new version appends a script; a released one never changes. An index
of a version this code does not know (made by a newer blobd) is refused:
code that predates a table would quietly stop keeping it (a rollback
without ``deleted_blobs`` would let a restore bring deleted blobs back).
"""

from __future__ import annotations

import logging

import aiosqlite

from .errors import BlobdError

log = logging.getLogger(__name__)

MIGRATIONS: list[str] = [
    # 1: the initial schema.
    """
    CREATE TABLE blobs (
        hash          TEXT PRIMARY KEY,      -- BLAKE3 hex, lower case
        sha256        TEXT NOT NULL,
        size          INTEGER NOT NULL,
        content_type  TEXT NOT NULL,
        created_at    REAL NOT NULL,
        refcount      INTEGER NOT NULL DEFAULT 0,
        zero_at       REAL,                  -- refcount reached 0 (grace period)
        audio         TEXT,                  -- JSON from the audio probe, or NULL
        mirror_state  TEXT NOT NULL DEFAULT 'off'
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX blobs_sha256 ON blobs(sha256);
    CREATE INDEX blobs_zero_at ON blobs(zero_at) WHERE zero_at IS NOT NULL;
    CREATE INDEX blobs_unmirrored ON blobs(mirror_state) WHERE mirror_state = 'off';

    CREATE TABLE refs (
        owner       TEXT NOT NULL,
        name        TEXT NOT NULL,
        hash        TEXT NOT NULL REFERENCES blobs(hash),
        created_at  REAL NOT NULL,
        PRIMARY KEY (owner, name)
    ) WITHOUT ROWID;
    CREATE INDEX refs_hash ON refs(hash, owner);

    -- One row per (owner, blob the owner references): what quotas charge
    -- and what GET /blobs lists, newest first by id.
    CREATE TABLE holdings (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        owner       TEXT NOT NULL,
        hash        TEXT NOT NULL REFERENCES blobs(hash),
        refs        INTEGER NOT NULL,
        created_at  REAL NOT NULL,
        UNIQUE (owner, hash)
    );
    CREATE INDEX holdings_owner ON holdings(owner, id);

    CREATE TABLE owners (
        owner                     TEXT PRIMARY KEY,
        used_bytes                INTEGER NOT NULL DEFAULT 0,
        used_blobs                INTEGER NOT NULL DEFAULT 0,
        reserved_bytes            INTEGER NOT NULL DEFAULT 0,
        upload_month              TEXT NOT NULL DEFAULT '',
        monthly_upload_bytes      INTEGER NOT NULL DEFAULT 0,
        -- per-owner overrides; NULL means the configured default
        max_bytes                 INTEGER,
        max_blobs                 INTEGER,
        max_blob_size             INTEGER,
        max_monthly_upload_bytes  INTEGER
    ) WITHOUT ROWID;

    CREATE TABLE tokens (
        id            TEXT PRIMARY KEY,
        token_hash    TEXT NOT NULL UNIQUE,   -- SHA-256 of the secret
        owner         TEXT NOT NULL,
        scopes        TEXT NOT NULL,          -- comma separated
        label         TEXT NOT NULL DEFAULT '',
        created_at    REAL NOT NULL
    );

    CREATE TABLE counters (
        name   TEXT PRIMARY KEY,
        value  INTEGER NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE uploads (
        id              TEXT PRIMARY KEY,
        owner           TEXT NOT NULL,
        protocol        TEXT NOT NULL,        -- 'native' or 'tus'
        size            INTEGER,              -- NULL while a tus length is deferred
        chunk_size      INTEGER NOT NULL,
        expected_hash   TEXT,                 -- an address as the client gave it
        content_type    TEXT,
        ref             TEXT,
        metadata        TEXT,                 -- tus Upload-Metadata as received
        concat          TEXT,                 -- tus Upload-Concat: 'partial', 'final;...'
        upload_offset   INTEGER NOT NULL DEFAULT 0,
        reserved_bytes  INTEGER NOT NULL DEFAULT 0,
        created_at      REAL NOT NULL,
        expires_at      REAL NOT NULL,
        result_hash     TEXT                  -- set once committed
    );
    CREATE INDEX uploads_owner ON uploads(owner);
    CREATE INDEX uploads_expires_at ON uploads(expires_at);

    CREATE TABLE upload_chunks (
        upload_id  TEXT NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
        idx        INTEGER NOT NULL,
        PRIMARY KEY (upload_id, idx)
    ) WITHOUT ROWID;

    -- The mirror outbox, written in the same transaction as the change.
    CREATE TABLE mirror_queue (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        hash         TEXT NOT NULL,
        op           TEXT NOT NULL,          -- 'put' or 'delete'
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_at      REAL NOT NULL DEFAULT 0,
        last_error   TEXT,
        enqueued_at  REAL NOT NULL
    );
    CREATE INDEX mirror_queue_next_at ON mirror_queue(next_at);
    CREATE INDEX mirror_queue_hash ON mirror_queue(hash, id);
    """,
    # 2: the store's id, made once. Index backups carry it, so the mirror
    # can tell this store's backups from those of another index (a new,
    # empty disk under the same config). A backup restored as the index
    # keeps the id it was made with: it is that store.
    """
    CREATE TABLE meta (
        name   TEXT PRIMARY KEY,
        value  TEXT NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO meta (name, value) VALUES ('store_id', lower(hex(randomblob(16))));
    """,
    # 3: the unmirrored blobs (all of them while no mirror is configured)
    # indexed by creation time rather than by hash: each new blob then
    # lands on the index's last page, which a batch of uploads shares,
    # instead of a random page of its own (a WAL frame per upload).
    # Entries carry the hash all the same (the table's key), so the
    # queue's "every blob with state 'off'" still reads only the index.
    """
    DROP INDEX blobs_unmirrored;
    CREATE INDEX blobs_unmirrored ON blobs(created_at) WHERE mirror_state = 'off';
    """,
    # 4: blobs deleted while a mirror was configured, whose objects may
    # still be in the bucket (keep_deleted, or a deletion not yet done):
    # a restore must not take them for blobs stored after its backup.
    """
    CREATE TABLE deleted_blobs (
        hash        TEXT PRIMARY KEY,
        deleted_at  REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 5: an open upload session reserves a blob against max_blobs, as it
    # reserves its bytes against max_bytes: otherwise two sessions (or a
    # session and a PUT) could both be accepted for the last slot, and one
    # refused only once all its bytes had come.
    """
    ALTER TABLE owners ADD COLUMN reserved_blobs INTEGER NOT NULL DEFAULT 0;
    UPDATE owners SET reserved_blobs = (SELECT count(*) FROM uploads
        WHERE uploads.owner = owners.owner AND uploads.result_hash IS NULL);
    """,
    # 6: max_refs, a limit on an owner's reference names (quotas charge a
    # blob once, so names of one blob were free and unbounded). used_refs
    # is kept in the transaction that adds or drops a name, so the check
    # never counts the refs table; here it is counted once, from the rows.
    # Every owner with references has a row (the first holding made it);
    # the INSERT is for an index damaged otherwise, which fsck would report.
    """
    ALTER TABLE owners ADD COLUMN used_refs INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE owners ADD COLUMN max_refs INTEGER;
    INSERT INTO owners (owner) SELECT DISTINCT owner FROM refs WHERE true
        ON CONFLICT (owner) DO NOTHING;
    UPDATE owners SET used_refs = (SELECT count(*) FROM refs
        WHERE refs.owner = owners.owner);
    """,
]


async def migrate(conn: aiosqlite.Connection, *, read_only: bool = False) -> None:
    """Bring the index to this blobd's schema. ``read_only`` (a command that
    only reads): refuse an older index rather than migrate it, which could
    happen under an older server still running on it."""
    async with conn.execute("PRAGMA user_version") as cur:
        (version,) = await cur.fetchone()
    if version > len(MIGRATIONS):
        raise BlobdError("conflict", f"index schema {version} is newer than this blobd"
                         f" ({len(MIGRATIONS)}); upgrade blobd")
    if read_only and version < len(MIGRATIONS):
        raise BlobdError("conflict", f"index schema {version} is older than this blobd"
                         f" ({len(MIGRATIONS)}); a command that only reads does not"
                         " upgrade it: start this blobd's server (blobd serve) first")
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        # executescript would COMMIT on its own; run statement by statement
        # so the schema change and the version bump are one transaction.
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(script):
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")
    # A new index is no news (and start-up errors stay one line).
    if version == 0:
        log.debug("index created, schema %d", len(MIGRATIONS))
    elif version < len(MIGRATIONS):
        log.info("index schema migrated from %d to %d", version, len(MIGRATIONS))


def _statements(script: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]

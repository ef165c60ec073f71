"""The store's figures: what deduplication saves, how uploads fare, how
full the disk is and how far behind the mirror is.

Everything comes from the index (one SQL statement, so one consistent
snapshot) and one ``statvfs``; the put counters live in the ``counters``
table, so they survive restarts. ``GET /stats``, ``GET /metrics`` and
``blobd stats`` all read :func:`figures`.

Definitions (API.md, "Operations"):

* ``blobs`` / ``stored_bytes``: blobs somebody references, and their size
  on disk, each counted once however many references it has;
* ``references`` / ``logical_bytes``: references over all owners, and the
  bytes they would take without deduplication;
* ``dedup_ratio`` = references / blobs (1.0 for an empty store);
  ``bytes_saved`` = logical_bytes - stored_bytes;
* ``hash_hit_rate`` = put_dedup_hits / puts: the share of stores that found
  their content already there (0.0 before the first);
* ``grace``: blobs whose last reference went and that wait for their grace
  period to end (on disk, but in none of the figures above);
* ``mirror.pending``: queued mirror operations; ``mirror.failed``: those
  that have failed at least once and not yet succeeded; ``last_error``: the
  error of the failing operation due to be retried last (the queue keeps no
  failure times, and that one is the latest to have been rescheduled);
  ``oldest_pending_seconds``: how long ago the oldest queued operation was
  queued (0 with none), so an alert tells a mirror behind for an hour from
  a busy one;
* ``sessions_open``: upload sessions neither committed nor expired (an
  expired one answers 404 before the sweeper removes it);
* ``scrub``: the background scrub (:mod:`blobd.scrub`): its settings, its
  counts since the index was made (``blobs_checked``, ``bytes_checked``,
  which moves while a big blob is read, and ``damaged``: files found not
  their blob and moved to quarantine, each once), ``missing``: the blobs
  the last completed pass left without their file (null before one ends),
  when the current pass started (null between passes) and the last ended,
  and ``continuous``: the store (every blob row) takes longer than the
  period to read at the configured rate, so passes follow each other
  without a pause.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any

from . import files
from .store import Store

_FIGURES_SQL = """
SELECT b.*,
  (SELECT value FROM counters WHERE name = 'puts') AS puts,
  (SELECT value FROM counters WHERE name = 'put_dedup_hits') AS put_dedup_hits,
  (SELECT count(*) FROM mirror_queue) AS mirror_pending,
  (SELECT count(*) FROM mirror_queue WHERE attempts > 0 AND last_error IS NOT NULL)
    AS mirror_failed,
  (SELECT last_error FROM mirror_queue WHERE last_error IS NOT NULL
    ORDER BY next_at DESC, id DESC LIMIT 1) AS mirror_last_error,
  (SELECT enqueued_at FROM mirror_queue ORDER BY id LIMIT 1) AS mirror_oldest_at,
  (SELECT count(*) FROM uploads WHERE result_hash IS NULL AND expires_at > ?)
    AS sessions_open,
  (SELECT value FROM counters WHERE name = 'scrub_blobs') AS scrub_blobs,
  (SELECT value FROM counters WHERE name = 'scrub_bytes') AS scrub_bytes,
  (SELECT value FROM counters WHERE name = 'scrub_damaged') AS scrub_damaged,
  (SELECT value FROM meta WHERE name = 'scrub_cursor') AS scrub_cursor,
  (SELECT value FROM meta WHERE name = 'scrub_pass_started') AS scrub_started,
  (SELECT value FROM meta WHERE name = 'scrub_pass_ended') AS scrub_ended,
  (SELECT value FROM meta WHERE name = 'scrub_missing') AS scrub_missing
FROM (
  SELECT
    coalesce(sum(refcount > 0), 0) AS blobs,
    coalesce(sum(CASE WHEN refcount > 0 THEN size END), 0) AS stored_bytes,
    coalesce(sum(refcount), 0) AS refs,
    coalesce(sum(size * refcount), 0) AS logical_bytes,
    coalesce(sum(refcount = 0), 0) AS grace_blobs,
    coalesce(sum(CASE WHEN refcount = 0 THEN size END), 0) AS grace_bytes,
    coalesce(sum(size), 0) AS all_bytes
  FROM blobs
) AS b
"""


def queue_age(enqueued_at: float | None, now: float) -> float:
    """Seconds since the oldest queued mirror operation was queued; 0 with
    none (or one stamped ahead of this clock, by another process's). The
    oldest is the first row by id, ids growing in commit order: a lookup of
    the primary key, not a scan of the queue."""
    return 0.0 if enqueued_at is None else round(max(0.0, now - enqueued_at), 3)


async def figures(store: Store) -> dict[str, Any]:
    """The ``GET /stats`` body."""
    now = time.time()
    row = await store.db.fetchone_aside(_FIGURES_SQL, (now,))
    assert row is not None
    free, total = await asyncio.to_thread(files.free_bytes, store.layout.root)
    blobs, refs = row["blobs"], row["refs"]
    puts, hits = row["puts"] or 0, row["put_dedup_hits"] or 0
    return {
        "blobs": blobs,
        "stored_bytes": row["stored_bytes"],
        "references": refs,
        "logical_bytes": row["logical_bytes"],
        "dedup_ratio": refs / blobs if blobs else 1.0,
        "bytes_saved": row["logical_bytes"] - row["stored_bytes"],
        "puts": puts,
        "put_dedup_hits": hits,
        "hash_hit_rate": hits / puts if puts else 0.0,
        "disk": {"free_bytes": free, "total_bytes": total},
        "mirror": {"pending": row["mirror_pending"], "failed": row["mirror_failed"],
                   "last_error": row["mirror_last_error"],
                   "oldest_pending_seconds": queue_age(row["mirror_oldest_at"], now)},
        "grace": {"blobs": row["grace_blobs"], "bytes": row["grace_bytes"]},
        "sessions_open": row["sessions_open"],
        "scrub": _scrub(store, row),
    }


def _scrub(store: Store, row: Any) -> dict[str, Any]:
    config = store.config.scrub
    rate = config.bytes_per_second
    started = row["scrub_started"] if row["scrub_cursor"] is not None else None
    return {
        "enabled": rate > 0,
        "bytes_per_second": rate,
        "period_seconds": config.period_seconds,
        "blobs_checked": row["scrub_blobs"] or 0,
        "bytes_checked": row["scrub_bytes"] or 0,
        "damaged": row["scrub_damaged"] or 0,
        "missing": int(row["scrub_missing"]) if row["scrub_missing"] is not None else None,
        "pass_started": _iso(started),
        "last_pass_ended": _iso(row["scrub_ended"]),
        "continuous": rate > 0 and row["all_bytes"] / rate > config.period_seconds,
    }


def _iso(stamp: str | None) -> str | None:
    """A Unix time kept as text in ``meta``, as the API writes times."""
    if stamp is None:
        return None
    moment = datetime.fromtimestamp(float(stamp), tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

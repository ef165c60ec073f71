"""Per-owner quotas as the API and the CLI see them.

The authoritative check is inside the transaction that adds a holding
(:func:`blobd.index.add_ref`), so concurrent uploads can never pass a limit.
What is here runs *before* a body is read, to refuse early what is bound to
fail (413 from Content-Length, 507 when the month's or the owner's bytes
are already spent), plus the ``/quota`` report and the parsing of limit
overrides shared by ``PUT /admin/owners/<owner>/quota`` and ``blobd quota set``.
"""

from __future__ import annotations

import functools
import sqlite3
from typing import TYPE_CHECKING, Any, Mapping

import aiosqlite

from . import index
from .config import INT64_MAX, QuotaLimits, parse_size
from .errors import BlobdError
from .index import LIMIT_KEYS
from .syncdb import SyncConnection, drive
from .ttlcache import TtlCache

if TYPE_CHECKING:
    from .store import Store

# How long the early checks of a small upload trust an owner's limits read
# for an earlier one: a burst of small uploads then costs no index lookup
# before the body. The commit transaction always reads the row itself, so
# a limit changed meanwhile (by another worker process; this one forgets
# its copy at once) is still enforced; only the early refusal lags.
LIMITS_CACHE_SECONDS = 1.0
LIMITS_CACHE_SIZE = 1024

# The limits that are sizes in bytes (accepting "10GiB"); max_blobs and
# max_refs are counts.
SIZE_KEYS = frozenset({"max_bytes", "max_blob_size", "max_monthly_upload_bytes"})


class LimitsCache(TtlCache[str, QuotaLimits]):
    """Owner -> their effective limits, for LIMITS_CACHE_SECONDS."""

    def __init__(self, ttl: float = LIMITS_CACHE_SECONDS,
                 size: int = LIMITS_CACHE_SIZE) -> None:
        super().__init__(ttl, size)


async def small_upload_limit(store: Store, owner: str, declared: int) -> int:
    """:func:`upload_limit` for a body of ``declared`` bytes small enough to
    arrive whole with its headers (and sent without ``Expect:
    100-continue``): only the size limit is checked before it is read, from
    limits read at most LIMITS_CACHE_SECONDS ago. Reading such a body costs
    nothing worth refusing early for; the quota, usage and free-space checks
    that decide are made as it is written and committed."""
    limits = store.owner_limits.get(owner)
    if limits is None:
        return await upload_limit(store, owner, declared)
    server_max = store.config.limits.max_blob_size
    index.check_blob_size(declared, limits, server_max)
    return min(limits.max_blob_size, server_max)


async def upload_limit(store: Store, owner: str, declared: int | None,
                       digest: str | None = None, *, unknown: bool = False,
                       name: str | None = None) -> int:
    """The most bytes ``owner`` may send now; raises before any is read.

    ``declared`` is the Content-Length (None when chunked); ``digest`` the
    BLAKE3 address when the client named it, so a blob the owner already
    holds (which costs nothing) is not refused for ``max_bytes``;
    ``unknown``: the client named a blob the index has never seen (a
    ``sha256:`` address not in it), which nobody can hold; ``name``: the
    reference name the upload will add or re-point, when known before the
    body. Every check, free disk space included, is one trip to a reader
    thread.
    """
    limits = await store.db.read(functools.partial(_check_upload, store, owner,
                                                   declared, digest, unknown, name))
    store.owner_limits.put(owner, limits)
    return min(limits.max_blob_size, store.config.limits.max_blob_size)


def _check_upload(store: Store, owner: str, declared: int | None, digest: str | None,
                  unknown: bool, name: str | None, conn: sqlite3.Connection) -> QuotaLimits:
    """The checks of :func:`upload_limit`, on a reader thread; the owner's
    limits if all pass."""
    sync = SyncConnection(conn)
    server_max = store.config.limits.max_blob_size
    limits = drive(index.limits_for(sync, owner, store.config.quota_for(owner)))
    used = drive(index.usage(sync, owner))
    # A new name past max_refs would be refused at the commit, after the
    # whole body (a phone's 2 GiB recording) was sent for nothing.
    if (name is not None and used["used_refs"] >= limits.max_refs
            and not drive(index.has_ref(sync, owner, name))):
        raise index.refs_exceeded(limits.max_refs, used["used_refs"])
    if declared is not None:
        index.check_blob_size(declared, limits, server_max)
    room = _room_after(sync, owner, digest, unknown, name, used)
    if room is not None:
        # The commit's own check (index.check_room, after a re-pointed
        # name let its old blob go), made before the body is invited: a
        # new blob past max_blobs or max_bytes is refused either way.
        index.check_room(room, limits, declared or 0, 1)
    if (declared is not None
            and used["monthly_upload_bytes"] + declared > limits.max_monthly_upload_bytes):
        raise exceeded("max_monthly_upload_bytes", limits.max_monthly_upload_bytes)
    store.ensure_free_space(declared or 0)
    return limits


def _room_after(sync: SyncConnection, owner: str, digest: str | None, unknown: bool,
                name: str | None, used: dict[str, int]) -> dict[str, int] | None:
    """The owner's usage as the commit will check it, when the upload is
    sure to be a blob new to them; None when it may not be (they may hold
    it already, or cannot tell before the body), so nothing is refused.

    A body known by its hash is new unless they hold that hash. A body
    not known before it is read (POST) is new only to an owner holding
    nothing. Naming a reference they have at another blob releases that
    blob first when the name was their only reference to it."""
    if digest is not None:
        if drive(holds(sync, owner, digest)):
            return None
    elif not unknown:
        return dict(used) if used["used_blobs"] == 0 else None
    target = name if name is not None else digest
    if target is None:
        # Named by its BLAKE3 digest, known only after the body: a
        # reference of that name may exist and be re-pointed.
        if drive(index.may_repoint_by_hash(sync, owner)):
            return None
        return dict(used)
    freed_bytes, freed_blobs = drive(index.repoint_frees(sync, owner, target, digest))
    return {**used, "used_bytes": used["used_bytes"] - freed_bytes,
            "used_blobs": used["used_blobs"] - freed_blobs}


def exceeded(key: str, limit: int) -> BlobdError:
    unit = " bytes" if key in SIZE_KEYS else ""
    return BlobdError("quota_exceeded", f"quota {key} ({limit}{unit}) would be exceeded")


async def holds(conn: aiosqlite.Connection, owner: str, digest: str) -> bool:
    async with conn.execute("SELECT 1 FROM holdings WHERE owner = ? AND hash = ?",
                            (owner, digest)) as cur:
        return await cur.fetchone() is not None


async def report(conn: aiosqlite.Connection, owner: str,
                 default: QuotaLimits) -> dict[str, Any]:
    """The ``GET /quota`` body: usage and the limits in force."""
    used = await index.usage(conn, owner)
    limits = await index.limits_for(conn, owner, default)
    return {"owner": owner, "used_bytes": used["used_bytes"],
            "used_blobs": used["used_blobs"],
            "used_refs": used["used_refs"],
            "monthly_upload_bytes": used["monthly_upload_bytes"],
            "reserved_bytes": used["reserved_bytes"],
            "reserved_blobs": used["reserved_blobs"],
            "limits": {key: getattr(limits, key) for key in LIMIT_KEYS}}


def parse_changes(raw: Mapping[str, Any]) -> dict[str, int | None]:
    """Validate overrides: each key a limit, each value an integer, a size
    string (for byte limits) or None (back to the configured default)."""
    unknown = sorted(set(raw) - set(LIMIT_KEYS))
    if unknown:
        raise BlobdError("bad_request", f"unknown quota limit {unknown[0]!r}; expected"
                         f" some of {', '.join(LIMIT_KEYS)}")
    return {key: _parse_limit(key, value) for key, value in raw.items()}


def _parse_limit(key: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        if key in SIZE_KEYS:
            limit = parse_size(value)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError("expected a non-negative integer")
        else:
            limit = value
        if limit > INT64_MAX:
            raise ValueError(f"at most {INT64_MAX}")
        return limit
    except ValueError as exc:
        raise BlobdError("bad_request", f"{key}: {exc}") from None


async def set_limits(store: Store, owner: str,
                     changes: Mapping[str, int | None]) -> dict[str, Any]:
    """Apply overrides for ``owner``; returns its ``/quota`` body."""
    async with store.write() as tx:
        await index.set_owner_limits(tx.conn, owner, dict(changes))
    store.owner_limits.forget(owner)
    return await report(store.db.reader, owner, store.config.quota_for(owner))

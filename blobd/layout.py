"""Every path on disk and every object key in the mirror, in one place.

The data directory::

    <data_dir>/
      index.sqlite3            the index (plus -wal and -shm beside it)
      index.sqlite3-writer     flock()ed by whichever process writes the index
      lock                     flock()ed by the serving process
      blobs/ab/cd/<hash>       committed blobs, sharded by the first 2+2 hex
      tmp/put-<hash|new>-<pid>.<r>
                               bodies being received; hard-linked into blobs/
      tmp/del-<hash>-<pid>.<r> blobs being deleted (moved here inside the
                               index transaction, unlinked after it)
      uploads/<id>             preallocated data file of a resumable session
      quarantine/<name>.<ts>   files fsck --repair moved aside, and blob
                               files the scrub found damaged (<hash>.<ts>:
                               see :mod:`blobd.scrub`); kept for a person
                               to inspect, never deleted by blobd
      tmp/backup-index-<pid>.<r>
                               an index snapshot on its way to the mirror
      restoring                present while `blobd mirror restore` runs
      reserve                  spare room, given up to let deletions through
                               on a full disk (see :mod:`blobd.reserve`)

The mirror bucket::

    <prefix>/ab/cd/<hash>                       one object per blob, the same
                                                sharding as blobs/, so a
                                                listing reads like the tree
    <prefix>/_index/index-<UTC stamp>-<store id>.sqlite3
                                                index backups; the stamp
                                                sorts, so the newest is last,
                                                and the id names the index
                                                (keys without one were made
                                                before backups carried it)

Only validated digests (see :mod:`blobd.address`) and server-generated ids
are ever joined into a path here. A tmp/ name carries the id of the process
that made it, so what a dead worker process left behind can be told from
what its live siblings are working on (see :func:`tmp_pid`).
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .address import is_blake3_hex

_SESSION_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def index_path(self) -> Path:
        return self.root / "index.sqlite3"

    @property
    def writer_lock_path(self) -> Path:
        return self.root / "index.sqlite3-writer"

    @property
    def lock_path(self) -> Path:
        return self.root / "lock"

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    @property
    def reserve_path(self) -> Path:
        return self.root / "reserve"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    @property
    def metrics_dir(self) -> Path:
        """The request metrics of ``[server] workers = N``, one file set per
        worker process (prometheus_client's multiprocess mode); made anew
        by each ``blobd serve``."""
        return self.root / "metrics"

    @property
    def restore_marker_path(self) -> Path:
        return self.root / "restoring"

    def directories(self) -> list[Path]:
        return [self.root, self.blobs_dir, self.tmp_dir, self.uploads_dir]

    def blob_path(self, digest: str) -> Path:
        _check_digest(digest)
        return self.blobs_dir / digest[0:2] / digest[2:4] / digest

    def new_temp_path(self, digest: str | None = None) -> Path:
        """A fresh name for a body being received (the hash may be unknown)."""
        if digest is not None:
            _check_digest(digest)
        return self.tmp_dir / f"put-{digest or 'new'}-{_unique()}"

    def trash_path(self, digest: str) -> Path:
        _check_digest(digest)
        return self.tmp_dir / f"del-{digest}-{_unique()}"

    def trash_paths(self, digest: str) -> list[Path]:
        """The names a blob's file may have while its deletion commits."""
        _check_digest(digest)
        return sorted(self.tmp_dir.glob(f"del-{digest}-*"))

    def backup_temp_path(self) -> Path:
        """A fresh name for an index snapshot (start-up removes leftovers)."""
        return self.tmp_dir / f"backup-index-{_unique()}"

    def upload_path(self, session_id: str) -> Path:
        if not session_id or not set(session_id) <= _SESSION_ID_CHARS:
            raise ValueError(f"not a session id: {session_id!r}")
        return self.uploads_dir / session_id

    def quarantine_path(self, name: str, stamp: str) -> Path:
        return self.quarantine_dir / f"{Path(name).name}.{stamp}"

    def damaged_path(self, digest: str, stamp: str) -> Path:
        """Where the scrub puts a damaged blob file: named by its digest
        (validated), never by anything a client sent."""
        _check_digest(digest)
        return self.quarantine_dir / f"{digest}.{stamp}"


def parse_tmp_name(name: str) -> tuple[str, str | None] | None:
    """Split a tmp/ entry into (kind, digest): ("put"|"del", hex or None)."""
    parts = name.split("-")
    if len(parts) != 3 or parts[0] not in ("put", "del"):
        return None
    digest = parts[1] if is_blake3_hex(parts[1]) else None
    return parts[0], digest


def tmp_pid(name: str) -> int | None:
    """The id of the process that made a tmp/ entry, if the name has one."""
    parts = name.split("-")
    pid = parts[2].split(".")[0] if len(parts) == 3 and "." in parts[2] else ""
    return int(pid) if pid.isascii() and pid.isdigit() else None


def _unique() -> str:
    return f"{os.getpid()}.{secrets.token_hex(6)}"


def mirror_key(prefix: str, digest: str) -> str:
    _check_digest(digest)
    head = prefix.strip("/")
    tail = f"{digest[0:2]}/{digest[2:4]}/{digest}"
    return f"{head}/{tail}" if head else tail


def digest_from_mirror_key(prefix: str, key: str) -> str | None:
    """The digest an object key names, or None for anything else in the bucket."""
    head = prefix.strip("/")
    rest = key[len(head) + 1 :] if head and key.startswith(head + "/") else key
    parts = rest.split("/")
    if head and not key.startswith(head + "/"):
        return None
    if len(parts) != 3 or not is_blake3_hex(parts[2]):
        return None
    digest = parts[2]
    return digest if parts[0] == digest[0:2] and parts[1] == digest[2:4] else None


BACKUP_DIR = "_index"
_BACKUP_NAME = re.compile(r"index-(\d{8}T\d{6}\.\d{6}Z)(?:-([0-9a-f]{32}))?\.sqlite3")
_STORE_ID = re.compile(r"[0-9a-f]{32}")


# S3 refuses an object key longer than this many bytes of UTF-8.
S3_MAX_KEY_BYTES = 1024


def mirror_longest_key(prefix: str) -> tuple[str, str]:
    """(what it names, key) of the longest key the mirror writes under
    ``prefix``, of all the kinds above: the one S3's limit stops first."""
    keys = [("blobs (<prefix>/ab/cd/<hash>)", mirror_key(prefix, "0" * 64)),
            (f"index backups (<prefix>/{BACKUP_DIR}/index-<stamp>-<store id>.sqlite3)",
             mirror_backup_key(prefix, 0.0, "0" * 32))]
    return max(keys, key=lambda named: len(named[1].encode()))


def mirror_blobs_prefix(prefix: str) -> str:
    """What every blob key (and every backup key) starts with: for listing."""
    head = prefix.strip("/")
    return f"{head}/" if head else ""


def mirror_backup_prefix(prefix: str) -> str:
    return f"{mirror_blobs_prefix(prefix)}{BACKUP_DIR}/"


def mirror_backup_key(prefix: str, at: float, store_id: str) -> str:
    """The key of an index backup of store ``store_id`` taken at ``at``
    (Unix time, UTC stamp)."""
    if not _STORE_ID.fullmatch(store_id):
        raise ValueError(f"not a store id: {store_id!r}")
    moment = datetime.fromtimestamp(at, tz=timezone.utc)
    return (f"{mirror_backup_prefix(prefix)}index-{moment:%Y%m%dT%H%M%S.%f}Z"
            f"-{store_id}.sqlite3")


def parse_backup_key(prefix: str, key: str) -> tuple[float, str | None] | None:
    """(when taken, store id or None) of the backup at ``key``; None for any
    other key. Backups from before store ids have none."""
    head = mirror_backup_prefix(prefix)
    match = _BACKUP_NAME.fullmatch(key[len(head):]) if key.startswith(head) else None
    if match is None:
        return None
    moment = datetime.strptime(match[1], "%Y%m%dT%H%M%S.%fZ")
    return moment.replace(tzinfo=timezone.utc).timestamp(), match[2]


def backup_time_from_key(prefix: str, key: str) -> float | None:
    """When the backup at ``key`` was taken; None for any other key."""
    parsed = parse_backup_key(prefix, key)
    return parsed[0] if parsed is not None else None


def _check_digest(digest: str) -> None:
    if not is_blake3_hex(digest):
        raise ValueError(f"not a blake3 digest: {digest!r}")

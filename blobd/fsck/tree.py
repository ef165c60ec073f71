"""The blob tree as it is on disk: blocking functions, each one whole
operation for one ``asyncio.to_thread`` call.

A shard (``blobs/ab/``) is read with ``os.scandir`` in one call: every entry
is either a two-hex-digit directory holding files named by a digest that
starts with its path, or it is something blobd never makes. A directory or
file that cannot be read (no permission, an I/O error) is reported as such,
and the blobs it would hold are not judged: they are neither missing nor
orphans, only unknown.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..address import is_blake3_hex
from ..files import Digests, fsync_dirs, hash_open_file

_SHARD = re.compile(r"[0-9a-f]{2}")
PREFIXES = [f"{i:02x}" for i in range(256)]


@dataclass(frozen=True)
class FileInfo:
    size: int
    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileInfo":
        return cls(st.st_size, st.st_dev, st.st_ino)


@dataclass
class ShardScan:
    """One top-level shard: blob files in their right place, and the rest."""
    files: dict[str, FileInfo] = field(default_factory=dict)
    strays: list[tuple[Path, str]] = field(default_factory=list)      # (path, why)
    misplaced: list[tuple[Path, str]] = field(default_factory=list)   # (path, digest)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (path, why)
    # Digest prefixes ("ab", "abcd") of directories that could not be read.
    unknown: list[str] = field(default_factory=list)

    def cannot_read(self, path: Path, prefix: str, exc: OSError) -> None:
        self.unreadable.append((path, why_unreadable(path, exc)))
        self.unknown.append(prefix)


@dataclass(frozen=True)
class Unreadable:
    """A blob file whose content could not be read."""
    why: str


def scan_top(blobs_dir: Path) -> ShardScan:
    """Entries of ``blobs/`` that are not shard directories: strays, or
    blob files one level or two too high (misplaced)."""
    scan = ShardScan()
    try:
        entries = list(os.scandir(blobs_dir))
    except FileNotFoundError:
        return scan
    for entry in entries:
        if not (_SHARD.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
            _not_a_shard(scan, entry)
    return scan


def _not_a_shard(scan: ShardScan, entry: os.DirEntry) -> None:
    # A blob file moved by hand to the wrong level is put back by --repair
    # (after it is verified), not quarantined (found by review).
    if entry.is_file(follow_symlinks=False) and is_blake3_hex(entry.name):
        scan.misplaced.append((Path(entry.path), entry.name))
    else:
        scan.strays.append((Path(entry.path), "not a shard directory"))


def scan_shard(blobs_dir: Path, prefix: str) -> ShardScan:
    scan = ShardScan()
    try:
        subdirs = list(os.scandir(blobs_dir / prefix))
    except (FileNotFoundError, NotADirectoryError):
        return scan
    except OSError as exc:
        scan.cannot_read(blobs_dir / prefix, prefix, exc)
        return scan
    for sub in subdirs:
        if not (_SHARD.fullmatch(sub.name) and sub.is_dir(follow_symlinks=False)):
            _not_a_shard(scan, sub)
            continue
        try:
            for entry in os.scandir(sub.path):
                _classify(scan, entry, prefix + sub.name)
        except OSError as exc:
            scan.cannot_read(Path(sub.path), prefix + sub.name, exc)
    return scan


def _classify(scan: ShardScan, entry: os.DirEntry, shard: str) -> None:
    path = Path(entry.path)
    if not entry.is_file(follow_symlinks=False):
        scan.strays.append((path, "not a regular file"))
    elif not is_blake3_hex(entry.name):
        scan.strays.append((path, "not named by a digest"))
    elif not entry.name.startswith(shard):
        scan.misplaced.append((path, entry.name))
    else:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return  # deleted while we looked: the comparison is re-checked anyway
        scan.files[entry.name] = FileInfo.of(st)


def stat_file(path: Path) -> FileInfo | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return FileInfo.of(st)


def hash_blob(path: Path) -> tuple[Digests, FileInfo] | Unreadable | None:
    """Hash a blob file; with the identity of the file that was hashed, so
    a live server replacing it meanwhile is not mistaken for damage. None
    when there is no such file."""
    try:
        with open(path, "rb", buffering=0) as fh:
            return hash_open_file(fh), FileInfo.of(os.fstat(fh.fileno()))
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Unreadable(why_unreadable(path, exc))


def hash_blobs(paths: list[Path]) -> list[tuple[Digests, FileInfo] | Unreadable | None]:
    return [hash_blob(path) for path in paths]


def why_unreadable(path: Path, exc: OSError) -> str:
    """The error, with the owner and mode that explain most of them (a
    directory made by a run as another user, root say)."""
    reason = exc.strerror or str(exc)
    try:
        st = os.lstat(path)
    except OSError:
        return reason
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"{reason} (owner {owner}, mode {stat.S_IMODE(st.st_mode):04o})"


def move_aside(path: Path, quarantine: Path, stamp: str) -> Path:
    """Move a file or directory into ``quarantine/`` (never deleting it),
    durably: a crash after a repair must not put a damaged file back in the
    tree for the next check to find again. Returns where it went."""
    made = not quarantine.exists()
    quarantine.mkdir(parents=True, exist_ok=True)
    target = quarantine / f"{path.name}.{stamp}"
    n = 1
    while target.exists() or target.is_symlink():
        target = quarantine / f"{path.name}.{stamp}-{n}"
        n += 1
    shutil.move(str(path), target)
    fsync_dirs([quarantine, path.parent, *([quarantine.parent] if made else [])])
    return target


def put_in_place(path: Path, final: Path) -> None:
    """Move a verified, misplaced blob file to its right name, durably."""
    created = [d for d in (final.parent.parent, final.parent) if not d.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    os.link(path, final)
    os.unlink(path)
    fsync_dirs([final.parent, path.parent, *(d.parent for d in created)])

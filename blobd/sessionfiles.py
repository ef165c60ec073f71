"""Blocking operations on session data files; callers run each in a thread.

A session's bytes go straight into their place in one preallocated file
(``layout.upload_path(id)``) with ``pwrite``, so completing a session needs
no reassembly copy: the file is hashed and hard-linked into the blob tree.

Writers hold an ``flock`` on the file while they write: shared for native
chunks (many may arrive in parallel, each to its own range), exclusive for
a tus PATCH (one offset, one writer) and for completion (nobody may write
while the file is hashed and linked). ``flock`` is per open file, so it also
orders two requests of the same process, and the kernel drops it if the
process dies.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from .errors import BlobdError
from .files import fsync_dir
from .layout import Layout


def create(path: Path, size: int | None, fsync: bool) -> None:
    """A new session file of ``size`` bytes, allocated on disk now so that a
    full disk shows up at creation, not at 90 %. ``None``: length unknown.
    With ``fsync`` the file and its name survive a power cut, as the row
    that will point at them does."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        if size:
            _allocate(fd, size)
        if fsync:
            os.fsync(fd)
            fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _allocate(fd: int, size: int, start: int = 0) -> None:
    try:
        os.posix_fallocate(fd, start, size - start)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BlobdError("insufficient_storage",
                             "not enough free disk space for this upload") from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        # A file system without fallocate (tmpfs on old kernels, some FUSE):
        # the right length at least, allocated as it is written.
        os.ftruncate(fd, size)


def extend(path: Path, size: int) -> None:
    """Allocate a deferred-length file once its length is known, and cut
    what lies past it: a refused PATCH (a checksum mismatch, a full disk)
    may have written bytes past the offset it never recorded, and the file
    must hold the upload's bytes and nothing else."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        _allocate(fd, size)
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def allocate(fd: int, start: int, length: int) -> None:
    """Allocate ``length`` bytes at ``start`` (growing the file to their
    end): room a deferred-length PATCH holds ahead of its bytes, taken
    from the disk before they are read. Insufficient storage if the disk
    has not that much."""
    if length > 0:
        _allocate(fd, start + length, start)


def cut_open(fd: int, size: int) -> None:
    """Cut an open file to ``size`` bytes if it holds more."""
    if os.fstat(fd).st_size > size:
        os.ftruncate(fd, size)


def cut_to(path: Path, size: int | None) -> None:
    """Cut the file to ``size`` bytes if it holds more."""
    if size is not None and os.stat(path).st_size > size:
        os.truncate(path, size)


def open_locked(path: Path, exclusive: bool) -> int | None:
    """Open the session file and take its lock without waiting; None when
    another writer holds it. FileNotFoundError when the file is gone."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


# struct flock on Linux (x86-64, arm64): l_type, l_whence, l_start, l_len,
# l_pid (0 for an open file description lock), padded to 32 bytes.
_FLOCK = struct.Struct("hhqqi4x")


def lock_range(fd: int, start: int, length: int) -> bool:
    """Take a write lock on ``length`` bytes at ``start`` without waiting;
    False when another open of the file holds any of them.

    An open file description lock (``F_OFD_SETLK``): it belongs to this
    open of the file, so two requests conflict whether they run in one
    worker process or in two, and closing ``fd`` (or dying) lets it go.
    A native chunk holds one over its range while it is received, so a
    second copy of the chunk can never write over the first."""
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


# A request that finds part of an upload held by another asks that one to
# let go by "knocking": holding a lock on one byte far past any data, one
# byte per part (the whole upload, or a native chunk). The holder looks for
# a knock while it waits for its body and between writes (see
# sessionwrite._Preemption). Open file description locks, like
# lock_range's: seen across worker processes, gone when the fd closes.
_KNOCK_BASE = 1 << 62
WHOLE = -1   # the knock slot of the whole upload; chunk i knocks on slot i


def knock(path: Path, slot: int) -> int:
    """Knock on ``slot`` of the session file; the fd whose closing takes
    the knock back. Someone knocking there already is as good."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _KNOCK_BASE + 1 + slot, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
    return fd


def knocked(fd: int, slots: tuple[int, ...]) -> bool:
    """Whether another open of the file knocks on one of ``slots``."""
    for slot in slots:
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _KNOCK_BASE + 1 + slot, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
        if _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK:
            return True
    return False


def write_at(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BlobdError("insufficient_storage", "the disk is full") from exc
        raise


def sync(fd: int) -> None:
    os.fdatasync(fd)


def close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def concatenate(sources: list[tuple[Path, int]], dest: Path, fsync: bool) -> None:
    """Build a session file from finished parts (tus concatenation), the
    first ``size`` bytes of each ``(path, size)``, copied in the kernel
    (``copy_file_range``, a reflink where the file system can)."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        offset = 0
        for source, remaining in sources:
            with open(source, "rb", buffering=0) as src:
                while remaining:
                    copied = os.copy_file_range(src.fileno(), fd, remaining,
                                                offset_dst=offset)
                    if copied == 0:
                        raise OSError(f"{source.name} ended early")
                    offset += copied
                    remaining -= copied
        if fsync:
            os.fsync(fd)
            fsync_dir(dest.parent)
    except BaseException:
        os.close(fd)
        os.unlink(dest)
        raise
    os.close(fd)


def stray_files(layout: Layout, keep: set[str], older_than: float) -> list[Path]:
    """Files in uploads/ that no open session owns, untouched since
    ``older_than`` (a session being created writes its file just before
    its row, so a fresh file may be about to get one)."""
    strays = []
    for entry in os.scandir(layout.uploads_dir):
        if entry.name in keep:
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime < older_than:
                strays.append(Path(entry.path))
        except FileNotFoundError:
            continue
    return strays

"""Blocking file operations on the store; callers run each in a thread.

Every function here is one whole operation, so one ``asyncio.to_thread``
call covers it. Blobs enter their final place by hard link from a temp file
(its data durable before the commit, see :func:`make_durable`) and leave it by rename into tmp/ (see :mod:`blobd.layout`), both
inside the index transaction, so the store never shows a partial file under
a final name and a crash at any point is undone by :func:`recover_tmp`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import pwd
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import blake3

from .errors import BlobdError
from .layout import Layout, parse_tmp_name, tmp_pid

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
HEAD_SIZE = 64
def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2): everything written to one file system, durable."""
    try:
        func = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    return func


_syncfs = _load_syncfs()

# A commit with more entries than this to make durable uses one syncfs(2)
# of the store's file system instead of an fsync per file and directory.
# Each fsync of a directory whose journal transaction has already been
# committed still flushes the disk's cache, so ten uploads in ten shard
# directories cost ten flushes; syncfs costs one journal commit and one
# flush for all of them (a batch of 8 uploads: ~1 ms, against ~2.4 ms for
# the fsyncs in parallel and ~3.8 ms one after another, here).
SYNCFS_THRESHOLD = 2
# syncfs also writes out whatever else is dirty on that file system, other
# programs' data included. Batches once fell back to fsyncing their own
# entries while more than 16 MiB was dirty; in the benchmark, after other
# servers' unsynced 1 GiB writes, that made small uploads slower (736 vs 880
# req/s) and their p99 worse (153 vs 65 ms): on ext4 (data=ordered) the
# journal commit an fsync waits for must write the other files' newly
# allocated data too, so per-entry fsyncs do not escape it either.
_syncers = concurrent.futures.ThreadPoolExecutor(max_workers=16,
                                                 thread_name_prefix="blobd-sync")


@dataclass(frozen=True)
class Digests:
    blake3: str
    sha256: str
    size: int
    head: bytes  # the first bytes, for content sniffing


def digests_of(data: bytes | bytearray) -> Digests:
    """The digests of a body held whole in memory."""
    return Digests(blake3.blake3(data).hexdigest(), hashlib.sha256(data).hexdigest(),
                   len(data), bytes(data[:HEAD_SIZE]))


# Buffers and sizes written with O_DIRECT are multiples of this (a page,
# which covers 512- and 4096-byte logical blocks alike).
DIRECT_ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)


class _AlignedBuffers:
    """Page-aligned buffers for :func:`write_new_file`'s ``O_DIRECT``
    writes, kept for reuse: memory fresh from the kernel costs a page fault
    per page to fill, the very cost that writing around the page cache is
    there to save."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def buffer(self) -> Iterator[mmap.mmap]:
        with self._lock:
            buffer = self._free.pop() if self._free else None
        if buffer is None:
            buffer = mmap.mmap(-1, self.size)
        try:
            yield buffer
        finally:
            with self._lock:
                if len(self._free) < self.keep:
                    self._free.append(buffer)
                    buffer = None
            if buffer is not None:
                buffer.close()


# Kept: 8, a busy server's usual number of small bodies being written at
# once (more are made as needed, and closed after); only the pages a body
# touched are resident.
_BUFFERS = _AlignedBuffers(512 << 10, keep=8)


def write_new_file(path: Path, data: bytes | bytearray, fsync: bool,
                   direct: bool = False) -> None:
    """Create ``path`` with ``data`` (fsynced when asked); nothing is left
    behind on failure.

    ``direct``: the whole pages of ``data`` go to the disk with
    ``O_DIRECT``, from a page-aligned copy, and only the last partial page
    through the page cache. For a body that must reach the disk before its
    answer anyway this is cheaper than the page cache: there, every new
    file takes fresh pages, each a page fault to fill (on a VM with free
    page reporting, a fault of the host too) and then writeback. A file
    system that refuses ``O_DIRECT`` (tmpfs) gets ordinary writes.
    """
    fd, direct = create_new(path, direct=direct and len(data) >= DIRECT_ALIGN)
    try:
        view = memoryview(data)
        if direct:
            view = _write_direct(fd, view)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        remove_quietly(path)
        if isinstance(exc, OSError):
            raise storage_error(exc) from exc
        raise
    os.close(fd)


def _write_direct(fd: int, view: memoryview) -> memoryview:
    """Write the whole pages of ``view`` with ``O_DIRECT``; return the rest,
    for ordinary writes (the file's O_DIRECT is off by then)."""
    try:
        with _BUFFERS.buffer() as buffer:
            while len(view) >= DIRECT_ALIGN:
                size = min(len(view) - len(view) % DIRECT_ALIGN, _BUFFERS.size)
                buffer[:size] = view[:size]
                written = os.write(fd, memoryview(buffer)[:size])
                view = view[written:]
                if written < size:  # short: the rest may be unaligned now
                    break
    except OSError as exc:
        # A device whose blocks O_DIRECT cannot meet at page alignment.
        if exc.errno != errno.EINVAL:
            raise
    end_direct(fd)
    return view


def create_new(path: Path, direct: bool = False) -> tuple[int, bool]:
    """Create ``path`` (never an existing file) for writing; with ``direct``
    opened ``O_DIRECT`` where the file system allows it (tmpfs and a few
    others refuse). The descriptor, and whether it is ``O_DIRECT``.

    Its mode is the umask's: a server's keeps the data dir private (see
    :func:`make_dirs`), `blobd get` writes the user's file as any tool would."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    direct = direct and O_DIRECT != 0
    try:
        return os.open(path, flags | (O_DIRECT if direct else 0), 0o666), direct
    except OSError as exc:
        if not (direct and exc.errno == errno.EINVAL):
            raise storage_error(exc) from exc
    try:
        return os.open(path, flags, 0o666), False
    except OSError as exc:
        raise storage_error(exc) from exc


def end_direct(fd: int) -> None:
    """Ordinary writes from here on (a piece O_DIRECT cannot take)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)


def hash_file(path: Path, progress: Callable[[int], None] | None = None) -> Digests:
    """Hash a whole file (upload sessions, fsck --verify, mirror heal)."""
    with open(path, "rb", buffering=0) as fh:
        return hash_open_file(fh, progress)


def hash_open_file(fh: BinaryIO, progress: Callable[[int], None] | None = None) -> Digests:
    """Hash what is left of an open (unbuffered) file."""
    hasher = Hasher()
    while chunk := fh.read(READ_SIZE):
        hasher.update(chunk)
        if progress:
            progress(len(chunk))
    return hasher.digests()


class Hasher:
    """The digests of bytes fed in pieces, for bodies never held whole.
    ``update`` hashes: call it in a thread."""

    def __init__(self) -> None:
        self._b3, self._sha = blake3.blake3(), hashlib.sha256()
        self.size = 0
        self._head = b""

    def update(self, data: bytes | bytearray) -> None:
        self._b3.update(data)
        self._sha.update(data)
        if not self._head:
            self._head = bytes(data[:HEAD_SIZE])
        self.size += len(data)

    def digests(self) -> Digests:
        return Digests(self._b3.hexdigest(), self._sha.hexdigest(), self.size, self._head)


def link_into_place(temp: Path, final: Path) -> list[Path]:
    """Give a verified temp file its final name (the temp name stays).

    Returns the directories that gained an entry, to be fsynced before the
    index says the blob exists: the file's own, and the parent of each shard
    directory made for it. Shard directories are made only when the link
    finds one missing: most of the time it is one system call.
    """
    changed = [final.parent]
    try:
        try:
            _link(temp, final)
        except FileNotFoundError:
            changed += _make_dirs(final.parent)
            _link(temp, final)
    except OSError as exc:
        raise storage_error(exc) from exc
    return changed


def _link(temp: Path, final: Path) -> None:
    try:
        os.link(temp, final)
    except FileExistsError:
        # A file nobody indexed (an orphan, or damage): ours is verified.
        os.unlink(final)
        os.link(temp, final)


def run_undo(steps: list[Callable[[], None]]) -> None:
    """Reverse the file changes of a transaction that rolled back, newest
    first (see :attr:`blobd.store.Tx.undo`)."""
    for step in reversed(steps):
        try:
            step()
        except OSError:
            # What cannot be undone now is undone by recover() at start-up.
            log.exception("could not undo a file change of a failed transaction")


def unlink_if_same(final: Path, temp: Path) -> None:
    """Undo :func:`link_into_place` after its transaction failed: remove the
    final name only if it is still our link, never another's blob."""
    if is_same_file(final, temp):
        remove_quietly(final)


def make_shard_dirs(final: Path) -> list[Path]:
    """Make the shard directories of a blob's final path ahead of its
    commit, outside the index's write lock (nothing removes an empty shard
    directory); the directories that gained an entry, to be made durable
    with the blob."""
    try:
        return _make_dirs(final.parent)
    except OSError as exc:
        raise storage_error(exc) from exc


def _make_dirs(directory: Path) -> list[Path]:
    """Make ``directory`` and its missing parents; the directories that
    gained an entry."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        # FileExistsError: made by a concurrent upload (another worker) meanwhile.
        with contextlib.suppress(FileExistsError):
            path.mkdir()
    return [path.parent for path in missing]


def move_to_trash(final: Path, trash: Path) -> bool:
    try:
        os.rename(final, trash)
    except FileNotFoundError:
        return False
    return True


def fsync_dir(path: Path) -> None:
    _fsync(path, os.O_DIRECTORY)


def fsync_file(path: Path) -> None:
    _fsync(path)


def _fsync(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install_verified(temp: Path, final: Path, fsync: bool) -> None:
    """Move a verified copy of an indexed blob over its final name (heal,
    restore). rename(2) replaces a damaged file atomically: a reader sees
    the old file or the good one, never no file. With ``fsync`` the new
    directory entries are durable when this returns."""
    created = [d for d in (final.parent.parent, final.parent) if not d.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, final)
    if fsync:
        for directory in [final.parent] + [d.parent for d in created]:
            fsync_dir(directory)


def fsync_dirs(paths: list[Path]) -> None:
    """fsync each directory once."""
    for path in dict.fromkeys(paths):
        fsync_dir(path)


def make_durable(root: Path, files: list[Path], dirs: list[Path]) -> None:
    """Make the data of ``files`` and the entries of ``dirs`` (all on the
    file system of ``root``) durable: one syncfs(2) when there are many
    (see SYNCFS_THRESHOLD), else an fsync each (in parallel where there is
    no syncfs)."""
    dirs = list(dict.fromkeys(dirs))
    entries = len(files) + len(dirs)
    if entries > SYNCFS_THRESHOLD and _syncfs is not None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs: {os.strerror(err)}")
        finally:
            os.close(fd)
    elif entries > SYNCFS_THRESHOLD:
        pending = [_syncers.submit(fsync_file, path) for path in files]
        pending += [_syncers.submit(fsync_dir, path) for path in dirs]
        concurrent.futures.wait(pending)
        for future in pending:
            future.result()  # the first error, if any
    else:
        for path in files:
            fsync_file(path)
        fsync_dirs(dirs)


def remove_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# The data dir holds every owner's blobs, reference names and token
# digests: nothing blobd creates there is for other local users, whatever
# umask it was started with (blobd.service runs with UMask=0077).
PRIVATE_UMASK = 0o027


def make_dirs(layout: Layout) -> None:
    """Make the data dir ready for this process to write to: refuse it if
    another user owns it (see :func:`check_data_dir_owner`), make what
    this process creates from now on private (group may read, others
    nothing) and create its directories."""
    check_data_dir_owner(layout.root)
    os.umask(os.umask(PRIVATE_UMASK) | PRIVATE_UMASK)
    for directory in layout.directories():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            # A file where a directory must be: mkdir's own words ("File
            # exists") would not say what is wrong with it.
            blocker = next((p for p in (directory, *directory.parents)
                            if p.exists() and not p.is_dir()), directory)
            raise BlobdError("conflict", f"{blocker} is not a directory") from None


def check_data_dir_owner(root: Path) -> None:
    """Refuse a data dir that belongs to another user than this process's
    effective one. What a writer creates there (the lock, shard
    directories, blob files) is its own: run as root on the service user's
    store, it would leave files the server cannot write, failing later with
    500s instead of now. A dir not yet made will be ours."""
    try:
        owner = os.stat(root).st_uid
    except FileNotFoundError:
        return
    me = os.geteuid()
    if owner != me:
        sudo_user = _user_name(owner) or f"'#{owner}'"
        raise BlobdError("forbidden", f"{root} belongs to {_user(owner)} and this command"
                         f" runs as {_user(me)}, whose files there the owner could not"
                         f" use: run it as the owner, e.g. sudo -u {sudo_user} blobd ...")


def _user(uid: int) -> str:
    name = _user_name(uid)
    return f"{name} (uid {uid})" if name else f"uid {uid}"


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def free_bytes(path: Path) -> tuple[int, int]:
    usage = shutil.disk_usage(path)
    return usage.free, usage.total


def is_same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class TmpEntry:
    path: Path
    kind: str | None  # "put", "del" or None for a name we never make
    digest: str | None
    pid: int | None = None  # the process that made it


def tmp_entries(layout: Layout) -> list[TmpEntry]:
    entries = []
    try:
        scan = list(os.scandir(layout.tmp_dir))
    except FileNotFoundError:
        return []  # a reader (fsck) may find none: only writers make it
    for entry in scan:
        parsed = parse_tmp_name(entry.name)
        kind, digest = parsed if parsed else (None, None)
        entries.append(TmpEntry(Path(entry.path), kind, digest, tmp_pid(entry.name)))
    return entries


def restore_from_trash(trash: Path, final: Path) -> None:
    """Put a moved-aside blob back, unless its name was filled meanwhile
    (by a verified copy of the same content)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.link(trash, final)
    os.unlink(trash)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def storage_error(exc: OSError) -> Exception:
    """A write's OSError as the contract's error when it is a full disk."""
    if is_disk_full(exc):
        return BlobdError("insufficient_storage", "the disk is full")
    return exc

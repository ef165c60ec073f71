"""Writing an upload's body to its temp file while hashing it.

:class:`BodyWriter` is the one writer of streamed bodies (PUT and POST
through aiohttp, bodies read off the socket by :mod:`blobd.sockbody`, and
``blobd get`` on the client side); bodies held whole in memory are written by
:func:`blobd.files.write_new_file`. Blocking: callers run it in threads.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
from pathlib import Path
from typing import Callable

import blake3

from .errors import BlobdError
from .files import (DIRECT_ALIGN, HEAD_SIZE, Digests, create_new, end_direct,
                    remove_quietly, storage_error)

# Start disk writeback every this many bytes while a durable body arrives
# (and wait for the window before). 8 MiB drained the disk's queue between
# windows: 1 GiB PUTs ran at 0.89x dd conv=fsync, at 32 MiB at ~1.0x. Dirty
# page cache per upload stays under two windows.
WRITEBACK_WINDOW = 32 << 20

_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2), which the os module does not expose."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_sync_file_range = _load_sync_file_range()


class BodyWriter:
    """Writes a body to a new temp file while hashing it, in one pass.

    ``min_free_bytes``: after each write the file system's free space is
    checked (one ``fstatvfs``, no extra thread hop), so a body of unknown
    length, or many bodies at once, stop with ``insufficient_storage``
    before the disk is actually full.

    ``durable``: disk writeback starts while the body arrives (see
    :meth:`_start_writeback`).

    ``direct``: the file is written with ``O_DIRECT`` where the file system
    allows it, straight from the caller's buffers to the disk, without
    copying through the page cache (see :mod:`blobd.sockbody`). The caller
    gives page-aligned buffers of a multiple of ``DIRECT_ALIGN`` bytes; the
    first piece that is not (the last of a body, normally) switches the
    file to ordinary writes for the rest.
    """

    def __init__(self, path: Path, min_free_bytes: int = 0, durable: bool = False,
                 direct: bool = False) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self._flushed = 0  # bytes whose writeback has been started
        self._fd, self._direct = create_new(path, direct)
        # Writes that skip the page cache leave no writeback to start.
        self._durable = durable and _sync_file_range is not None and not self._direct
        self._blake3 = blake3.blake3()
        self._sha256 = hashlib.sha256()
        self._size = 0  # bytes hashed
        self._stored = 0  # bytes written
        self._head = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.store(data)
        self.digest(data)

    def store(self, data: bytes | bytearray | memoryview) -> None:
        """The file half of :meth:`write`; every piece must also be given,
        in order, to :meth:`digest` (which may run on another thread)."""
        view = memoryview(data)
        if self._direct and len(view) % DIRECT_ALIGN:
            self._end_direct()
        try:
            while view:
                try:
                    written = os.write(self._fd, view)
                except OSError as exc:
                    # A buffer O_DIRECT cannot take (its address or size
                    # off the device's alignment): write it the usual way.
                    if not (self._direct and exc.errno == errno.EINVAL):
                        raise
                    self._end_direct()
                    continue
                view = view[written:]
        except OSError as exc:
            raise storage_error(exc) from exc
        if self.min_free_bytes and _free_at(self._fd) < self.min_free_bytes:
            raise BlobdError("insufficient_storage",
                             "the disk is nearly full ([storage] min_free_bytes)")
        self._stored += len(data)
        if self._durable and self._stored - self._flushed >= WRITEBACK_WINDOW:
            self._start_writeback()

    def _end_direct(self) -> None:
        end_direct(self._fd)
        self._direct = False

    def digest(self, data: bytes | bytearray | memoryview) -> None:
        """The hashing half of :meth:`write`."""
        # blake3 and hashlib release the GIL on large buffers: this runs in
        # parallel with the event loop and with other uploads.
        self._blake3.update(data)
        self._sha256.update(data)
        if len(self._head) < HEAD_SIZE:
            self._head += bytes(data[: HEAD_SIZE - len(self._head)])
        self._size += len(data)

    def write_all(self, parts: list[bytes]) -> None:
        for part in parts:
            self.write(part)

    def _start_writeback(self) -> None:
        """Keep the disk busy while the body is still arriving, so the final
        fsync has little left to do: start writeback of the new window and
        wait for the window before it (which also bounds dirty pages)."""
        assert _sync_file_range is not None
        start, end = self._flushed, self._stored
        _sync_file_range(self._fd, start, end - start, _SYNC_FILE_RANGE_WRITE)
        if start:
            previous = max(0, start - WRITEBACK_WINDOW)
            _sync_file_range(self._fd, previous, start - previous,
                             _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE
                             | _SYNC_FILE_RANGE_WAIT_AFTER)
        self._flushed = end

    def finish(self, fsync: bool) -> Digests:
        try:
            if fsync:
                os.fsync(self._fd)
        except OSError as exc:
            raise storage_error(exc) from exc
        finally:
            os.close(self._fd)
            self._fd = -1
        return Digests(self._blake3.hexdigest(), self._sha256.hexdigest(),
                       self._size, self._head)

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        remove_quietly(self.path)


def _free_at(fd: int) -> int:
    stat = os.fstatvfs(fd)
    return stat.f_bavail * stat.f_frsize

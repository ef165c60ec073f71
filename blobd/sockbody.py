"""Large bodies received straight from the connection's socket, off the event loop.

aiohttp receives a body on the event loop: every read lands in a new bytes
object that its parser copies into the request's stream, and the pieces then
travel to a writer thread. For one 1 GiB upload that path tops out near
300 MB/s, the event loop's core being the bound (bench/README.md). A body
whose length is declared, on a plain TCP connection, is instead read by a
thread of its own into buffers it reuses and written to the file there,
while a second thread hashes what the first has written: nothing of it
touches the event loop. The HTTP side (which requests qualify, and closing
the connection afterwards, since aiohttp's parser never sees the body) is
:mod:`blobd.http.takeover`.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import queue
import select
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import BlobdError
from .files import BodyWriter

# Reads fill buffers of this size from a pool shared by the process's
# uploads; each filled buffer is written, then hashed, on two more threads,
# then reused. The file is written with O_DIRECT (files.BodyWriter), from
# page-aligned buffers (mmap), so the bytes are not copied once more into the
# page cache. Measured on a 1 GiB PUT (bench/README.md, third round): these
# three stages ran at ~1,000 MB/s, with 4, 8 or 16 buffers alike; two stages
# (receive and write, hash) through the page cache at 530-900. POOL_BUFFERS
# bounds the memory of any number of parallel uploads (4 MiB).
BUFFER_SIZE = 1 << 20
POOL_BUFFERS = 4
# How often a receiver waiting on a silent client checks it was told to stop.
POLL_SECONDS = 0.2
# How long the rest of a body is read and dropped after a failed write.
LINGER_SECONDS = 10.0


@dataclass
class SocketBody:
    """The part of a request body aiohttp has not received yet, to be read
    from ``fd``: a duplicate of the connection's socket, so that the event
    loop closing the connection can never leave the reader on a reused
    descriptor number."""

    fd: int
    head: bytes  # what aiohttp had already received
    length: int  # the declared length, head included

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Stopped(Exception):
    """The receiver was told to stop (the request was cancelled)."""


async def receive_into(body: SocketBody, writer: BodyWriter) -> None:
    """Receive the rest of ``body`` into ``writer`` (stored and hashed) on
    threads of its own; ``body`` is closed afterwards.

    Raises ``bad_request`` when the client stops sending before the declared
    length, and whatever ``writer`` raises (a full disk). Cancelled, it stops
    the threads and waits for them before it lets go: the writer is the
    caller's to discard only once nothing writes to it any more.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    stop = threading.Event()

    def run() -> None:
        try:
            _pump(body, writer, stop)
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(_settle, done, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, None)

    # A thread per upload, not the default executor: a large upload holds
    # its threads for its whole length, and eight of them would starve
    # every small write and index read queued behind.
    threading.Thread(target=run, name="blobd-sockbody", daemon=True).start()
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        stop.set()
        # The threads notice within POLL_SECONDS (or when a write returns);
        # only then may the caller discard the writer, whose descriptor a
        # running thread would otherwise write to after its number is reused.
        while not done.done():
            try:
                await asyncio.wait([done])
            except asyncio.CancelledError:
                continue
        done.exception()  # what the stopped threads raised is moot
        raise
    finally:
        body.close()


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


def _pump(body: SocketBody, writer: BodyWriter, stop: threading.Event) -> None:
    """The receiver: fill a free buffer from what aiohttp had, then from the
    socket, and pass it down the stages; runs on its own thread."""
    hashing = _Stage("blobd-hash", writer.digest, _POOL.give)
    writing = _Stage("blobd-write", writer.store, hashing.put)
    poller = select.poll()
    poller.register(body.fd, select.POLLIN)
    head = memoryview(body.head)
    received = 0
    with _POOL.user():
        try:
            while received < body.length:
                if writing.failed or hashing.failed:
                    _linger(body, poller, stop, received)
                    break
                buffer = _POOL.take()
                try:
                    with memoryview(buffer) as whole:
                        view = whole[: min(len(buffer), body.length - received)]
                        copied = min(len(head), len(view))
                        view[:copied] = head[:copied]
                        head = head[copied:]
                        filled = copied + _fill(body, view[copied:], poller, stop,
                                                received + copied)
                        del view
                except BaseException:
                    _POOL.give(buffer)
                    raise
                received += filled
                writing.put(buffer, filled)
            writing.close()
            hashing.close()
        finally:
            writing.close(quiet=True)
            hashing.close(quiet=True)


def _linger(body: SocketBody, poller: select.poll, stop: threading.Event,
            received: int) -> None:
    """After a write failed (a full disk), read and drop the rest of the body
    for up to LINGER_SECONDS, as aiohttp does for a body a handler left
    unread: a client still sending would otherwise be reset by the close
    and might never read the error answered to it."""
    deadline = time.monotonic() + LINGER_SECONDS
    with mmap.mmap(-1, BUFFER_SIZE) as scratch, memoryview(scratch) as view:
        while received < body.length and time.monotonic() < deadline:
            want = min(len(view), body.length - received)
            try:
                received += _fill(body, view[:want], poller, stop, received)
            except (BlobdError, _Stopped):
                return


def _fill(body: SocketBody, view: memoryview, poller: select.poll,
          stop: threading.Event, received: int) -> int:
    """Read from the socket until ``view`` is full; the count read."""
    filled = 0
    while filled < len(view):
        if stop.is_set():
            raise _Stopped()
        try:
            count = os.readv(body.fd, [view[filled:]])
        except BlockingIOError:
            poller.poll(POLL_SECONDS * 1000)
            continue
        except ConnectionError:
            count = 0
        if count == 0:
            raise BlobdError("bad_request", f"body ended after {received + filled} of"
                             f" {body.length} bytes")
        filled += count
    return filled


class _Stage:
    """One thread doing ``work`` on each buffer put to it, in order, then
    passing the buffer on with ``after``. After a failure it only passes
    buffers on (so none is lost to the pool) and keeps the error for the
    receiver to raise."""

    def __init__(self, name: str, work: Callable[[memoryview], None],
                 after: Callable[[mmap.mmap, int], None]) -> None:
        self._work = work
        self._after = after
        self._queue: queue.SimpleQueue[tuple[mmap.mmap, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, buffer: mmap.mmap, size: int) -> None:
        self._queue.put((buffer, size))

    @property
    def failed(self) -> bool:
        return self._error is not None

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self, quiet: bool = False) -> None:
        """Wait until everything put is done; raises what ``work`` raised
        unless ``quiet``."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if not quiet:
            self.raise_error()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            buffer, size = item
            if self._error is None:
                try:
                    with memoryview(buffer) as view:
                        self._work(view[:size])
                except BaseException as exc:  # raised by the receiver
                    self._error = exc
            self._after(buffer, size)


class _BufferPool:
    """Page-aligned buffers shared by a process's uploads: at most ``count``
    exist; a receiver that finds none free waits for one (each comes back
    once hashed, so waiting always ends). Freed when no upload uses them."""

    def __init__(self, size: int, count: int) -> None:
        self._size = size
        self._count = count
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._users = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def user(self) -> Iterator[None]:
        with self._cond:
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if self._users == 0 and len(self._free) == self._made:
                    for buffer in self._free:
                        with contextlib.suppress(BufferError):  # unmapped when collected
                            buffer.close()
                    self._free.clear()
                    self._made = 0

    def take(self) -> mmap.mmap:
        with self._cond:
            while not self._free and self._made >= self._count:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._made += 1
        return mmap.mmap(-1, self._size)

    def give(self, buffer: mmap.mmap, _size: int = 0) -> None:
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()


_POOL = _BufferPool(BUFFER_SIZE, POOL_BUFFERS)

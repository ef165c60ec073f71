"""Large bodies received straight from the connection's socket, off the event loop.

aiohttp receives a body on the event loop: every read lands in a new bytes
object that its parser copies into the request's stream, and the pieces then
travel to a writer thread. For one 1 GiB upload that path tops out near
300 MB/s, the event loop's core being the bound (bench/README.md). A body
whose length is declared, on a plain TCP connection, is instead read by a
thread of its own into buffers it reuses, which a second thread writes to
the file and a third hashes: nothing of it touches the event loop. The
HTTP side (which requests qualify, and closing
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
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .errors import BlobdError, BodyStalled
from .bodywriter import BodyWriter
from .files import DIRECT_ALIGN

# Reads fill buffers of this size from a pool shared by the process's
# uploads; each filled buffer is written, then hashed, on two more threads,
# then reused. The file is written with O_DIRECT (bodywriter.BodyWriter), from
# page-aligned buffers (mmap), so the bytes are not copied once more into the
# page cache. Measured on a 1 GiB PUT (bench/README.md, third round): these
# three stages ran at ~1,000 MB/s, with 4, 8 or 16 buffers alike; two stages
# (receive and write, hash) through the page cache at 530-900. POOL_BUFFERS
# bounds the memory of any number of parallel uploads (4 MiB).
BUFFER_SIZE = 1 << 20
POOL_BUFFERS = 4
# How often a receiver waiting on a silent client checks it was told to stop.
POLL_SECONDS = 0.2
# A receiver gathers this much in a small buffer of its own before it
# takes one from the pool.
GATHER = 64 << 10
# The longest a receiver holds a buffer it is filling: a pausing client's
# buffer goes on part full (whole blocks), the rest is carried over.
HOLD_SECONDS = 0.05
# How long the rest of a body is read and dropped after a failed write.
LINGER_SECONDS = 10.0
# At most this many bodies are read off sockets at once in a process (three
# threads each); further ones go through aiohttp, slower but without threads
# of their own, so a crowd of stalled uploads cannot exhaust the tasks a
# service may start.
MAX_BODIES = 32
_slots = threading.BoundedSemaphore(MAX_BODIES)


def reserve() -> bool:
    """Claim a slot for a body to read off its socket (False when all
    MAX_BODIES are taken), to hand to a ``SocketBody(holds_slot=True)``,
    whose close gives it back."""
    return _slots.acquire(blocking=False)


def unreserve() -> None:
    """Give back a slot :func:`reserve` claimed when no SocketBody got it."""
    _slots.release()


@dataclass
class SocketBody:
    """The part of a request body aiohttp has not received yet, to be read
    from ``fd``: a duplicate of the connection's socket, so that the event
    loop closing the connection can never leave the reader on a reused
    descriptor number."""

    fd: int
    head: bytes  # what aiohttp had already received
    length: int  # the declared length, head included
    holds_slot: bool = False  # one of the MAX_BODIES (see reserve)
    idle: float | None = None  # seconds without a byte before BodyStalled
    # Body bytes received so far, head included (the request log's "in=");
    # only the receiver thread writes it.
    received: int = field(init=False)

    def __post_init__(self) -> None:
        self.received = len(self.head)

    def close(self) -> None:
        """Close the socket's duplicate and give back the slot (once)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if self.holds_slot:
                self.holds_slot = False
                _slots.release()


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
        outcome: BaseException | None = None
        try:
            _pump(body, writer, stop)
        except BaseException as exc:  # handed to the awaiting task
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(_settle, done, outcome)

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
    socket, and pass it down the stages; runs on its own thread.

    A buffer is taken only once GATHER bytes have come, and held for at most
    HOLD_SECONDS: a client that goes quiet, or trickles, never sits on a
    buffer the process's other uploads wait for.
    """
    hashing = _Stage("blobd-hash", writer.digest, _POOL.give)
    writing = _Stage("blobd-write", writer.store, hashing.put)
    sock = _Socket(body, stop)
    carry = body.head  # received, not passed on yet
    passed = 0
    with _POOL.user():
        try:
            while passed < body.length:
                if writing.failed or hashing.failed:
                    _linger(sock)
                    break
                if len(carry) < GATHER and passed + len(carry) < body.length:
                    # Not worth a buffer yet: gather a little first.
                    if not sock.wait(body.idle):
                        raise BodyStalled(body.idle or 0)
                    carry += sock.read(GATHER - len(carry))
                    continue
                buffer = _POOL.take(stop)
                try:
                    size, carry = _fill(sock, buffer, carry, body.length - passed)
                except BaseException:
                    _POOL.give(buffer)
                    raise
                if not size:
                    _POOL.give(buffer)
                    continue
                passed += size
                writing.put(buffer, size)
            writing.close()
            hashing.close()
        finally:
            writing.close(quiet=True)
            hashing.close(quiet=True)


def _fill(sock: _Socket, buffer: mmap.mmap, carry: bytes, left: int) -> tuple[int, bytes]:
    """Fill ``buffer`` with ``carry``, then from the socket until it is full
    or HOLD_SECONDS pass. Returns how many bytes to pass on (the whole
    buffer, the rest of the body, or else whole DIRECT_ALIGN blocks, which
    keep the file's writes aligned) and what to carry over."""
    deadline = time.monotonic() + HOLD_SECONDS
    with memoryview(buffer) as whole:
        view = whole[: min(len(whole), left)]
        filled = min(len(carry), len(view))
        view[:filled] = carry[:filled]
        carry = carry[filled:]
        while filled < len(view):
            count = sock.read_into(view[filled:])
            filled += count
            if not count and not sock.wait(deadline - time.monotonic()):
                break
        if filled < len(view):  # the client paused; carry is empty here
            keep = filled % DIRECT_ALIGN
            carry = bytes(view[filled - keep:filled])
            filled -= keep
        del view
    return filled, carry


def _linger(sock: _Socket) -> None:
    """After a write failed (a full disk), read and drop the rest of the body
    for up to LINGER_SECONDS, as aiohttp does for a body a handler left
    unread: a client still sending would otherwise be reset by the close
    and might never read the error answered to it."""
    deadline = time.monotonic() + LINGER_SECONDS
    length = sock.body.length
    with mmap.mmap(-1, BUFFER_SIZE) as scratch, memoryview(scratch) as view:
        while sock.body.received < length and time.monotonic() < deadline:
            try:
                received = sock.body.received
                if not sock.read_into(view[: min(len(view), length - received)]):
                    sock.wait(deadline - time.monotonic())
            except (BlobdError, _Stopped):
                return


class _Socket:
    """The body's socket, as the receiver reads it."""

    def __init__(self, body: SocketBody, stop: threading.Event) -> None:
        self.body = body
        self.stop = stop
        self._poller = select.poll()
        self._poller.register(body.fd, select.POLLIN)

    def wait(self, seconds: float | None) -> bool:
        """Wait until there is something to read (True) or ``seconds`` pass
        (None: no limit); raises _Stopped once the request is cancelled."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            if self.stop.is_set():
                raise _Stopped()
            step = POLL_SECONDS
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    return False
            if self._poller.poll(step * 1000):
                return True

    def read(self, most: int) -> bytes:
        """What has arrived, up to ``most`` bytes (b"" when nothing has)."""
        with memoryview(bytearray(most)) as view:
            return bytes(view[: self.read_into(view)])

    def read_into(self, view: memoryview) -> int:
        """Read what has arrived into ``view`` (not empty); 0 when nothing
        has. The client hanging up early is ``bad_request``."""
        try:
            count = os.readv(self.body.fd, [view])
        except BlockingIOError:
            return 0
        except ConnectionError:
            count = 0
        if count == 0:
            raise BlobdError("bad_request", f"body ended after {self.body.received} of"
                             f" {self.body.length} bytes")
        self.body.received += count
        return count


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

    def take(self, stop: threading.Event) -> mmap.mmap:
        with self._cond:
            while not self._free and self._made >= self._count:
                if stop.is_set():
                    raise _Stopped()
                self._cond.wait(POLL_SECONDS)
            if self._free:
                return self._free.pop()
            self._made += 1
        return mmap.mmap(-1, self._size)

    def give(self, buffer: mmap.mmap, _size: int = 0) -> None:
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()


_POOL = _BufferPool(BUFFER_SIZE, POOL_BUFFERS)

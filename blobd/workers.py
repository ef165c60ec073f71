"""Several server processes on one port: ``[server] workers = N``.

One Python process serves from one core. With ``workers = N`` the process
started by ``blobd serve`` becomes a supervisor of N worker processes:

1. It checks that the port is free and holds it (see :func:`_hold_port`),
   before anything is made in the data dir: a server that cannot listen
   leaves no store behind. It takes the data-dir lock (and keeps it: no
   second ``blobd serve`` can start on the same data), creates or migrates
   the index and recovers what a crash left in ``tmp/`` -- all before any
   worker exists, so no worker ever does either.
2. It forks the workers. Each gets a listening socket of its own on the one
   port (``SO_REUSEPORT``), so the kernel spreads new connections evenly;
   one shared socket would let whichever worker wakes first accept a whole
   burst of keep-alive connections (measured: small GETs at 2 workers now
   and then ran at the speed of one). Because ``SO_REUSEPORT`` would also
   let a second server on the port join the group, the supervisor first
   checks that nobody else is bound there (see :func:`_hold_port`).
   Forking, rather than starting a new interpreter, costs a worker
   milliseconds, not a second of imports.
3. Exactly one worker, number 0, runs the background work (sweepers); its
   replacement after a crash is number 0 again.
4. A worker that dies is replaced. First, what it left in ``tmp/`` (every
   temp name carries its process id) is undone under the index write lock,
   exactly as start-up recovery would (see :meth:`blobd.store.Store.recover_dead`),
   and so is the file of a session it had committed but not yet removed.
   One that keeps dying right after start is restarted with a growing delay.
5. SIGTERM or SIGINT: each worker gets one SIGTERM and shuts down gracefully
   (requests in flight finish); the supervisor waits for them, then exits.
   A second signal kills the workers at once, as safe as ``kill -9``. Workers
   run in a process group of their own, so a terminal's Ctrl-C reaches the
   supervisor alone and no worker is signalled twice. (Under systemd, use
   ``KillMode=mixed`` so that systemd, too, signals only the supervisor.)
6. Toward systemd the supervisor is the service: it sends ``READY=1`` once
   every worker serves, ``WATCHDOG=1`` from its loop while a watchdog is
   armed, and ``STOPPING=1`` on shutdown. Each worker runs
   :func:`blobd.daemon.run_server` (graceful drain, access log, TLS) with a
   notifier that tells the supervisor, not systemd. Under socket
   activation (``blobd.socket``) the supervisor binds nothing: every worker,
   replacements too, serves on the sockets systemd passed, which the
   supervisor keeps open, so connections queue there while a worker is
   replaced or the service restarts.

Correctness across processes rests on SQLite: every write transaction starts
with ``BEGIN IMMEDIATE`` and waits for the others on ``busy_timeout``, and
every file move that decides what exists (link into place, move to trash)
happens inside one, so the PUT-versus-DELETE ordering and the quota checks
hold between workers as they do between the requests of one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import files, metrics
from .config import Config
from .daemon import STOP_SIGNALS, cannot_listen
from .errors import BlobdError
from .layout import Layout
from .sdnotify import Notifier, listen_fds
from .store import Store, take_lock

log = logging.getLogger(__name__)

# serve_one(config, sockets, background, ready): run one server process on the
# listening socket until SIGTERM/SIGINT; call ready() once it is serving.
ServeOne = Callable[[Config, list[socket.socket], bool, Callable[[], None]], None]

BACKLOG = 1024
# A worker that lived shorter than this counts as failing to start.
HEALTHY_SECONDS = 5.0
MAX_RESTART_DELAY = 10.0
# How long to wait for all workers of a new server to come up.
STARTUP_TIMEOUT = 60.0


def serve(config: Config, serve_one: ServeOne) -> int:
    """Run ``config.server.workers`` worker processes until a stop signal;
    the exit status (1 when the workers could not start)."""
    # First thing, so the LISTEN_* variables never reach the workers.
    activated = listen_fds()
    layout = Layout(config.data_dir.resolve())
    if layout.restore_marker_path.exists():
        raise BlobdError("conflict", "an interrupted 'blobd mirror restore' left this data"
                         " dir half-restored; run it again to finish before serving")
    # The port before the data dir: a server that cannot listen must leave
    # nothing behind (an empty store nobody asked for). The activated
    # sockets hold themselves.
    hold = None if activated else _hold_port(config)
    lock_fd: int | None = None
    shared = layout.metrics_dir
    try:
        files.make_dirs(layout)
        lock_fd = take_lock(layout.lock_path)
        # Under the data dir's lock: what a supervisor killed with -9 left
        # here belongs to nobody now.
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir(mode=0o700)
        metrics.share_between_processes(str(shared))
        asyncio.run(_prepare(config))
        return Supervisor(config, serve_one, activated, port_hold=hold).run()
    finally:
        if lock_fd is not None:
            shutil.rmtree(shared, ignore_errors=True)
            os.close(lock_fd)
        if hold is not None:
            hold.close()


async def _prepare(config: Config) -> None:
    """Create or migrate the index and recover from a crash, before any
    worker exists (the caller holds the data-dir lock)."""
    store = Store(config)
    await store.open(exclusive=False, recover=True)
    await store.close()


async def _recover_dead(config: Config, pid: int) -> tuple[int, int]:
    store = Store(config)
    await store.open(exclusive=False, recover=False)
    try:
        return await store.recover_dead(pid)
    finally:
        await store.close()


@dataclass
class _Worker:
    number: int
    process: Any  # multiprocessing.Process (fork context)
    ready: multiprocessing.connection.Connection
    started_at: float
    serving: bool = False


@dataclass
class Supervisor:
    config: Config
    serve_one: ServeOne
    # Passed by systemd (socket activation): every worker serves on these.
    activated: list[socket.socket] = field(default_factory=list)
    # Bound to the port (not listening; see _hold_port) unless activated.
    port_hold: socket.socket | None = None
    workers: dict[int, _Worker] = field(default_factory=dict)
    signals: int = 0
    _delays: dict[int, float] = field(default_factory=dict)
    _due: dict[int, float] = field(default_factory=dict)  # number -> restart time

    def __post_init__(self) -> None:
        self._notifier = Notifier()
        self._watchdog = self._notifier.watchdog_interval()
        self._pinged = 0.0
        self._ctx = multiprocessing.get_context("fork")
        self._wake_r, self._wake_w = os.pipe()

    def run(self) -> int:
        previous = self._catch_signals()
        try:
            for number in range(self.config.server.workers):
                self._start(number)
            if not self._wait_started():
                return 0 if self.signals else 1
            self._announce()
            while not self.signals:
                self._supervise_once()
            return 0
        finally:
            self._notifier.stopping()
            self._stop_all()
            for sock in [*filter(None, [self.port_hold]), *self.activated]:
                sock.close()
            self._restore_signals(previous)

    def _restore_signals(self, previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _catch_signals(self) -> dict[int, Any]:
        def on_signal(signum: int, frame: object) -> None:
            self.signals += 1
            if self.signals > 1:
                self._kill_all()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w)
        return {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}

    def _announce(self) -> None:
        server = self.config.server
        scheme = "https" if server.tls_cert else "http"
        where = (", ".join(_url(sock, scheme) for sock in self.activated) if self.activated
                 else server.url)
        message = (f"blobd serving {self.config.data_dir.resolve()} on {where}"
                   f" with {server.workers} workers")
        self._notifier.ready(message)
        log.info("%s (pids %s)", message,
                 ", ".join(str(w.process.pid) for w in self.workers.values()))

    # -- starting -------------------------------------------------------------

    def _start(self, number: int) -> None:
        _await_lone_thread()
        own = [] if self.activated else [_bind(self.config, listen=True)]
        ready_r, ready_w = self._ctx.Pipe(duplex=False)
        # What of the supervisor's own the worker must not keep open.
        theirs = [functools.partial(os.close, self._wake_r),
                  functools.partial(os.close, self._wake_w),
                  *(sock.close for sock in filter(None, [self.port_hold])),
                  ready_r.close, *(w.ready.close for w in self.workers.values())]
        process = self._ctx.Process(
            target=_worker_main, name=f"blobd-worker-{number}",
            args=(self.serve_one, self.config, own or self.activated, number, ready_w,
                  theirs, os.getpid()))
        # Out of the collector's sight, what the workers inherit stays shared:
        # a collection writes to every object it scans, copying its page.
        gc.collect()
        gc.freeze()
        process.start()
        # The worker has its copies; ours would keep a dead worker's socket
        # (and the connections queued on it) alive. The activated sockets are
        # shared by every worker and stay open here.
        for sock in own:
            sock.close()
        ready_w.close()
        self.workers[number] = _Worker(number, process, ready_r, time.monotonic())

    def _wait_started(self) -> bool:
        """Until every worker serves; False (and why, logged) if one died."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not all(w.serving for w in self.workers.values()):
            if self.signals:
                return False
            self._wait(deadline - time.monotonic())
            for worker in self.workers.values():
                if worker.process.exitcode is not None:
                    log.error("worker %d exited with %s while starting", worker.number,
                              worker.process.exitcode)
                    return False
            if time.monotonic() > deadline:
                log.error("the workers did not start within %gs", STARTUP_TIMEOUT)
                return False
        return True

    def _wait(self, timeout: float) -> None:
        handles: list[Any] = [self._wake_r]
        for worker in self.workers.values():
            handles.append(worker.process.sentinel)
            if not worker.serving:
                handles.append(worker.ready)
        for handle in multiprocessing.connection.wait(handles, max(0.0, timeout)):
            if handle == self._wake_r:
                _drain(self._wake_r)
        for worker in self.workers.values():
            if not worker.serving and worker.ready.poll():
                # EOFError/OSError: it died before it served; its sentinel says so.
                with contextlib.suppress(EOFError, OSError):
                    worker.serving = worker.ready.recv_bytes() == b"1"

    # -- supervising ----------------------------------------------------------

    def _supervise_once(self) -> None:
        self._ping_watchdog()
        now = time.monotonic()
        timeout = min([due - now for due in self._due.values()], default=1.0)
        if self._watchdog:
            # Woken in time for the next ping, however short WatchdogSec= is.
            timeout = min(timeout, self._pinged + self._watchdog / 2 - now)
        self._wait(max(0.0, min(timeout, 1.0)))
        if self.signals:
            return
        for worker in list(self.workers.values()):
            if worker.process.exitcode is not None:
                self._replace_later(worker)
        for number, due in list(self._due.items()):
            if due <= time.monotonic():
                del self._due[number]
                self._start(number)

    def _ping_watchdog(self) -> None:
        # The loop wakes by the next ping (see above); ping at half the timeout.
        if self._watchdog and time.monotonic() - self._pinged >= self._watchdog / 2:
            self._notifier.watchdog()
            self._pinged = time.monotonic()

    def _replace_later(self, worker: _Worker) -> None:
        del self.workers[worker.number]
        worker.ready.close()
        pid, code = worker.process.pid, worker.process.exitcode
        lived = time.monotonic() - worker.started_at
        log.error("worker %d (pid %d) exited with %s after %.1fs; replacing it",
                  worker.number, pid, code, lived)
        try:
            temps, sessions = asyncio.run(_recover_dead(self.config, pid))
        except Exception:
            # Not worth stopping the server for: start-up recovery will
            # undo it at the next restart.
            log.exception("could not undo what worker %d left in tmp/", worker.number)
        else:
            if temps:
                log.info("undid %d temp files worker %d left behind", temps, worker.number)
            if sessions:
                # Named apart: these are no temp files, and an admin who
                # finds uploads/ emptier than before should know why.
                log.info("removed %d committed upload sessions' files from uploads/ (their"
                         " blobs are stored; a completion was cut off before it removed"
                         " them)", sessions)
        delay = 0.0
        if lived < HEALTHY_SECONDS:
            delay = min(MAX_RESTART_DELAY, max(0.5, 2 * self._delays.get(worker.number, 0)))
        self._delays[worker.number] = delay
        self._due[worker.number] = time.monotonic() + delay

    # -- stopping -------------------------------------------------------------

    def _stop_all(self) -> None:
        for worker in self.workers.values():
            _signal(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_timeout_seconds + 10
        for worker in self.workers.values():
            worker.process.join(max(0.0, deadline - time.monotonic()))
        self._kill_all()
        for worker in self.workers.values():
            worker.process.join()
            worker.ready.close()
        log.info("all workers stopped")

    def _kill_all(self) -> None:
        for worker in self.workers.values():
            if worker.process.exitcode is None:
                _signal(worker.process.pid, signal.SIGKILL)


def _worker_main(serve_one: ServeOne, config: Config, sockets: list[socket.socket],
                 number: int, ready: multiprocessing.connection.Connection,
                 closers: list[Callable[[], None]], supervisor: int) -> None:
    """The first thing a forked worker runs."""
    background = number == 0
    log.info("worker %d (pid %d) started%s", number, os.getpid(),
             ", running the background work" if background else "")
    os.setpgid(0, 0)
    signal.set_wakeup_fd(-1)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    _stop_with(supervisor)
    for close in closers:
        close()

    def serving() -> None:
        ready.send_bytes(b"1")
        ready.close()
    serve_one(config, sockets, background, serving)


PR_SET_PDEATHSIG = 1


def _stop_with(supervisor: int) -> None:
    """A worker must not outlive its supervisor (killed with -9, say):
    nobody would replace it when it died, and it would hold the data dir's
    lock against the next ``blobd serve``. The kernel sends it SIGTERM, a
    graceful stop, when the supervisor goes; one gone already (before this
    took effect) means stopping now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("cannot tie the worker to its supervisor: %s", exc)
    if os.getppid() != supervisor:
        log.warning("the supervisor (pid %d) is gone; worker stopping", supervisor)
        os._exit(0)


def _url(sock: socket.socket, scheme: str = "http") -> str:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _hold_port(config: Config) -> socket.socket:
    """A socket bound to the port, not listening, so the port stays ours
    while a worker is being replaced; the kernel routes nothing to it.

    ``SO_REUSEPORT`` lets any socket of the same user that sets it too bind
    beside ours: a second ``blobd serve`` on another data dir would join
    and take half the connections. So first a probe binds without it, which
    fails beside any listener (another blobd's workers, any other server),
    as a lone ``blobd serve`` fails. What the probe cannot see: a second
    server that passes its own probe in the milliseconds between ours and
    our first worker's listen, or while every worker of a running one is
    down at once being replaced (its hold socket does not listen).
    """
    _bind(config, listen=False, share=False).close()
    return _bind(config, listen=False, share=True)


def _bind(config: Config, *, listen: bool, share: bool = True) -> socket.socket:
    host, port = config.server.host, config.server.port
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEADDR: connections of an earlier server lingering in
        # TIME_WAIT must not keep a restart from binding.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if listen:
            sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise cannot_listen(config.server.url, exc) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _await_lone_thread(timeout: float = 5.0) -> None:
    """fork() copies only the calling thread: threads left from the last
    asyncio.run (aiosqlite's, finishing) must be gone first."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.main_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if others:
        raise RuntimeError(f"cannot fork workers while threads run: {others}")


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            continue
    except BlockingIOError:
        return

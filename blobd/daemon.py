"""One blobd server process, from its first socket to its last log line.

:func:`run_server` is the whole life of a serving process:

1. SIGTERM and SIGINT both mean "stop gracefully" from here on;
2. unless it was given sockets, it checks that ``[server] host``/``port``
   is free (:func:`check_port`), so that a port in use stops it before
   the store is made;
3. the app starts: the store opens (index, crash recovery), background
   tasks start (``cleanup_ctx`` in :mod:`blobd.http.app`);
4. it listens on the sockets it was given (systemd socket activation, or a
   socket a parent bound for it) or else on ``[server] host``/``port``, with
   TLS when ``tls_cert``/``tls_key`` are set;
5. only then ``READY=1``: systemd orders dependants after that moment, so
   the port must accept and the index be open;
6. ``WATCHDOG=1`` pings from the event loop while systemd arms a watchdog;
7. on the signal, ``STOPPING=1``; the listening sockets close; requests
   in flight get ``shutdown_timeout_seconds`` to finish (uploads keep
   receiving their bodies) and are then cut off (an upload cut off removes
   its temp file; a commit already in its index transaction completes
   first, see :func:`blobd.store.shielded`); connections close; background
   tasks stop; the index closes.

A second SIGTERM or SIGINT during the drain stops the process at once,
which is as safe as ``kill -9`` (see the README's crash notes).

:func:`serve` is the single-process entry point of ``blobd serve``. A
process that serves on a socket bound by someone else (a worker sharing a
port) calls :func:`run_server` with that socket and a notifier of its own.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import ssl
from typing import Sequence

from aiohttp import web

from . import __version__
from .config import Config, ServerConfig
from .errors import BlobdError, ConfigError
from .http.accesslog import AccessLogger
from .http.app import create_app
from .http.inflight import IN_FLIGHT, InFlight
from .sdnotify import Notifier, listen_fds

log = logging.getLogger(__name__)
# How long requests cut off at the shutdown timeout get to unwind: an upload
# removes its temp file, a commit in its index transaction completes.
CUT_OFF_SECONDS = 5.0
# How much of a request body aiohttp buffers before it stops reading the
# socket (twice this). Its default, 64 KiB, paused and resumed the socket
# every few reads while an upload's previous piece was being written: a
# 1 GiB PUT ran at 224 MB/s, at 256 KiB at 297 MB/s (bench/README.md).
# Per connection sending a body, so 8 parallel uploads hold 4 MiB more.
READ_BUFSIZE = 256 << 10
# SIGHUP too: a server run from a terminal that closes drains like any
# other stop, instead of dying mid-request (blobd has nothing to reload).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def serve(config: Config) -> int:
    """Run ``blobd serve`` in this process until SIGTERM or SIGINT."""
    # First thing, so the LISTEN_* variables never leak into child processes.
    sockets = listen_fds()
    asyncio.run(run_server(config, sockets=sockets))
    return 0


async def run_server(config: Config, *, sockets: Sequence[socket.socket] = (),
                     notifier: Notifier | None = None, background: bool = True,
                     primary: bool = True) -> None:
    """Serve until a stop signal, then shut down gracefully.

    ``sockets`` are listening sockets to serve on instead of binding
    ``[server] host``/``port``. ``notifier`` receives READY/STOPPING/
    WATCHDOG (the default speaks to systemd, a no-op outside it).
    ``background`` and ``primary``: see :func:`blobd.http.app.create_app`
    (a worker of ``[server] workers = N`` is not primary).
    """
    notifier = notifier if notifier is not None else Notifier()
    tls = await asyncio.to_thread(tls_context, config.server)
    if not sockets:
        await asyncio.to_thread(check_port, config.server)
    stop = _stop_on_signals()
    app = create_app(config, background=background, primary=primary)
    runner = web.AppRunner(
        app, access_log_class=AccessLogger,
        access_log=logging.getLogger("blobd.access") if config.logging.access_log else None,
        shutdown_timeout=CUT_OFF_SECONDS, read_bufsize=READ_BUFSIZE,
        keepalive_timeout=config.server.keepalive_timeout_seconds)
    watchdog: asyncio.Task[None] | None = None
    try:
        await runner.setup()
        sites = await _listen(runner, config, sockets, tls)
        names = ", ".join(_name(site, config.server) for site in sites)
        # A worker's supervisor says it once for all of them (blobd.workers).
        log.log(logging.INFO if primary else logging.DEBUG, "blobd %s serving %s on %s",
                __version__, config.data_dir.resolve(), names)
        notifier.ready(f"serving on {names}")
        # What start-up made lives as long as the server: the full
        # collections that would scan it again and again would only add
        # pauses to requests (its garbage goes first, or it would stay).
        gc.collect()
        gc.freeze()
        watchdog = _start_watchdog(notifier)
        await stop.wait()
        _announce_stop(notifier, app[IN_FLIGHT].count, config.server)
        await _drain(sites, app[IN_FLIGHT], config.server.shutdown_timeout_seconds)
    finally:
        await runner.cleanup()
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        _restore_signals()
    log.info("stopped")


async def _listen(runner: web.AppRunner, config: Config, sockets: Sequence[socket.socket],
                  tls: ssl.SSLContext | None) -> list[web.BaseSite]:
    sites: list[web.BaseSite]
    if sockets:
        sites = [web.SockSite(runner, sock, ssl_context=tls) for sock in sockets]
    else:
        sites = [web.TCPSite(runner, config.server.host, config.server.port,
                             ssl_context=tls)]
    for site in sites:
        try:
            await site.start()
        except OSError as exc:
            raise cannot_listen(_name(site, config.server), exc) from None
    return sites


def check_port(server: ServerConfig) -> None:
    """Refuse, with the error the listen would give, a ``host``/``port``
    someone else listens on: checked before the store opens, which makes
    the data dir and its index, so a server that cannot listen leaves
    nothing behind. Binds (without listening) each address the listen
    will, as it will (see asyncio's create_server), and lets go at once: a
    socket only bound, as a test's port reservation is, stays no obstacle.
    No SO_REUSEPORT, so a listener that shares the port is refused too."""
    try:
        infos = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise cannot_listen(server.url, exc) from None
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise cannot_listen(server.url, exc) from None


def _name(site: web.BaseSite, server: ServerConfig) -> str:
    # Not TCPSite.name: it builds a yarl URL, which raises on a host it
    # cannot hold, and the error about that host became a traceback.
    return server.url if isinstance(site, web.TCPSite) else site.name


def cannot_listen(where: str, exc: OSError) -> BlobdError:
    """The one-line error of a port that is taken (or otherwise refused),
    worded alike by one process and by a supervisor of workers."""
    # asyncio's strerror repeats the address in a long sentence of its own.
    # A host the resolver does not know (gaierror) has its own messages.
    if isinstance(exc, socket.gaierror) or not exc.errno:
        reason = exc.strerror or str(exc)
    else:
        reason = os.strerror(exc.errno)
    return BlobdError("unavailable", f"cannot listen on {where}: {reason.lower()}")


async def _drain(sites: Sequence[web.BaseSite], in_flight: InFlight, timeout: float) -> None:
    """Stop accepting, give running requests ``timeout`` seconds, then cut
    off the rest (see :mod:`blobd.http.inflight` for why not aiohttp's)."""
    for site in sites:
        await site.stop()
    in_flight.draining = True
    if await in_flight.wait_idle(timeout):
        return
    log.warning("cutting off %d request(s) still running after %gs",
                in_flight.cancel_all(), timeout)
    if not await in_flight.wait_idle(CUT_OFF_SECONDS):
        log.warning("%d request(s) did not stop when cut off", in_flight.count)


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context, or None without ``tls_cert``; blocking
    (reads the files), so callers run it in a thread."""
    if not server.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key, password=_no_passphrase)
    except ConfigError:
        raise
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"server.tls_cert: cannot load {server.tls_cert} with key "
                          f"{server.tls_key}: {exc}") from None
    return context


def _no_passphrase() -> str:
    # Called only for an encrypted key; without it OpenSSL would prompt on
    # the terminal (or fail obscurely under systemd).
    raise ConfigError("server.tls_key: the key is encrypted; blobd needs it"
                      " unencrypted (e.g. openssl pkey -in KEY -out KEY.plain)")


def _stop_on_signals() -> asyncio.Event:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def first_signal(signum: int) -> None:
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()
        # Back to the default actions: a second signal ends the process now.
        _restore_signals()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, first_signal, signum)
    return stop


def _restore_signals() -> None:
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.remove_signal_handler(signum)


def _start_watchdog(notifier: Notifier) -> asyncio.Task[None] | None:
    interval = notifier.watchdog_interval()
    if interval is None:
        return None
    log.debug("systemd watchdog armed: %.1fs", interval)
    return asyncio.create_task(notifier.run_watchdog(interval), name="blobd-watchdog")


def _announce_stop(notifier: Notifier, in_flight: int, server: ServerConfig) -> None:
    if in_flight:
        message = (f"draining {in_flight} request(s) in flight, for up to "
                   f"{server.shutdown_timeout_seconds:g}s")
    else:
        message = "stopping"
    notifier.stopping(message)
    log.info("%s", message)

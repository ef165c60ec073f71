"""``blobd serve``: run the daemon."""

from __future__ import annotations

import argparse
import dataclasses
import asyncio
import logging
import socket
from typing import Callable

from .. import daemon, workers
from ..config import Config, override_server
from ..logs import setup_logging
from ..sdnotify import Notifier
from .common import add_config_option, config_from_args

log = logging.getLogger("blobd.config")


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the server",
                           description="Run the blob server. With no config file it "
                           "uses the embedded defaults: data in ./blobd-data, "
                           "listening on 127.0.0.1:8420.")
    add_config_option(serve)
    serve.add_argument("--host", help="override [server] host")
    serve.add_argument("--port", type=int, help="override [server] port")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="override [logging] level")
    serve.set_defaults(run=run_serve)


def effective_config(args: argparse.Namespace) -> Config:
    config = config_from_args(args)
    config = override_server(config, {k: v for k, v in (("host", args.host),
                                                        ("port", args.port))
                                      if v is not None})
    if args.log_level:
        config = config.replace(logging=dataclasses.replace(config.logging,
                                                            level=args.log_level))
    return config


def run_serve(args: argparse.Namespace) -> int:
    config = effective_config(args)
    setup_logging(config.logging.level)
    # Values older versions took, taken alike: said once, by the process
    # that starts (not by each worker).
    for note in config.notes:
        log.warning("%s", note)
    if config.server.workers > 1:
        # Checked once, here: each worker failing on it would only say so in
        # a traceback of its own.
        daemon.tls_context(config.server)
        return workers.serve(config, serve_worker)
    return daemon.serve(config)


def serve_worker(config: Config, sockets: list[socket.socket], background: bool,
                 ready: Callable[[], None]) -> None:
    """One of ``[server] workers`` processes, on the sockets its supervisor
    bound or systemd passed (see :mod:`blobd.workers`). It tells its
    supervisor, not systemd, when it serves; the supervisor speaks to
    systemd for all of them."""
    asyncio.run(daemon.run_server(config, sockets=sockets, notifier=WorkerNotifier(ready),
                                  background=background, primary=False))


class WorkerNotifier(Notifier):
    """A worker's notifier: READY goes to the supervisor; the rest (STOPPING,
    WATCHDOG) are the supervisor's to send, so they are dropped here."""

    def __init__(self, ready: Callable[[], None]) -> None:
        self._ready = ready

    def ready(self, status: str | None = None) -> bool:
        self._ready()
        return True

    def stopping(self, status: str | None = None) -> bool:
        return False

    def status(self, text: str) -> bool:
        return False

    def watchdog(self) -> bool:
        return False

    def watchdog_interval(self) -> float | None:
        return None

"""``blobd serve``: run the daemon."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
from typing import Callable

from aiohttp import web

from .. import workers
from ..config import Config
from ..http.app import create_app
from .common import add_config_option, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the server",
                           description="Run the blob server. With no config file it "
                           "uses the embedded defaults: data in ./blobd-data, "
                           "listening on 127.0.0.1:8420.")
    add_config_option(serve)
    serve.add_argument("--host", help="override [server] host")
    serve.add_argument("--port", type=int, help="override [server] port")
    serve.add_argument("--data-dir", help="override [server] data_dir")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="override [logging] level")
    serve.set_defaults(run=run_serve)


def effective_config(args: argparse.Namespace) -> Config:
    config = config_from_args(args)
    server = config.server
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port),
                                   ("data_dir", args.data_dir)) if v is not None}
    if overrides:
        config = config.replace(server=dataclasses.replace(server, **overrides))
    if args.log_level:
        config = config.replace(logging=dataclasses.replace(config.logging,
                                                            level=args.log_level))
    return config


def run_serve(args: argparse.Namespace) -> int:
    config = effective_config(args)
    logging.basicConfig(level=config.logging.level.upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    if config.server.workers > 1:
        return workers.serve(config, serve_worker)
    app = create_app(config)
    print(f"blobd serving {config.data_dir.resolve()} on "
          f"http://{config.server.host}:{config.server.port}", flush=True)
    web.run_app(app, host=config.server.host, port=config.server.port, print=None,
                access_log=logging.getLogger("blobd.access") if config.logging.access_log
                else None, shutdown_timeout=config.server.shutdown_timeout_seconds)
    return 0


def serve_worker(config: Config, sock: socket.socket, background: bool,
                 ready: Callable[[], None]) -> None:
    """One of ``[server] workers`` processes, on the socket its supervisor
    bound (see :mod:`blobd.workers`)."""
    app = create_app(config, background=background, primary=False)

    async def started(app: web.Application) -> None:
        ready()
    app.on_startup.append(started)
    web.run_app(app, sock=sock, print=None,
                access_log=logging.getLogger("blobd.access") if config.logging.access_log
                else None, shutdown_timeout=config.server.shutdown_timeout_seconds)

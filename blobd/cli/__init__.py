"""The ``blobd`` command: one module per command group, each with ``register``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Sequence

from ..errors import BlobdError, ConfigError
from ..logs import stream_is_journal
from . import admin, mirror, serve, tokens, transfer

COMMANDS = (serve, tokens, transfer, admin, mirror)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blobd", description="A content-addressed blob server for audio.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # `kill` and a closed terminal stop a command as Ctrl-C does, so a
    # transfer cut short removes its partial file (`blobd serve` sets its
    # own handlers for these signals).
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    try:
        result = args.run(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except (BlobdError, ConfigError, OSError) as exc:
        # <3>: an error for journald, when stderr is the journal (see logs.py).
        prefix = "<3>" if stream_is_journal(sys.stderr) else ""
        print(f"{prefix}blobd: error: {_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _message(exc: BaseException) -> str:
    if isinstance(exc, BlobdError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        # A file the command was pointed at: a missing directory, one that is
        # a directory, a data dir that is a file, no permission.
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc)

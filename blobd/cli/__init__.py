"""The ``blobd`` command: one module per command group, each with ``register``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import select
import signal
import sys
from typing import Iterable, Sequence

from ..errors import BlobdError, ConfigError
from ..logs import stream_is_journal

# The modules that register the commands, in the order `blobd --help` lists them.
MODULES = ("serve", "tokens", "transfer", "admin", "mirror")
# Which module registers each command. A command imports that module
# alone: `blobd token create` then loads no HTTP server, S3 client or fsck,
# two thirds of the start-up of a command that runs in a fraction of a
# second. tests/test_cli.py checks it against what the modules register.
COMMAND_MODULES = {
    "serve": "serve", "token": "tokens", "put": "transfer", "get": "transfer",
    "stats": "admin", "fsck": "admin", "gc": "admin", "reprobe": "admin",
    "quota": "admin", "mirror": "mirror",
}


def build_parser(modules: Iterable[str] = MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blobd", description="A content-addressed blob server for audio.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Anything but a known command first (-h, a typo) gets every command.
    module = COMMAND_MODULES.get(argv[0]) if argv else None
    parser = build_parser(MODULES if module is None else [module])
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
    except BrokenPipeError as exc:
        if exc.filename is not None or not _stdout_is_gone():
            return _fail(exc)
        # What read our output has gone (`blobd fsck | head -3`): stop as a
        # program killed by SIGPIPE does, without a word, and without the
        # interpreter complaining that it cannot flush standard output.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (BlobdError, ConfigError, OSError) as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return 130


def _fail(exc: BaseException) -> int:
    # <3>: an error for journald, when stderr is the journal (see logs.py).
    prefix = "<3>" if stream_is_journal(sys.stderr) else ""
    print(f"{prefix}blobd: error: {_message(exc)}", file=sys.stderr)
    return 1


def _stdout_is_gone() -> bool:
    """Whether standard output is a pipe nobody reads any more (the EPIPE
    could as well have come from a socket)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _message(exc: BaseException) -> str:
    if isinstance(exc, BlobdError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        # A file the command was pointed at: a missing directory, one that is
        # a directory, a data dir that is a file, no permission.
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc)

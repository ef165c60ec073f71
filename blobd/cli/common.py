"""Options and helpers shared by the commands."""

from __future__ import annotations

import argparse
from contextlib import asynccontextmanager
from typing import AsyncIterator

from ..address import Address, parse_address
from ..config import Config, load_config, override_server
from ..errors import BlobdError
from ..index import BlobRecord, get_blob, hash_for_sha256
from ..store import Store

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """-c and --data-dir, which every command working on a store takes: a
    server started with --data-dir is reached without a config file."""
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="TOML config file (default: the embedded defaults)")
    parser.add_argument("--data-dir", metavar="DIR", help="override [server] data_dir")


def config_from_args(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    if args.data_dir is not None:
        config = override_server(config, {"data_dir": args.data_dir})
    return config


@asynccontextmanager
async def open_index(config: Config, *, must_exist: bool = False,
                     write: bool = True) -> AsyncIterator[Store]:
    """The store's index for an offline command, safe beside a running
    server (WAL plus busy timeout); takes no data-dir lock and runs no
    recovery. ``must_exist``: refuse to create a new, empty store.
    ``write=False``: the command only reads (see :meth:`Store.open`)."""
    store = Store(config)
    if must_exist and not store.layout.index_path.exists():
        raise BlobdError("not_found", f"no blobd store in {store.layout.root}; 'blobd serve'"
                         " makes one there, -c or --data-dir names another")
    await store.open(exclusive=False, recover=False, write=write)
    try:
        yield store
    finally:
        await store.close()


def argument_address(text: str) -> Address:
    """A blob address given on the command line; its error names the
    argument, which among many would otherwise be hard to find."""
    try:
        return parse_address(text)
    except BlobdError as exc:
        raise BlobdError(exc.code, f"{text!r}: {exc.message}") from None


async def find_blobs(store: Store, names: list[str]) -> list[BlobRecord]:
    """The blobs named (BLAKE3 hex or sha256:...); one not_found naming
    every unknown one, before anything is done."""
    found, unknown = [], []
    for name in names:
        address = argument_address(name)
        digest = address.digest if address.is_blake3 else \
            await hash_for_sha256(store.db.reader, address.digest)
        blob = await get_blob(store.db.reader, digest) if digest else None
        if blob is None:
            unknown.append(name)
        else:
            found.append(blob)
    if unknown:
        raise BlobdError("not_found", "no such blob: " + ", ".join(unknown))
    return found


def positive_int(text: str) -> int:
    """An argparse type for counts of transfers at once: 0 or less would
    silently mean something else (one, or the config's default)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 up, got {text!r}")
    return value


def human_size(n: int) -> str:
    """1536 -> "1.5 KiB"; exact bytes below 1 KiB."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")

"""Options and helpers shared by the commands."""

from __future__ import annotations

import argparse
from contextlib import asynccontextmanager
from typing import AsyncIterator

from ..config import Config, load_config
from ..store import Store


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="TOML config file (default: the embedded defaults)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config)


@asynccontextmanager
async def open_index(config: Config) -> AsyncIterator[Store]:
    """The store's index for an offline command, safe beside a running
    server (WAL plus busy timeout); takes no data-dir lock and runs no
    recovery."""
    store = Store(config)
    await store.open(exclusive=False, recover=False)
    try:
        yield store
    finally:
        await store.close()

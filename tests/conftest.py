"""Shared fixtures: a real blobd app on a real SQLite file and a temp disk."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Awaitable, Callable

import blake3
import pytest
from aiohttp.test_utils import TestClient

from blobd import auth
from blobd.config import Config, config_from_dict
from blobd.http.app import create_app
from blobd.http.keys import STORE
from mirrorhelp import Bucket, unique_prefix
from s3server import SeaweedS3
from serverproc import blobd_env


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


class Api:
    """A test client bound to one token."""

    def __init__(self, client: TestClient, token: str | None, owner: str) -> None:
        self.client = client
        self.token = token
        self.owner = owner

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(extra or {})
        return headers

    def request(self, method: str, path: str, **kwargs: Any):
        kwargs["headers"] = self.headers(kwargs.get("headers"))
        return self.client.request(method, path, **kwargs)

    async def put(self, data: bytes, *, address: str | None = None, **kwargs: Any):
        return await self.request("PUT", f"/blobs/{address or b3(data)}", data=data, **kwargs)

    @property
    def store(self):
        return self.client.app[STORE]

    @property
    def data_dir(self) -> Path:
        return self.store.layout.root


# The scrub is on by default, and would race a test that damages blob files
# on purpose (quarantining one before the test looks): off unless a test
# asks for it (tests/test_scrub.py does; the embedded defaults keep it on).
SCRUB_OFF = {"bytes_per_second": 0}


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {"server": {"data_dir": str(tmp_path / "data")}}
    if "scrub" not in sections:
        raw["scrub"] = dict(SCRUB_OFF)
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


ServerFactory = Callable[..., Awaitable[Callable[..., Awaitable[Api]]]]


@pytest.fixture
async def server(aiohttp_client, tmp_path: Path):
    """``await server(**config_sections)`` -> ``await login(owner, scopes)``."""
    async def start(config: Config | None = None, **sections: dict[str, Any]):
        cfg = config or make_config(tmp_path, **sections)
        client = await aiohttp_client(create_app(cfg))

        async def login(owner: str = "alice", scopes: str = "read,write") -> Api:
            async with client.app[STORE].write() as tx:
                _, token = await auth.create_token(tx.conn, owner, auth.parse_scopes(scopes))
            return Api(client, token, owner)

        return login
    return start


@pytest.fixture
async def alice(server) -> Api:
    login = await server()
    return await login("alice")


def with_server(config: Config, **changes: Any) -> Config:
    return config.replace(server=dataclasses.replace(config.server, **changes))


def blob_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "blobs").rglob("*") if p.is_file())


def tmp_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "tmp").iterdir())


# What the warm-up below imports: all a `blobd` command and `blobd serve`
# load at start, the S3 client of the mirror commands too.
WARM_UP = "import blobd.cli, blobd.daemon, blobd.storage.s3, aiobotocore.session"


@pytest.fixture(scope="session", autouse=True)
def bytecode_cache():
    """One bytecode cache for every Python the suite starts, outside the
    checkout. Hundreds of tests start ``python -m blobd``; where
    PYTHONDONTWRITEBYTECODE is set (as on the dev machine) each of them
    compiled all of blobd from source again, about 0.2 s of CPU apiece.
    The variable's wish, nothing written beside the sources, still holds.

    The cache is filled once at the start under a public umask: a command
    run as another user (tests/test_data_dir_owner.py) reads it too, where
    files written later by a blobd (umask 027) would be root's alone."""
    saved = {name: os.environ.get(name)
             for name in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    # Not under pytest's base temp, which only root may enter.
    prefix = tempfile.mkdtemp(prefix="blobd-tests-pycache-")
    os.chmod(prefix, 0o755)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    umask = os.umask(0o022)
    try:
        subprocess.run([sys.executable, "-c", WARM_UP], env=blobd_env(), check=True,
                       timeout=120)
    finally:
        os.umask(umask)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(prefix, ignore_errors=True)


@pytest.fixture(scope="session")
def s3server(tmp_path_factory):
    """One real SeaweedFS S3 server for the session (see tests/s3server.py).

    A test that stops it must start it again before it ends (try/finally).
    """
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mirror_prefix() -> str:
    """A key prefix of the test's own in the shared bucket."""
    return unique_prefix()


@pytest.fixture
def bucket(s3server, mirror_prefix) -> Bucket:
    """What the S3 server holds under the test's prefix."""
    return Bucket(s3server, mirror_prefix)

"""A data dir belongs to the user that serves it (``blobd`` under systemd).

A command that writes there, run as another user (root, by hand), would
leave files of its own -- the lock, shard directories, blob files -- that
the server later fails on with 500s: it refuses, in one line saying whose
the data dir is and how to run the command. Commands that only read still
run, and leave nothing behind. uid 65534 stands in for the service user;
the tests run as root.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import blake3
import pytest

from serverproc import MAKE_STORE, BlobdServer, blobd_env, free_port, http, to_toml

SERVICE_UID = 65534
AS_SERVICE = ["setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}",
              "--clear-groups"]
# No connection is made before the store is opened, and none succeeds.
MIRROR = {"endpoint": "http://127.0.0.1:9", "bucket": "b", "access_key": "k",
          "secret_key": "s"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acts as another user: needs root")


def blobd(top: Path, *args: str, wrapper: list[str] = []) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*wrapper, sys.executable, "-m", "blobd", *args], cwd=top,
                          env=blobd_env(), capture_output=True, text=True, timeout=60)


def write_config(top: Path, name: str = "blobd.toml", **server: Any) -> str:
    path = top / name
    path.write_text(to_toml({
        "server": {"data_dir": str(top / "data"), "port": free_port(), **server},
        "storage": {"fsync": False}, "mirror": MIRROR}))
    # Readable by the service user whatever umask this process has (a store
    # opened in it earlier made its umask private).
    path.chmod(0o644)
    return str(path)


def owned_by_root(data: Path) -> list[Path]:
    return [path for path in [data, *data.rglob("*")] if path.lstat().st_uid == 0]


@pytest.fixture(scope="module")
def made_store() -> Iterator[Path]:
    """A store the service user made, once for the module: making one is two
    interpreter start-ups as that user (about 1 s), and every test here
    takes a copy of its own (see ``top``). The store has no lock file yet:
    no server has run on it."""
    with tempfile.TemporaryDirectory() as name:
        made = Path(name)
        made.chmod(0o755)
        (made / "data").mkdir()
        os.chown(made / "data", SERVICE_UID, SERVICE_UID)
        config = write_config(made)
        store = subprocess.run([*AS_SERVICE, sys.executable, "-c", MAKE_STORE, config],
                               cwd=made, env=blobd_env(), capture_output=True, text=True,
                               timeout=60)
        assert store.returncode == 0, store.stderr
        (made / "data" / "lock").unlink()   # as if no server had run on it yet
        token = blobd(made, "token", "create", "--owner", "alice", "-c", config,
                      wrapper=AS_SERVICE)
        assert token.returncode == 0, token.stderr
        yield made / "data"


@pytest.fixture
def top(made_store: Path) -> Iterator[Path]:
    """A directory with a copy of ``made_store`` of the test's own (pytest's
    tmp_path is root's alone, out of the service user's reach)."""
    with tempfile.TemporaryDirectory() as name:
        top = Path(name)
        top.chmod(0o755)
        # cp -a keeps every file's owner and mode: the copy is the service
        # user's as the original is, which is what the tests look at.
        subprocess.run(["cp", "-a", str(made_store), str(top / "data")], check=True)
        assert not owned_by_root(top / "data")
        write_config(top)
        yield top


def expected_refusal(top: Path) -> str:
    name = pwd.getpwuid(SERVICE_UID).pw_name
    return (f"blobd: error: {top / 'data'} belongs to {name} (uid {SERVICE_UID}) and this"
            f" command runs as root (uid 0), whose files there the owner could not use:"
            f" run it as the owner, e.g. sudo -u {name} blobd ...")


@pytest.mark.parametrize("args", [
    ("serve",), ("serve", "workers"), ("token", "create", "--owner", "bob"),
    ("token", "revoke", "0123abcd"), ("quota", "set", "alice", "--max-blobs", "5"),
    ("gc",), ("fsck", "--repair"), ("mirror", "restore"), ("mirror", "sync"),
    ("mirror", "backup"), ("mirror", "heal"),
], ids=" ".join)
def test_a_writing_command_run_as_another_user_refuses(top: Path, args: tuple[str, ...]
                                                       ) -> None:
    config = write_config(top)
    if args == ("serve", "workers"):
        args, config = ("serve",), write_config(top, "workers.toml", workers=2)
    result = blobd(top, *args, "-c", config)
    assert result.returncode == 1
    assert result.stderr.strip() == expected_refusal(top)
    assert owned_by_root(top / "data") == []


@pytest.mark.parametrize("args", [
    ("token", "list"), ("quota", "show", "alice"), ("stats",), ("fsck",),
], ids=" ".join)
def test_a_reading_command_runs_as_another_user_and_leaves_nothing(
        top: Path, args: tuple[str, ...]) -> None:
    # Nor the writers' lock file, if no writer has made it yet (found by
    # review: root's made it 0600, and the owner's server then failed).
    (top / "data" / "index.sqlite3-writer").unlink()
    result = blobd(top, *args, "-c", write_config(top))
    assert result.returncode == 0, result.stderr
    assert owned_by_root(top / "data") == []


def test_the_owner_serves_and_repairs(top: Path) -> None:
    with BlobdServer(top / "server", {"storage": {"fsync": False}}, data_dir=top / "data",
                     wrapper=AS_SERVICE) as server:
        made = blobd(top, "token", "create", "--owner", "alice", "-c",
                     str(server.config_path), wrapper=AS_SERVICE)
        assert made.returncode == 0, made.stderr
        token = made.stdout.splitlines()[-1]
        body = os.urandom(5000)
        digest = blake3.blake3(body).hexdigest()
        assert http("PUT", f"{server.url}/blobs/{digest}", token, body)[0] == 201
        assert http("GET", f"{server.url}/blobs/{digest}", token) == (200, body)
    repaired = blobd(top, "fsck", "--repair", "-c", write_config(top), wrapper=AS_SERVICE)
    assert repaired.returncode == 0, repaired.stderr
    assert owned_by_root(top / "data") == []

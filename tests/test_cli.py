"""The ``blobd`` command line, run as real processes."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from blobd.cli import COMMAND_MODULES, MODULES, build_parser
from blobd.store import Store
from conftest import make_config
from serverproc import (DEFAULT_PORT, BlobdServer, blobd_env, free_port, http, port_is_free,
                        run_blobd, to_toml)


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
                  ) -> list[tuple[str, ...]]:
    """Every command and sub-command the parser knows, e.g. ('token', 'create')."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, prefix + (name,))
    return paths


def test_every_command_on_a_store_takes_data_dir() -> None:
    """Found by review: a server started with --data-dir needed a config
    file written for it before a token could be made."""
    def options(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> set[str]:
        for name in path:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = sub.choices[name]
        return {o for a in parser._actions for o in a.option_strings}

    parser = build_parser()
    with_config = [p for p in command_paths(parser) if "--config" in options(parser, p)]
    assert ("token", "create") in with_config and ("mirror", "status") in with_config
    assert [p for p in with_config if "--data-dir" not in options(parser, p)] == []


def test_readme_command_line_names_every_option() -> None:
    """Found by review: the README's summary lacked restore's and heal's
    --progress. Each option of each command is there, and nothing else
    (--data-dir is said once below the block, for every -c command)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("\n## Command line\n", 1)[1].split("```")[1]
    shown: dict[tuple[str, ...], set[str]] = {}
    for line in block.strip().splitlines():
        if line.startswith("blobd "):
            words = line.split()[1:]
            path = tuple(itertools.takewhile(lambda w: w.isalpha() and w.islower(), words))
        shown.setdefault(path, set()).update(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", line))
    parser = build_parser()
    leaves = [p for p in command_paths(parser) if not _subcommands(parser, p)]
    assert sorted(shown) == sorted(leaves)
    for path in leaves:
        actions = [a for a in _command(parser, path)._actions
                   if a.option_strings and "--help" not in a.option_strings]
        known = {o for a in actions for o in a.option_strings}
        assert shown[path] <= known, (path, shown[path] - known)
        assert [a.option_strings for a in actions if not shown[path] & set(a.option_strings)
                and "--data-dir" not in a.option_strings] == [], path


def _command(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> argparse.ArgumentParser:
    for name in path:
        parser = _subcommands(parser, ())[name]
    return parser


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> dict:
    parser = _command(parser, path) if path else parser
    return next((a.choices for a in parser._actions
                 if isinstance(a, argparse._SubParsersAction)), {})


def test_offline_commands_work_on_a_data_dir_without_a_config(tmp_path: Path) -> None:
    with BlobdServer(tmp_path) as server:
        data = str(server.data_dir)
        made = run_blobd("token", "create", "--data-dir", data, "--owner", "alice")
        assert made.returncode == 0, made.stderr
        assert http("GET", f"{server.url}/quota", made.stdout.splitlines()[-1])[0] == 200
        for command in (("token", "list"), ("stats",), ("quota", "show", "alice"),
                        ("fsck",), ("gc",)):
            result = run_blobd(*command, "--data-dir", data, cwd=tmp_path)
            assert result.returncode == 0, (command, result.stderr)
        bad = run_blobd("stats", "--data-dir", str(tmp_path / "nowhere"), cwd=tmp_path)
        assert bad.returncode == 1 and "no blobd store in" in bad.stderr


# Runs ``blobd ARGS --help`` for each ARGS of argv[1] (JSON) in this one
# process, as ``python -m blobd`` would: a process per command cost 21
# interpreter start-ups (9 s). Prints [exit code, stdout, stderr] for each.
HELP_EACH = ("import contextlib, io, json, sys\n"
             "from blobd.cli import main\n"
             "results = []\n"
             "for path in json.loads(sys.argv[1]):\n"
             "    out, err = io.StringIO(), io.StringIO()\n"
             "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
             "        try:\n"
             "            code = main([*path, '--help'])\n"
             "        except SystemExit as exc:\n"
             "            code = exc.code\n"
             "    results.append([code, out.getvalue(), err.getvalue()])\n"
             "print(json.dumps(results))\n")


def test_each_command_is_mapped_to_the_module_that_registers_it() -> None:
    """main() imports only the module COMMAND_MODULES names for a command:
    a command missing there, or mapped to the wrong module, would only run
    through the whole parser, or not at all."""
    def commands(parser: argparse.ArgumentParser) -> set[str]:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return set(sub.choices)

    for module in MODULES:
        assert commands(build_parser([module])) == {
            command for command, owner in COMMAND_MODULES.items() if owner == module}, module
    assert commands(build_parser()) == set(COMMAND_MODULES)


def test_a_command_imports_only_its_own_module() -> None:
    """`blobd token ...` ran ~0.65 s, 0.4 s of it importing the HTTP
    server, the S3 client and fsck, which it never uses."""
    probe = ("import sys\nfrom blobd.cli import main\n"
             "try:\n    main(['token', 'list', '--data-dir', sys.argv[1]])\n"
             "except SystemExit:\n    pass\n"
             "print(sorted(m for m in ('aiohttp.web', 'aiobotocore', 'blobd.fsck',"
             " 'blobd.cli.mirror', 'blobd.cli.admin') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe, "/nonexistent/blobd-data"],
                          env=blobd_env(), capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_every_command_has_help() -> None:
    paths = command_paths(build_parser())
    assert ("serve",) in paths and ("token", "create") in paths
    # The entry point itself, as a user runs it.
    top = run_blobd("--help")
    assert top.returncode == 0 and top.stderr == "", top.stderr
    assert top.stdout.startswith("usage: blobd "), top.stdout
    each = subprocess.run([sys.executable, "-c", HELP_EACH, json.dumps(paths)],
                          env=blobd_env(), capture_output=True, text=True, timeout=60)
    assert each.returncode == 0 and each.stderr == "", each.stderr
    for path, (code, stdout, stderr) in zip(paths, json.loads(each.stdout), strict=True):
        shown = " ".join(("blobd",) + path)
        assert code == 0, f"{shown} --help: {stderr}"
        assert stdout.startswith(f"usage: {shown}"), stdout
        assert stderr == ""


def test_serve_without_config_uses_embedded_defaults(tmp_path: Path) -> None:
    if not port_is_free(DEFAULT_PORT):
        pytest.fail(f"port {DEFAULT_PORT} on 127.0.0.1 is in use by another process;"
                    " this test needs it to check blobd's default address - stop"
                    " whatever listens there and run it again")
    with BlobdServer(tmp_path, embedded_defaults=True) as server:
        assert server.url == f"http://127.0.0.1:{DEFAULT_PORT}"
        token = server.token("alice")
        body = b"embedded defaults"
        digest = blake3.blake3(body).hexdigest()
        status, _ = http("PUT", f"{server.url}/blobs/{digest}", token, body)
        assert status == 201
        # It is our process that answered, and it keeps data in ./blobd-data.
        stored = tmp_path / "blobd-data" / "blobs" / digest[:2] / digest[2:4] / digest
        assert stored.read_bytes() == body
        assert (tmp_path / "blobd-data" / "index.sqlite3").is_file()
    assert port_is_free(DEFAULT_PORT)


def test_token_create_list_revoke(tmp_path: Path) -> None:
    with BlobdServer(tmp_path) as server:
        token = server.token("alice", "read,write")
        keep = server.token("bob", "read")
        assert re.fullmatch(r"[A-Za-z0-9_-]{20,}", token)
        assert http("GET", f"{server.url}/blobs", token)[0] == 200

        listing = server.cli("token", "list")
        assert listing.returncode == 0, listing.stderr
        assert token not in listing.stdout and keep not in listing.stdout
        token_id = next(line.split()[0] for line in listing.stdout.splitlines()
                        if " alice " in line)
        assert token_id in token

        revoked = server.cli("token", "revoke", token_id)
        assert revoked.returncode == 0, revoked.stderr
        assert http("GET", f"{server.url}/blobs", token)[0] == 401
        assert http("GET", f"{server.url}/blobs", keep)[0] == 200
        after = server.cli("token", "list")
        assert token_id not in after.stdout and " bob " in after.stdout

        again = server.cli("token", "revoke", token_id)
        assert again.returncode != 0
        assert len(again.stderr.strip().splitlines()) == 1, again.stderr


def test_a_token_label_is_one_printable_line(tmp_path: Path) -> None:
    """Found by review: a label with a newline was stored, and broke
    `token list`'s table over two lines."""
    with BlobdServer(tmp_path) as server:
        bad = server.cli("token", "create", "--owner", "alice", "--label", "kitchen\nspeaker")
        assert bad.returncode == 1
        assert "label" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        good = server.cli("token", "create", "--owner", "alice", "--label", "kitchen speaker")
        assert good.returncode == 0, good.stderr
        rows = [line for line in server.cli("token", "list").stdout.splitlines()
                if " alice " in line]
        assert len(rows) == 1 and rows[0].endswith("kitchen speaker")


@pytest.mark.parametrize("section, line, key", [
    ("storage", "fsink = true", "storage.fsink"),
    ("storage", 'fsync = "yes"', "storage.fsync"),
    ("limits", 'max_blob_size = "2 parsecs"', "limits.max_blob_size"),
    ("server", "port = 99999", "server.port"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, section: str, line: str,
                                               key: str) -> None:
    server = [f"data_dir = {json.dumps(str(tmp_path / 'data'))}"]
    server.append(line if section == "server" else f"port = {free_port()}")
    text = "[server]\n" + "\n".join(server) + "\n"
    if section != "server":
        text += f"[{section}]\n{line}\n"
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = run_blobd("serve", "-c", str(config), cwd=tmp_path, timeout=20)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0]


@pytest.mark.parametrize("args, words", [
    (("--port", "99999"), "blobd: error: --port: expected 1-65535"),
    (("--port", "0"), "blobd: error: --port: expected 1-65535"),
    (("--host", "[::1]"), "blobd: error: --host: '[::1]': an IPv6 address goes without"),
    (("--host", ""), "blobd: error: --host: empty; to listen on every interface"),
    (("--host", "not a host"), "blobd: error: --host: 'not a host' is neither"),
    (("--host", "nohost.invalid"), "blobd: error: cannot listen on http://nohost.invalid:"),
])
def test_bad_command_line_overrides_are_one_line_naming_the_flag(
        tmp_path: Path, args: tuple, words: str) -> None:
    """Found by review: --port and --host went unchecked (tracebacks; --port
    0 served on a random port, an empty host on every interface)."""
    port = () if args[0] == "--port" else ("--port", str(free_port()))
    result = run_blobd("serve", "--data-dir", str(tmp_path / "data"), *port, *args,
                       cwd=tmp_path, timeout=20)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(words), result.stderr


def test_second_server_on_same_data_dir_refuses(tmp_path: Path) -> None:
    with BlobdServer(tmp_path / "first") as first:
        second = BlobdServer(tmp_path / "second", data_dir=first.data_dir,
                             startup_timeout=20)
        with pytest.raises(RuntimeError) as failed:
            second.start()
        second.stop()
        assert second.proc is not None and second.proc.returncode not in (0, None)
        assert "during start-up" in str(failed.value)
        lines = second.stderr_path.read_text().strip().splitlines()
        assert len(lines) == 1, lines
        assert str(first.data_dir) in lines[0] and "another blobd" in lines[0]
        assert first.running
        assert http("GET", f"{first.url}/healthz")[0] == 200


def test_busy_port_is_one_line(tmp_path: Path) -> None:
    with BlobdServer(tmp_path / "first") as first:
        port = first.url.rsplit(":", 1)[1]
        result = run_blobd("serve", "--data-dir", str(tmp_path / "other"), "--port", port,
                           cwd=tmp_path)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot listen on" in lines[0], result.stderr
        assert "address already in use" in lines[0]


def _tree(root: Path) -> list[tuple[str, bool, int, int]]:
    """Every entry under ``root``: (path, is a directory, size, mtime)."""
    entries = []
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        entries.append((str(path.relative_to(root)), path.is_dir(), st.st_size,
                        st.st_mtime_ns))
    return entries


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("reuseport", [False, True])
def test_busy_port_leaves_the_data_dir_as_it_was(tmp_path: Path, workers: int,
                                                  reuseport: bool) -> None:
    """Found by review: `blobd serve` on a port in use said so, but only
    after making an empty store (data dir, index) that nobody asked for.
    The port is held by another program (``reuseport``: one that shares it
    as blobd's own workers do); the data dir is new (its parent too), or is
    there already with something of its user's in it."""
    world = tmp_path / "world"
    (world / "kept").mkdir(parents=True)
    (world / "kept" / "notes.txt").write_text("mine")
    with socket.socket() as busy:
        if reuseport:
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for data_dir in (world / "new" / "data", world / "kept"):
            config = tmp_path / "blobd.toml"
            config.write_text(to_toml({"server": {
                "host": "127.0.0.1", "port": port, "workers": workers,
                "data_dir": str(data_dir)}}))
            before = _tree(world)
            result = run_blobd("serve", "-c", str(config), cwd=tmp_path, timeout=30)
            assert result.returncode == 1, result.stderr
            assert result.stderr.strip() == (f"blobd: error: cannot listen on"
                                             f" http://127.0.0.1:{port}: address already"
                                             " in use"), result.stderr
            assert _tree(world) == before


def test_half_restored_data_dir_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "restoring").write_text("index-x.sqlite3\n")
    result = run_blobd("serve", "--data-dir", str(data), "--port", str(free_port()),
                       cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "mirror restore" in lines[0], result.stderr


@pytest.mark.parametrize("action", [("list",), ("revoke", "0123abcd"),
                                    ("create", "--owner", "alice")])
def test_token_commands_never_create_a_store(tmp_path: Path, action: tuple) -> None:
    """Run from the wrong directory, they would otherwise make an empty
    store and report no tokens, as if the real ones were gone; or (found by
    review) make a token there that the server refuses."""
    config = tmp_path / "blobd.toml"
    config.write_text(to_toml({"server": {"data_dir": str(tmp_path / "nowhere")}}))
    result = run_blobd("token", *action, "-c", str(config), timeout=60)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("args, value", [
    (("put", "song.flac", "--parallel"), "0"), (("put", "song.flac", "--parallel"), "-2"),
    (("mirror", "sync", "-j"), "0"), (("mirror", "heal", "--jobs"), "-1"),
    (("mirror", "restore", "-j"), "many"),
])
def test_transfers_at_once_must_be_a_positive_count(args: tuple, value: str, capsys) -> None:
    """Found by review: --parallel 0 and -2 ran one chunk at a time, -j 0
    took [mirror] concurrency, -j -1 one transfer, all without a word."""
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args([*args, value])
    assert stopped.value.code == 2
    assert f"expected a whole number from 1 up, got '{value}'" in capsys.readouterr().err


def test_output_into_a_pipe_nobody_reads_ends_without_a_word(tmp_path: Path) -> None:
    """Found by review: `blobd fsck | head -3` (or `| grep -q`) said
    "blobd: error: Broken pipe" and exited 1, which for fsck means damage."""
    asyncio.run(_make_store(make_config(tmp_path)))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "blobd", "fsck", "--data-dir", str(tmp_path / "data")],
            stdout=write_end, stderr=subprocess.PIPE, text=True, env=blobd_env(), timeout=60)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (128 + signal.SIGPIPE, "")


async def _make_store(config) -> None:
    store = Store(config)
    await store.open()
    await store.close()

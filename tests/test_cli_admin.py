"""``blobd quota``, ``stats``, ``gc`` and ``fsck`` as real processes, beside a
real server process or on its data directory once it has stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import blake3
import pytest

from serverproc import BlobdServer, blobd_env, http as request, run_blobd, to_toml


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def blob_path(data_dir: Path, digest: str) -> Path:
    return data_dir / "blobs" / digest[:2] / digest[2:4] / digest


def put(server: BlobdServer, token: str, data: bytes) -> int:
    return request("PUT", f"{server.url}/blobs/{b3(data)}", token, data)[0]


def one_error_line(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def other_config(tmp_path: Path, server: BlobdServer, **sections) -> str:
    """A second config file for the same data directory."""
    path = tmp_path / "other.toml"
    path.write_text(to_toml({"server": {"data_dir": str(server.data_dir)}, **sections}))
    return str(path)


def test_quota_commands_act_on_a_running_server(tmp_path):
    with BlobdServer(tmp_path) as server:
        token = server.token("alice")
        result = server.cli("quota", "set", "alice", "--max-blobs", "1",
                            "--max-bytes", "1KiB")
        assert result.returncode == 0, result.stderr
        assert re.search(r"blobs\s+0 of 1\b", result.stdout), result.stdout
        assert put(server, token, b"one") == 201
        assert put(server, token, b"two") == 507
        shown = server.cli("quota", "show", "alice", "--json")
        body = json.loads(shown.stdout)
        assert body["used_blobs"] == 1 and body["limits"]["max_bytes"] == 1024
        assert server.cli("quota", "set", "alice", "--max-blobs", "default").returncode == 0
        assert put(server, token, b"two") == 201
        bad = one_error_line(server.cli("quota", "set", "alice", "--max-bytes", "lots"))
        assert "max_bytes" in bad
        assert server.cli("quota", "set", "alice").returncode != 0
        named = server.cli("quota", "set", "alice", "--max-refs", "2")
        assert re.search(r"references\s+2 of 2\b", named.stdout), named.stdout
        assert put(server, token, b"three") == 507


def test_stats_survive_a_restart(tmp_path):
    with BlobdServer(tmp_path) as server:
        admin, alice = server.token("root", "admin"), server.token("alice")
        data = os.urandom(10_000)
        assert put(server, alice, data) == 201
        assert put(server, alice, data) == 200
        server.terminate()
        server.start()
        status, raw = request("GET", f"{server.url}/stats", admin)
        assert status == 200
        body = json.loads(raw)
        assert (body["puts"], body["put_dedup_hits"], body["hash_hit_rate"]) == (2, 1, 0.5)
        cli = json.loads(server.cli("stats", "--json").stdout)
        assert {k: cli[k] for k in ("blobs", "puts", "put_dedup_hits", "stored_bytes")} == {
            "blobs": 1, "puts": 2, "put_dedup_hits": 1, "stored_bytes": 10_000}
        text = server.cli("stats")
        assert text.returncode == 0 and "dedup ratio" in text.stdout
        # The suite turns the scrub off unless a test asks for it.
        assert re.search(r"^scrub +off$", text.stdout, re.M), text.stdout


def test_gc_beside_a_running_server(tmp_path):
    with BlobdServer(tmp_path, {"gc": {"grace_seconds": 3600}}) as server:
        alice = server.token("alice")
        keep, drop = b"keep me", b"drop me"
        assert put(server, alice, keep) == 201 and put(server, alice, drop) == 201
        assert request("DELETE", f"{server.url}/blobs/{b3(drop)}", alice)[0] == 204
        waiting = server.cli("gc")
        assert waiting.returncode == 0 and "0 deleted" in waiting.stdout
        assert blob_path(server.data_dir, b3(drop)).exists()
        # The same store seen with no grace period: the blob is due now.
        due = run_blobd("gc", "-c", other_config(tmp_path, server, gc={"grace_seconds": 0}))
        assert due.returncode == 0 and "1 deleted" in due.stdout, due.stdout + due.stderr
        assert not blob_path(server.data_dir, b3(drop)).exists()
        assert request("GET", f"{server.url}/blobs/{b3(keep)}", alice) == (200, keep)
        assert put(server, alice, drop) == 201  # gone for good, stored anew


def test_fsck_offline_finds_repairs_and_exits_accordingly(tmp_path):
    server = BlobdServer(tmp_path)
    with server:
        alice = server.token("alice")
        bodies = [os.urandom(5000 + i) for i in range(5)]
        for body in bodies:
            assert put(server, alice, body) == 201
    lost = b3(bodies[0])
    blob_path(server.data_dir, lost).unlink()
    stray = server.data_dir / "blobs" / "stray.txt"
    stray.write_text("not a blob")

    checked = server.cli("fsck")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert f"missing: {lost}" in checked.stdout and f"stray: {stray}" in checked.stdout
    assert "checked 5 indexed blobs and 4 blob files offline" in checked.stdout

    repaired = server.cli("fsck", "--repair", "--progress")
    assert repaired.returncode == 1  # the lost blob cannot be repaired here
    assert "checking" in repaired.stderr and "blob" in repaired.stderr  # the bar
    assert "1 repaired" in repaired.stdout and "1 problem(s) remain" in repaired.stdout
    assert not stray.exists() and len(list((server.data_dir / "quarantine").iterdir())) == 1

    with server:
        assert put(server, server.token("alice"), bodies[0]) == 200  # heals the file
    healed = server.cli("fsck", "--verify")
    assert healed.returncode == 0, healed.stdout
    assert "no problems found" in healed.stdout


def test_fsck_repair_puts_back_a_blob_file_moved_up_the_tree(tmp_path):
    """Found by review: a blob file in blobs/ itself, or one level down,
    was quarantined as a stray, leaving its blob without a file."""
    server = BlobdServer(tmp_path)
    bodies = [os.urandom(4000), os.urandom(4001)]
    with server:
        alice = server.token("alice")
        for body in bodies:
            assert put(server, alice, body) == 201
    top, mid = (blob_path(server.data_dir, b3(body)) for body in bodies)
    os.rename(top, server.data_dir / "blobs" / top.name)
    os.rename(mid, server.data_dir / "blobs" / mid.name[:2] / mid.name)
    checked = server.cli("fsck")
    assert checked.returncode == 1
    assert checked.stdout.count("misplaced: ") == 2 and "stray" not in checked.stdout, \
        checked.stdout
    repaired = server.cli("fsck", "--repair")
    assert repaired.returncode == 0, repaired.stdout
    assert top.read_bytes() == bodies[0] and mid.read_bytes() == bodies[1]
    assert not (server.data_dir / "quarantine").exists() or \
        not any((server.data_dir / "quarantine").iterdir())
    assert "no problems found" in server.cli("fsck", "--verify").stdout


def test_fsck_repair_makes_its_moves_durable(tmp_path):
    """A power cut cannot be staged: strace shows each directory a repair
    moved a file out of or into fsynced after the move (else a crash could
    put a stray or a misplaced file back where the next check finds it)."""
    server = BlobdServer(tmp_path)
    body = os.urandom(5000)
    with server:
        assert put(server, server.token("alice"), body) == 201
    right = blob_path(server.data_dir, b3(body))
    wrong = "00" if not right.name.startswith("00") else "ff"
    misplaced = server.data_dir / "blobs" / wrong / wrong / right.name
    misplaced.parent.mkdir(parents=True)
    os.rename(right, misplaced)
    stray = server.data_dir / "blobs" / "stray.txt"
    stray.write_text("not a blob")
    if not server.config_path.exists():
        server._write_config()
    trace = tmp_path / "trace"
    done = subprocess.run(
        ["strace", "-f", "-y", "-o", str(trace),
         "-e", "trace=fsync,link,linkat,unlink,unlinkat,rename,renameat,renameat2",
         sys.executable, "-m", "blobd", "fsck", "--repair", "-c", str(server.config_path)],
        cwd=server.workdir, env=blobd_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert right.exists() and not misplaced.exists() and not stray.exists()
    lines = trace.read_text().splitlines()
    root = server.data_dir.resolve()

    def synced_after(word: str, path: Path) -> set[str]:
        (at,) = [n for n, line in enumerate(lines)
                 if word in line and f'"{path}"' in line and line.rstrip().endswith("= 0")]
        return {line.split("<", 1)[1].split(">", 1)[0] for line in lines[at:]
                if " fsync(" in line and line.rstrip().endswith("= 0")}

    assert {str(root / "quarantine"), str(root / "blobs")} <= synced_after(
        "rename", root / "blobs" / "stray.txt"), lines
    assert {str(right.resolve().parent), str(misplaced.resolve().parent)} <= synced_after(
        "unlink", misplaced.resolve()), lines


def test_fsck_reports_a_session_file_left_short_and_repair_allocates_it(tmp_path):
    """Found by review: a session file a crash left short of its length was
    allocated by --repair without a word, and plain fsck said "no problems
    found" (exit 0)."""
    server = BlobdServer(tmp_path, {"storage": {"fsync": False}})
    with server:
        status, raw = request("POST", f"{server.url}/uploads", server.token("alice"),
                              json.dumps({"size": 200_000}).encode())
        assert status == 201, raw
    session = json.loads(raw)["id"]
    path = server.data_dir / "uploads" / session
    os.truncate(path, 0)

    checked = server.cli("fsck")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert f"short: uploads/{session}: 0 bytes of its 200000" in checked.stdout
    assert "1 problem(s) remain" in checked.stdout
    assert path.stat().st_size == 0  # a plain fsck changes nothing

    repaired = server.cli("fsck", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"short: uploads/{session}" in repaired.stdout and "-> allocated" in repaired.stdout
    assert ": 1, 1 repaired" in repaired.stdout
    assert "every problem was repaired" in repaired.stdout
    assert path.stat().st_size == 200_000
    again = server.cli("fsck")
    assert again.returncode == 0 and "no problems found" in again.stdout, again.stdout


def test_fsck_reports_room_a_crash_left_held_ahead_and_repair_gives_it_back(tmp_path):
    """Found by review: the room a deferred-length tus PATCH reserves (and
    allocates) before reading its body, left held when the server was
    killed mid-body, was not seen by a plain fsck (exit 0), and --repair
    gave it back without a word, and only beside other upload repairs."""
    server = BlobdServer(tmp_path, {"storage": {"fsync": False}})
    declared = 5 << 20
    with server:
        token = server.token("alice")
        tus = {"Tus-Resumable": "1.0.0", "Authorization": f"Bearer {token}"}
        creation = urllib.request.Request(f"{server.url}/tus/", data=b"", method="POST",
                                          headers={**tus, "Upload-Defer-Length": "1"})
        with urllib.request.urlopen(creation, timeout=10) as resp:
            url_path = "/tus/" + resp.headers["Location"].rstrip("/").rsplit("/", 1)[1]
        session = url_path.rsplit("/", 1)[1]
        upload = server.data_dir / "uploads" / session
        sock = socket.create_connection(("127.0.0.1", server.port))
        try:
            sock.sendall((f"PATCH {url_path} HTTP/1.1\r\nHost: x\r\n"
                          f"Authorization: Bearer {token}\r\nTus-Resumable: 1.0.0\r\n"
                          "Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream"
                          f"\r\nContent-Length: {declared}\r\n\r\n").encode()
                         + b"x" * 65536)
            # Reserved, then allocated in the file: killed mid-body after both.
            deadline = time.monotonic() + 10
            while upload.stat().st_size < declared:
                assert time.monotonic() < deadline, server.state()
                time.sleep(0.05)
            server.kill9()
        finally:
            sock.close()

        checked = server.cli("fsck")
        assert checked.returncode == 1, checked.stdout + checked.stderr
        assert (f"ahead: uploads/{session}: {declared} bytes reserved past its offset 0"
                in checked.stdout), checked.stdout
        assert "1 problem(s) remain" in checked.stdout
        assert "reserved:" not in checked.stdout    # the owner's figures agree with it
        assert upload.stat().st_size == declared    # a plain fsck changes nothing

        repaired = server.cli("fsck", "--repair")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert f"ahead: uploads/{session}" in repaired.stdout
        assert "-> given back" in repaired.stdout, repaired.stdout
        assert ": 1, 1 repaired" in repaired.stdout and "every problem was repaired" in (
            repaired.stdout)
        assert upload.stat().st_size == 0 and upload.stat().st_blocks == 0
        again = server.cli("fsck")
        assert again.returncode == 0 and "no problems found" in again.stdout, again.stdout

        server.start()
        status, raw = request("GET", f"{server.url}/quota", token)
        assert status == 200 and json.loads(raw)["reserved_bytes"] == 0, raw
        assert "gave back the room" not in server.stderr_tail()  # nothing left to start-up


def _traffic(server: BlobdServer, token: str, stop: threading.Event, errors: list) -> None:
    """Store and drop blobs as fast as possible: commits in flight all the time."""
    n = 0
    while not stop.is_set():
        data = os.urandom(2000 + n % 500)
        n += 1
        statuses = (put(server, token, data), put(server, token, data),
                    request("DELETE", f"{server.url}/blobs/{b3(data)}", token)[0])
        if statuses != (201, 200, 204):
            errors.append(statuses)


def test_fsck_beside_a_busy_server_reports_no_false_damage(tmp_path):
    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        token = server.token("alice")
        for i in range(50):
            assert put(server, token, f"resident {i}".encode()) == 201
        stop, errors = threading.Event(), []
        workers = [threading.Thread(target=_traffic, args=(server, token, stop, errors))
                   for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            runs = [server.cli("fsck", *extra) for extra in ((), ("--verify",), (), ())]
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert errors == []
        for run in runs:
            assert run.returncode == 0, run.stdout + run.stderr
            assert "beside a running server" in run.stdout

        refused = one_error_line(server.cli("fsck", "--repair"))
        assert "running" in refused and "stop it" in refused
        victim = b3(b"resident 7")
        blob_path(server.data_dir, victim).unlink()
        damaged = server.cli("fsck")
        assert damaged.returncode == 1 and f"missing: {victim}" in damaged.stdout


def test_commands_refuse_a_directory_with_no_store(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(to_toml({"server": {"data_dir": str(tmp_path / "nothing")}}))
    for command in (("fsck",), ("gc",), ("stats",), ("quota", "show", "alice")):
        line = one_error_line(run_blobd(*command, "-c", str(config)))
        assert "no blobd store" in line, (command, line)
    assert not (tmp_path / "nothing").exists()


def run_unprivileged(*args: str) -> subprocess.CompletedProcess[str]:
    """``blobd ARGS`` without the power to read what its mode forbids: the
    tests run as root, so the capabilities that override file modes are
    dropped (as root owns the files, mode 0000 then locks it out too)."""
    command = [sys.executable, "-m", "blobd", *args]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to drop root's file capabilities")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]
    return subprocess.run(command, env=blobd_env(), capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("what", ["shard", "subshard", "file"])
def test_fsck_reports_what_it_cannot_read(tmp_path, what):
    """Found by review: an unreadable blob file (with --verify) or shard
    directory was an ExceptionGroup traceback. It is a problem of the
    report, and the blobs it would hold are not called missing."""
    bodies = [b"can be read", b"locked away"]
    assert b3(bodies[0])[:2] != b3(bodies[1])[:2]
    with BlobdServer(tmp_path) as server:
        token = server.token("alice")
        assert all(put(server, token, body) == 201 for body in bodies)
    locked = blob_path(server.data_dir, b3(bodies[1]))
    target = {"shard": locked.parent.parent, "subshard": locked.parent, "file": locked}[what]
    mode = target.stat().st_mode
    target.chmod(0)
    try:
        result = run_unprivileged("fsck", "--verify", "-c", str(server.config_path))
        repair = run_unprivileged("fsck", "--verify", "--repair", "-c",
                                  str(server.config_path))
    finally:
        target.chmod(mode)
    assert result.returncode == 1 and result.stderr == "", result.stderr
    problems = [line for line in result.stdout.splitlines() if ": " in line
                and not line.startswith(("checked", " "))]
    assert problems == [f"unreadable: {target}: Permission denied (owner root, mode 0000)"]
    assert f"checked {1 if what != 'file' else 2} indexed blobs" in result.stdout
    assert repair.returncode == 1 and repair.stderr == "", repair.stderr
    assert "not repaired: make it readable" in repair.stdout
    assert not (server.data_dir / "quarantine").exists()
    assert run_blobd("fsck", "--verify", "-c", str(server.config_path)).returncode == 0


def test_the_stats_scrub_line_says_each_state():
    from blobd.cli.admin import _scrub_line
    base = {"enabled": True, "blobs_checked": 3, "bytes_checked": 3_000_000, "damaged": 1,
            "missing": 0, "last_pass_ended": None, "pass_started": "2026-11-22T10:00:00.000Z",
            "continuous": False}
    assert _scrub_line({**base, "enabled": False}) == "off"
    assert _scrub_line(base) == ("3 blobs (2.9 MiB) checked, 1 moved to quarantine; no pass"
                                 " ended yet, one under way since 2026-11-22T10:00:00.000Z")
    line = _scrub_line({**base, "missing": 2, "continuous": True,
                        "last_pass_ended": "2026-11-21T10:00:00.000Z"})
    assert ", 2 without a file at the last pass; last pass ended 2026-11-21T10:00:00.000Z" in line
    assert line.endswith("(continuous: a pass takes longer than the period at this rate)")


def test_fsck_tells_a_quarantined_orphan_from_a_blobs_last_copy(tmp_path):
    """Found by review: an orphan --repair moved aside (a file no index row
    names) was described as "its blob has no file ... may be all that is
    left of its bytes", as a damaged blob's last copy is."""
    server = BlobdServer(tmp_path)
    with server:
        assert put(server, server.token("alice"), b"a blob") == 201
    body = os.urandom(3000)
    orphan = blob_path(server.data_dir, b3(body))
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(body)
    assert server.cli("fsck", "--repair").returncode == 0
    told = server.cli("fsck").stdout
    line = next(line for line in told.splitlines() if line.startswith("quarantined: "))
    assert b3(body) in line and "the index has no blob of this hash" in line, told
    assert "may be all that is left" not in line

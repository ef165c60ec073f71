"""``blobd put`` and ``blobd get`` as real processes against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blobd.client import BlobdClient
from conftest import b3
from cutproxy import CutProxy
from serverproc import BlobdServer, blobd_env, http as request, run_blobd
from test_enospc import tiny_fs  # noqa: F401 (a fixture: an 8 MiB tmpfs)

KIB = 1024
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> tuple[BlobdServer, str]:
    workdir = tmp_path_factory.mktemp("transfer")
    with BlobdServer(workdir, {"storage": {"fsync": False}}) as server:
        yield server, server.token("alice")


def cli(live, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    server, token = live
    return run_blobd(*args, "--server", server.url, "--token", token, cwd=cwd)


def chunk_puts(server: BlobdServer, session_id: str) -> int:
    """PUTs of chunks of one session, from the server's access log."""
    log = server.stderr_path.read_text()
    return len(re.findall(rf"PUT /uploads/{session_id}/\d+ 204 ", log))


async def cut_off_run(live, data: bytes, sent: tuple[int, ...]) -> str:
    """The session a `blobd put` of ``data`` leaves on the server when cut
    off after sending the 16 KiB chunks ``sent``; its id."""
    server, token = live
    async with BlobdClient(server.url, token) as client:
        _, session = await client.create_upload(len(data), digest=b3(data),
                                                chunk_size=16 * KIB)
        for idx in sent:
            await client.put_chunk(session["id"], idx,
                                   data[idx * 16 * KIB:(idx + 1) * 16 * KIB])
    return session["id"]


def sessions(live) -> list[dict]:
    server, token = live
    status, body = request("GET", f"{server.url}/uploads", token)
    assert status == 200
    return json.loads(body)["uploads"]


def test_put_small_files_then_skip_what_the_server_has(live, tmp_path: Path) -> None:
    one, two = tmp_path / "one.bin", tmp_path / "two.bin"
    one.write_bytes(os.urandom(10 * KIB))
    two.write_bytes(os.urandom(20 * KIB))
    first = cli(live, "put", str(one), str(two))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [f"{b3(one.read_bytes())}  {one}",
                                         f"{b3(two.read_bytes())}  {two}"]
    server, token = live
    assert request("GET", f"{server.url}/blobs/{b3(two.read_bytes())}", token)[1] == \
        two.read_bytes()
    again = cli(live, "put", "--ref", "songs:one", str(one))
    assert again.returncode == 0, again.stderr
    assert "nothing was sent" in again.stderr
    status, ref = request("GET", f"{server.url}/refs/songs:one", token)
    assert status == 200 and json.loads(ref)["hash"] == b3(one.read_bytes())


def test_put_big_file_through_a_session_and_get_it_back(live, tmp_path: Path) -> None:
    src = tmp_path / "long.wav"
    src.write_bytes(os.urandom(300 * KIB + 7))
    put = cli(live, "put", "--session-threshold", "64KiB", "--chunk-size", "32KiB",
              str(src))
    assert put.returncode == 0, put.stderr
    assert "upload session" in put.stderr
    digest = b3(src.read_bytes())
    assert put.stdout.strip() == f"{digest}  {src}"
    # A session for known content transfers nothing either.
    again = cli(live, "put", "--session-threshold", "64KiB", str(src))
    assert "nothing was sent" in again.stderr

    out = tmp_path / "copy.wav"
    get = cli(live, "get", digest, "-o", str(out))
    assert get.returncode == 0, get.stderr
    assert out.read_bytes() == src.read_bytes() and get.stdout.strip() == str(out)
    default = cli(live, "get", digest, cwd=tmp_path)
    assert default.returncode == 0 and (tmp_path / digest).read_bytes() == src.read_bytes()


def test_put_resumes_an_interrupted_session(live, tmp_path: Path) -> None:
    src = tmp_path / "interrupted.flac"
    data = os.urandom(10 * 16 * KIB)
    src.write_bytes(data)
    server, token = live
    # What a run cut off after three chunks leaves on the server.
    session_id = asyncio.run(cut_off_run(live, data, (0, 3, 7)))
    put = cli(live, "put", "--session-threshold", "64KiB", str(src))
    assert put.returncode == 0, put.stderr
    assert f"resumed upload session {session_id}" in put.stderr
    assert f"sent the {7 * 16 * KIB} of {len(data)} bytes" in put.stderr
    assert chunk_puts(server, session_id) == 10  # 3 before, 7 now: none twice
    assert request("GET", f"{server.url}/blobs/{b3(data)}", token)[1] == data


def test_put_cut_off_midway_then_run_again(live, tmp_path: Path) -> None:
    src = tmp_path / "cut.wav"
    data = os.urandom(2 << 20)
    src.write_bytes(data)
    server, token = live
    # The network dies after ~700 KiB: some 64 KiB chunks made it, one was
    # cut off mid-body, the rest never left.
    with CutProxy(server.port, budget=700 * KIB) as proxy:
        first = run_blobd("put", "--server", proxy.url, "--token", token,
                          "--session-threshold", "64KiB", "--chunk-size", "64KiB", str(src))
    assert first.returncode == 1 and proxy.cut.is_set()
    assert len(first.stderr.strip().splitlines()) == 1, first.stderr
    [session] = [s for s in sessions(live) if s["hash"] == b3(data)]
    assert 0 < len(session["received"]) < 32

    again = cli(live, "put", "--session-threshold", "64KiB", str(src))
    assert again.returncode == 0, again.stderr
    assert f"resumed upload session {session['id']}" in again.stderr
    assert chunk_puts(server, session["id"]) == 32  # every chunk acknowledged once
    assert request("GET", f"{server.url}/blobs/{b3(data)}", token)[1] == data


def test_get_of_a_malformed_address_names_it(live, tmp_path: Path) -> None:
    result = cli(live, "get", "9f2c", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == ("blobd: error: '9f2c': address must be 64 hex characters of"
                             " BLAKE3 (or sha256:<64 hex>), optionally with a file"
                             " extension\n")
    assert list(tmp_path.iterdir()) == []


def test_get_refuses_bytes_that_do_not_match(live, tmp_path: Path) -> None:
    server, token = live
    data = os.urandom(5000)
    assert request("PUT", f"{server.url}/blobs/{b3(data)}", token, data)[0] == 201
    digest = b3(data)
    path = server.data_dir / "blobs" / digest[:2] / digest[2:4] / digest
    path.write_bytes(b"\0" * len(data))  # damage on disk, same size
    out = tmp_path / "damaged.bin"
    get = cli(live, "get", digest, "-o", str(out))
    assert get.returncode == 1
    assert len(get.stderr.strip().splitlines()) == 1 and digest in get.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, words", [
    (("get", "0" * 64), "no blob"),
    (("get", "not-a-hash"), "64 hex"),
    (("put", "/nonexistent/file"), "no such file"),
    # Found by review: both said "no such file".
    (("put", "."), ".: is a directory"),
    (("put", "/dev/null"), "/dev/null: is not a regular file"),
])
def test_transfer_errors_are_one_line(live, tmp_path: Path, args: tuple, words: str) -> None:
    result = cli(live, *args, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr


def test_put_with_a_bad_token_or_no_server(live, tmp_path: Path) -> None:
    src = tmp_path / "x.bin"
    src.write_bytes(b"x")
    server, _ = live
    bad = run_blobd("put", "--server", server.url, "--token", "nope", str(src))
    assert bad.returncode == 1 and "token" in bad.stderr
    gone = run_blobd("put", "--server", "http://127.0.0.1:9", "--token", "t", str(src))
    assert gone.returncode == 1 and "cannot reach" in gone.stderr
    # Found by review: put named the option, get did not.
    tokenless = run_blobd("get", "0" * 64, "--server", server.url, "--token", "")
    assert tokenless.returncode == 1
    assert "token is required: --token or $BLOBD_TOKEN" in tokenless.stderr, tokenless.stderr


class ProxyWithoutBlobd:
    """nginx in front of a blobd that is down: every request gets a 502
    and an HTML page."""

    PAGE = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
            b"<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n")

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n"
                             % len(self.PAGE) + self.PAGE)

    def close(self) -> None:
        self.listener.close()


def test_an_error_page_instead_of_blobd_is_one_line(tmp_path: Path) -> None:
    """Found by review: the proxy's whole HTML page was the error message."""
    src = tmp_path / "x.bin"
    src.write_bytes(b"x")
    proxy = ProxyWithoutBlobd()
    try:
        for args in (("put", str(src)), ("get", "0" * 64, "-o", str(tmp_path / "y"))):
            result = run_blobd(*args, "--server", proxy.url, "--token", "t")
            assert result.returncode == 1
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "<" not in lines[0], result.stderr
            assert f"{proxy.url} answered 502 Bad Gateway" in lines[0], result.stderr
    finally:
        proxy.close()


def test_get_to_a_place_it_cannot_write_is_one_line_and_leaves_nothing(
        live, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    src = tmp_path / "x.bin"
    src.write_bytes(data)
    assert cli(live, "put", str(src)).returncode == 0
    digest = b3(data)
    out = tmp_path / "out"
    (out / "isdir").mkdir(parents=True)
    for target, words in ((str(out / "isdir"), f"{out / 'isdir'} is a directory"),
                          (".", ". is a directory"), ("/", "/ is a directory"),
                          (str(out / "nodir" / "a.bin"), f"{out / 'nodir'} is no directory")):
        result = cli(live, "get", digest, "-o", target, cwd=out)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["isdir"]  # no .part file left
    assert list((out / "isdir").iterdir()) == []


class StallingServer:
    """A peer that answers a GET with the start of a long body and then
    sends nothing more: a download the user gives up on."""

    def __init__(self, sent: int) -> None:
        self.sent = sent
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n"
                         + b"x" * self.sent)
            conn.recv(1)  # until the client is gone

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_get_stopped_by_a_signal_leaves_no_partial_file(tmp_path: Path, signum) -> None:
    """Found by review: Ctrl-C removed the partial file, `kill` and a
    closed terminal (SIGHUP) left it behind."""
    peer = StallingServer(sent=1 << 20)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "blobd", "get", "0" * 64, "-o", "song.flac",
             "--server", peer.url, "--token", "t"], cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size >= 1 << 20 for p in tmp_path.glob(".song.flac.part-*")):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signum)
        proc.wait(timeout=30)
    finally:
        peer.close()
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_put_skips_a_stale_session_when_the_server_has_the_blob_meanwhile(
        live, tmp_path: Path) -> None:
    """A run cut off mid-session, then the same bytes stored by another
    client: the next run sends nothing and drops the old session."""
    src = tmp_path / "stale.flac"
    data = os.urandom(10 * 16 * KIB)
    src.write_bytes(data)
    server, token = live
    session_id = asyncio.run(cut_off_run(live, data, (0,)))
    assert request("PUT", f"{server.url}/blobs/{b3(data)}", token, data)[0] == 201
    put = cli(live, "put", "--session-threshold", "64KiB", str(src))
    assert put.returncode == 0, put.stderr
    assert "resumed" not in put.stderr and "nothing was sent" in put.stderr, put.stderr
    assert chunk_puts(server, session_id) == 1
    assert session_id not in {s["id"] for s in sessions(live)}


def test_a_stored_blob_is_private_and_a_downloaded_file_the_user_s(live, tmp_path: Path) -> None:
    server, token = live
    data = os.urandom(3000)
    assert request("PUT", f"{server.url}/blobs/{b3(data)}", token, data)[0] in (200, 201)
    digest = b3(data)
    stored = server.data_dir / "blobs" / digest[:2] / digest[2:4] / digest
    assert stat.S_IMODE(stored.stat().st_mode) == 0o640
    got = subprocess.run(["sh", "-c", 'umask 022 && exec "$@"', "sh", sys.executable, "-m",
                          "blobd", "get", digest, "-o", "mine.bin", "--server", server.url,
                          "--token", token], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert got.returncode == 0, got.stderr
    assert stat.S_IMODE((tmp_path / "mine.bin").stat().st_mode) == 0o644


def stored(live, data: bytes) -> str:
    server, token = live
    assert request("PUT", f"{server.url}/blobs/{b3(data)}", token, data)[0] in (200, 201)
    return b3(data)


def test_get_through_a_symlink_replaces_its_target(live, tmp_path: Path) -> None:
    """Found by review: the link itself was replaced by a regular file and
    the file it named kept its old bytes."""
    data = os.urandom(8000)
    digest = stored(live, data)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "song.flac"
    target.write_bytes(b"old")
    link = tmp_path / "link.flac"
    link.symlink_to(target)
    dangling = tmp_path / "new.flac"
    dangling.symlink_to(tmp_path / "real" / "new-target.flac")
    for dest, real in ((link, target), (dangling, tmp_path / "real" / "new-target.flac")):
        result = cli(live, "get", digest, "-o", str(dest))
        assert result.returncode == 0, result.stderr
        assert dest.is_symlink() and real.read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == [
        "new-target.flac", "song.flac"]  # no .part file left beside either


def test_get_into_a_fifo_writes_into_it(live, tmp_path: Path) -> None:
    data = os.urandom(300 * KIB)
    digest = stored(live, data)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    # A daemon: if blobd never opens the FIFO, the reader waits forever.
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = cli(live, "get", digest, "-o", str(fifo))
    reader.join(timeout=10)
    assert result.returncode == 0, result.stderr
    assert received == [data]
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert list(tmp_path.iterdir()) == [fifo]


def test_get_into_a_fifo_nobody_reads_stops_on_ctrl_c(live, tmp_path: Path) -> None:
    """Found by review: the copy's thread sat in open() waiting for a
    reader, and the command could not be stopped at all."""
    digest = stored(live, os.urandom(300 * KIB))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    server, token = live
    # Run as a background job of a shell without job control (as a CI
    # runner may start the suite), pytest has SIGINT ignored, and a child
    # inherits that: Ctrl-C could never reach it. A handler of our own
    # is reset to the default in the child instead.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "blobd", "get", digest, "-o", str(fifo),
                                 "--server", server.url, "--token", token],
                                env=blobd_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        time.sleep(2)                   # downloaded and verified; waiting for a reader
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
    finally:
        proc.kill()
        proc.wait()
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and list(tmp_path.iterdir()) == [fifo]


def test_get_into_a_device_writes_into_it(live, tmp_path: Path) -> None:
    """Found by review: as root, -o /dev/null turned the device into a
    regular file. A node of /dev/null's own numbers stands in for it."""
    digest = stored(live, os.urandom(5000))
    null = tmp_path / "null"
    try:
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")
    result = cli(live, "get", digest, "-o", str(null))
    assert result.returncode == 0, result.stderr
    assert stat.S_ISCHR(null.lstat().st_mode) and null.stat().st_rdev == os.makedev(1, 3)
    assert list(tmp_path.iterdir()) == [null]


@pytest.mark.parametrize("output", ["-", "/dev/fd/1"])
def test_get_to_standard_output_only_verified_bytes(live, tmp_path: Path, output: str) -> None:
    server, token = live

    def get(digest: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "blobd", "get", digest, "-o", output,
                               "--server", server.url, "--token", token], cwd=tmp_path,
                              capture_output=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(REPO),
                                   "TMPDIR": str(tmp_path)})

    data = os.urandom(200 * KIB)
    got = get(stored(live, data))
    assert got.returncode == 0, got.stderr
    assert got.stdout == data and b"standard output: verified" in got.stderr
    # Damaged on disk: nothing at all reaches the stream, and the spool is gone.
    bad = os.urandom(5000)
    damaged = stored(live, bad)
    (server.data_dir / "blobs" / damaged[:2] / damaged[2:4] / damaged).write_bytes(
        b"\0" * len(bad))
    refused = get(damaged)
    assert refused.returncode == 1 and refused.stdout == b""
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert list(tmp_path.iterdir()) == []


def test_get_onto_a_full_disk_says_which_disk(live, tmp_path: Path, tiny_fs: Path) -> None:
    """Found by review: "the disk is full", as the server's 507 reads, with
    nothing to say that it was the disk of -o, of $TMPDIR or of /dev/full."""
    server, token = live
    digest = stored(live, os.urandom(9 << 20))  # the tmpfs holds 8 MiB

    def get(output: str, tmpdir: Path) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-m", "blobd", "get", digest, "-o", output, "--server",
             server.url, "--token", token], cwd=tmp_path, capture_output=True, text=True,
            timeout=60, env={**blobd_env(), "TMPDIR": str(tmpdir)})
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        return lines

    assert f"{tiny_fs}: the disk is full" in get(str(tiny_fs / "song.flac"), tmp_path)[0]
    spooled = get("-", tiny_fs)[0]
    assert f"{tiny_fs}: the disk is full" in spooled and "$TMPDIR" in spooled
    assert "nothing was written" in spooled     # found by review: it said "waits there"
    assert "No space left on device: /dev/full" in get("/dev/full", tmp_path)[0]
    assert list(tiny_fs.iterdir()) == [] and list(tmp_path.iterdir()) == [tiny_fs]


def test_put_to_a_server_with_sessions_off_sends_one_put(tmp_path: Path) -> None:
    """Found by review: on an older config's max_sessions_per_owner = 0, a
    file over the session threshold was an error ("send the blob in one
    PUT"), and so was one the server had already, which older versions
    answered at once: both go in one PUT now, the second sending nothing."""
    with BlobdServer(tmp_path / "srv", {"storage": {"fsync": False},
                                        "uploads": {"max_sessions_per_owner": 0}}) as server:
        live = (server, server.token("alice"))
        song = tmp_path / "song.bin"
        song.write_bytes(os.urandom(40 * KIB))
        args = ("put", "--session-threshold", "16KiB", str(song))
        first = cli(live, *args)
        assert first.returncode == 0, first.stderr
        assert first.stdout == f"{b3(song.read_bytes())}  {song}\n"
        again = cli(live, *args[:-1], "--ref", "songs:one", str(song))
        assert again.returncode == 0, again.stderr
        named = json.loads(request("GET", f"{server.url}/refs/songs:one", live[1])[1])
        assert named["hash"] == b3(song.read_bytes())
        log = server.stderr_path.read_text()
    assert re.findall(r"(PUT|POST) /(?:blobs|uploads)\S* (\d+) ", log) == [
        ("POST", "507"), ("PUT", "201"), ("POST", "507"), ("PUT", "200")], log
    assert re.search(r"PUT /blobs/\w+ 200 \S+ in=0 ", log), log

"""The request log of a real ``blobd serve``: one line per request with
method, path, status, duration, bytes, owner; and never a token."""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import blake3
import pytest

from blobd.http.takeover import MIN_SIZE
from serverproc import BlobdServer

LINE = re.compile(r"(?P<method>\S+) (?P<path>\S+) (?P<status>\d{3}|-) "
                  r"(?P<ms>\d+\.\d)ms in=(?P<received>\d+) out=(?P<sent>\d+) "
                  r"owner=(?P<owner>\S+) from=(?P<peer>\S+)( aborted)?$")


def call(url: str, method: str = "GET", token: str | None = None,
         data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def raw_status(port: int, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return int(sock.recv(4096).split(b" ")[1])


def access_lines(stderr: str) -> list[dict[str, str]]:
    lines = []
    for line in stderr.splitlines():
        _, marker, rest = line.partition(" blobd.access: ")
        if marker:
            match = LINE.match(rest)
            assert match, f"malformed request log line: {rest!r}"
            lines.append(match.groupdict())
    return lines


# The larger body is read off the socket (blobd.sockbody), not by aiohttp:
# its bytes must be counted all the same.
@pytest.mark.parametrize("size", [100_000, MIN_SIZE + 1])
def test_one_line_per_request(tmp_path: Path, size: int):
    data = b"x" * size
    digest = blake3.blake3(data).hexdigest()
    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        token = server.token("alice")
        url = f"{server.url}/blobs/{digest}"
        assert call(url, "PUT", token, data) == 201
        assert call(url, token=token) == 200
        assert call(url, token=token, headers={"Range": "bytes=10-19"}) == 206
        assert call(url, token="not-a-token") == 401
        assert call(f"{server.url}/healthz") == 200
        server.terminate()
    lines = access_lines(server.stderr_path.read_text())
    # The first /healthz is the helper's start-up probe. A line is written
    # when its response is done, which for a big sendfile GET can come
    # after the next request's (seen once under load): found by status.
    last = lines[-5:]
    blob = [line for line in last if line["path"] != "/healthz"]
    put, get, ranged, denied = (next(line for line in blob if line["status"] == status)
                                for status in ("201", "200", "206", "401"))
    health = [line for line in last if line["path"] == "/healthz"][-1]
    assert len({id(line) for line in (put, get, ranged, denied, health)}) == 5
    assert (put["method"], put["path"], put["status"], put["owner"]) == (
        "PUT", f"/blobs/{digest}", "201", "alice")
    assert int(put["received"]) == len(data)
    # sendfile bypasses aiohttp's writer; the body must still be counted.
    assert len(data) < int(get["sent"]) < len(data) + 1024
    assert (get["status"], get["received"]) == ("200", "0")
    assert ranged["status"] == "206" and 10 < int(ranged["sent"]) < 1024
    assert (denied["status"], denied["owner"]) == ("401", "-")
    assert (health["path"], health["owner"], health["peer"]) == ("/healthz", "-", "127.0.0.1")
    assert all(float(line["ms"]) >= 0 for line in lines)


def test_client_hanging_up_is_one_aborted_line(tmp_path: Path):
    """Not an error with a traceback: one request line, and no temp file."""
    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"PUT /blobs/{'a' * 64} HTTP/1.1\r\nHost: t\r\n"
                         f"Authorization: Bearer {server.token('alice')}\r\n"
                         f"Content-Length: 3000000\r\n\r\n".encode() + b"x" * 1_500_000)
            # More than the first piece a body is held in memory as
            # (ingest.WRITE_CHUNK), so the temp file exists.
            tmp = server.data_dir / "tmp"
            deadline = time.monotonic() + 10
            while not any(tmp.iterdir()):
                assert time.monotonic() < deadline, "the upload never started"
                time.sleep(0.01)
        deadline = time.monotonic() + 10
        while any(tmp.iterdir()):
            assert time.monotonic() < deadline, "the temp file stayed"
            time.sleep(0.01)
        assert call(f"{server.url}/healthz") == 200
        server.terminate()
    stderr = server.stderr_path.read_text()
    (put,) = [line for line in access_lines(stderr) if line["method"] == "PUT"]
    assert (put["status"], put["owner"], put["sent"]) == ("-", "alice", "0")
    assert int(put["received"]) == 1_500_000
    assert f"PUT /blobs/{'a' * 64} - " in stderr and stderr.count(" aborted\n") == 1
    assert "Traceback" not in stderr and "ERROR" not in stderr


def test_no_token_in_any_log_output(tmp_path: Path):
    """At debug level, with the token in the header, in the query string and
    as a wrong token, neither stream ever shows it."""
    data = b"secret-free logs"
    digest = blake3.blake3(data).hexdigest()
    config = {"storage": {"fsync": False}, "logging": {"level": "debug"}}
    with BlobdServer(tmp_path, config) as server:
        token = server.token("alice")
        wrong = token[:-6] + "AAAAAA"
        url = f"{server.url}/blobs/{digest}"
        assert call(f"{url}?token={token}&access_token={token}", "PUT", token, data) == 201
        assert call(f"{url}?token={token}", token=token) == 200
        assert call(f"{url}/meta?t={wrong}", token=wrong) == 401
        assert call(f"{server.url}/blobs?token={token}", token=f"{token} extra") == 401
        # Malformed requests, which aiohttp would echo back in a traceback.
        for raw in (f"GET /blobs?token={token}\x01 HTTP/1.1\r\nHost: t\r\n\r\n",
                    f"GET /blobs HTTP/1.1\r\nAuthorization: Bearer {token}\x01\r\n\r\n",
                    f"GET /blobs HTTP/1.1\r\nBearer {token}\r\n\r\n"):
            assert raw_status(server.port, raw.encode()) == 400
        server.terminate()
    output = server.stderr_path.read_text() + server.stdout_path.read_text()
    assert f"GET /blobs/{digest} 200" in output  # the requests were logged
    assert "DEBUG" in output  # and at debug level
    assert "400 bad_request from 127.0.0.1: malformed request target" in output
    assert "ERROR" not in output
    for secret in (token, wrong, token[8:]):
        assert secret not in output


@pytest.mark.parametrize("raw_path, logged", [
    ("/healthz%0AINFO%20blobd.access:%20forged", "/healthz%0AINFO%20blobd.access:%20forged"),
    ("/blobs/%E2%80%AE", "/blobs/%E2%80%AE"),
])
def test_paths_cannot_forge_lines(tmp_path: Path, raw_path: str, logged: str):
    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        assert call(server.url + raw_path) in (400, 401, 404)
        server.terminate()
    stderr = server.stderr_path.read_text()
    assert f"GET {logged} 40" in stderr
    assert "forged" not in stderr.replace(logged, "")
    assert len(access_lines(stderr)) == 2  # the start-up probe and ours


def test_access_log_can_be_turned_off(tmp_path: Path):
    config = {"storage": {"fsync": False}, "logging": {"access_log": False}}
    with BlobdServer(tmp_path, config) as server:
        assert call(f"{server.url}/healthz") == 200
        server.terminate()
    stderr = server.stderr_path.read_text()
    assert "blobd.daemon: blobd" in stderr and "blobd.access" not in stderr

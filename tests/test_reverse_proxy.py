"""contrib/nginx-blobd.conf, run by a real nginx in front of a real blobd:
big uploads pass (and stream), ranges pass."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import blake3
import pytest

from serverproc import BlobdServer, free_port

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "contrib" / "nginx-blobd.conf"


@pytest.fixture
def blobd(tmp_path: Path):
    with BlobdServer(tmp_path / "blobd", {"storage": {"fsync": False}}) as server:
        yield server


@pytest.fixture
def nginx(tmp_path: Path, blobd: BlobdServer):
    """The documented server block, only its listen and upstream addresses
    changed, inside a minimal nginx.conf; yields nginx's URL."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if binary is None:
        pytest.fail("nginx not found: apt-get install nginx")
    port = free_port()
    site = SITE.read_text()
    assert site.count("listen 80;") == 1 and site.count("server 127.0.0.1:8420;") == 1
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    site = site.replace("server 127.0.0.1:8420;", f"server 127.0.0.1:{blobd.port};")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    (prefix / "blobd.conf").write_text(site)
    temp_paths = "\n".join(f"  {kind}_temp_path {prefix}/{kind};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(
        f"error_log {prefix}/error.log info;\npid {prefix}/nginx.pid;\nevents {{}}\n"
        f"http {{\n  access_log {prefix}/access.log;\n{temp_paths}\n"
        f"  include {prefix}/blobd.conf;\n}}\n")
    proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                             "-g", "daemon off; master_process off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except ConnectionRefusedError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def fetch(url: str, method: str = "GET", *, data: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, dict(resp.headers), resp.read()


def test_big_upload_and_ranges_through_nginx(blobd: BlobdServer, nginx: str):
    data = os.urandom(5 << 20)  # well over nginx's default 1m body limit
    digest = blake3.blake3(data).hexdigest()
    auth = {"Authorization": f"Bearer {blobd.token('alice')}"}
    status, _, _ = fetch(f"{nginx}/blobs/{digest}", "PUT", data=data, headers=auth)
    assert status == 201
    status, _, body = fetch(f"{nginx}/blobs/{digest}", headers=auth)
    assert status == 200 and body == data
    status, headers, body = fetch(f"{nginx}/blobs/{digest}",
                                  headers={**auth, "Range": "bytes=4000000-4099999"})
    assert status == 206 and body == data[4_000_000:4_100_000]
    assert headers["Content-Range"] == f"bytes 4000000-4099999/{len(data)}"


def test_uploads_stream_through_nginx(blobd: BlobdServer, nginx: str):
    """blobd is receiving while the client is still sending: nginx does not
    spool the body first."""
    data = os.urandom(4 << 20)
    digest = blake3.blake3(data).hexdigest()
    host, port = nginx.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"PUT /blobs/{digest} HTTP/1.1\r\nHost: blobd.home.arpa\r\n"
                     f"Authorization: Bearer {blobd.token('alice')}\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                     + data[:1 << 20])
        tmp = blobd.data_dir / "tmp"
        deadline = time.monotonic() + 10
        while not any(tmp.iterdir()):
            assert time.monotonic() < deadline, "blobd saw nothing of the upload yet"
            time.sleep(0.02)
        sock.sendall(data[1 << 20:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:200]
    assert (blobd.data_dir / "blobs" / digest[:2] / digest[2:4] / digest).read_bytes() == data


def test_nginx_keeps_its_connections_to_blobd(blobd: BlobdServer, nginx: str):
    """Found by review: without an upstream keepalive nginx opened a new
    connection to blobd for every request (every seek of a player)."""
    data = os.urandom(1000)
    digest = blake3.blake3(data).hexdigest()
    auth = {"Authorization": f"Bearer {blobd.token('alice')}"}
    assert fetch(f"{nginx}/blobs/{digest}", "PUT", data=data, headers=auth)[0] == 201
    for start in range(0, 1000, 100):
        status, _, body = fetch(f"{nginx}/blobs/{digest}",
                                headers={**auth, "Range": f"bytes={start}-{start + 99}"})
        assert status == 206 and body == data[start:start + 100]
    # Between requests nginx holds an idle connection open to blobd.
    listing = subprocess.run(["ss", "-Htn", "state", "established",
                              f"( dport = :{blobd.port} )"],
                             capture_output=True, text=True, check=True).stdout
    assert len(listing.splitlines()) >= 1, listing

"""Stock tus clients against a real ``blobd serve``: tuspy (PyPI) and
tus-js-client under Node (npm, installed into tests/js by the fixture)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
from tusclient import client as tus_client
from tusclient.storage.filestorage import FileStorage

from conftest import b3
from serverproc import BlobdServer, http as request

JS_DIR = Path(__file__).resolve().parent / "js"
CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> tuple[BlobdServer, str]:
    workdir = tmp_path_factory.mktemp("tus-clients")
    with BlobdServer(workdir, {"storage": {"fsync": False}}) as server:
        yield server, server.token("alice")


@pytest.fixture(scope="session")
def tus_js() -> Path:
    """tus-js-client from tests/js/package-lock.json, installed once."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("these tests drive tus-js-client under Node: install node and npm"
                    " (Debian: apt-get install nodejs npm)")
    # node_modules is a cache of package-lock.json: reinstalled when the lock changes.
    lock = hashlib.sha256((JS_DIR / "package-lock.json").read_bytes()).hexdigest()
    stamp = JS_DIR / "node_modules" / ".installed-from-lock"
    if not stamp.exists() or stamp.read_text() != lock:
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR,
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            pytest.fail(f"npm ci in {JS_DIR} failed:\n{result.stderr[-2000:]}")
        stamp.write_text(lock)
    return JS_DIR / "upload.mjs"


def sample(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def stored(live: tuple[BlobdServer, str], digest: str) -> bytes:
    server, token = live
    status, body = request("GET", f"{server.url}/blobs/{digest}", token)
    assert status == 200, body
    return body


def tuspy(live: tuple[BlobdServer, str]) -> tus_client.TusClient:
    server, token = live
    return tus_client.TusClient(server.url + "/tus/",
                                headers={"Authorization": f"Bearer {token}"})


# -- tuspy -------------------------------------------------------------------

def test_tuspy_full_upload(live, tmp_path: Path) -> None:
    data = sample(tmp_path / "take.wav", 5 * CHUNK + 321)
    uploader = tuspy(live).uploader(str(tmp_path / "take.wav"), chunk_size=CHUNK,
                                    metadata={"filename": "take.wav", "ref": "tuspy:full"})
    uploader.upload()
    assert uploader.request.response_headers["blob-hash"] == b3(data)
    assert stored(live, b3(data)) == data
    server, token = live
    status, ref = request("GET", f"{server.url}/refs/tuspy:full", token)
    assert status == 200 and json.loads(ref)["hash"] == b3(data)


def drop_mid_patch(url: str, token: str, offset: int, body: bytes, sent: int) -> None:
    """A PATCH whose connection dies after ``sent`` of its bytes."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        head = (f"PATCH {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Authorization: Bearer {token}\r\nTus-Resumable: 1.0.0\r\n"
                f"Content-Type: application/offset+octet-stream\r\n"
                f"Upload-Offset: {offset}\r\nContent-Length: {len(body)}\r\n\r\n")
        sock.sendall(head.encode() + body[:sent])
        time.sleep(0.2)


def wait_for_offset(url: str, token: str, expected: int, timeout: float = 10.0) -> int:
    """The server records a dropped PATCH's bytes when it notices the hang-up;
    a phone's app restarts long after that, so wait for it as the app would."""
    deadline = time.monotonic() + timeout
    while True:
        parts = urllib.parse.urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port)) as sock:
            sock.sendall((f"HEAD {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                          f"Authorization: Bearer {token}\r\nTus-Resumable: 1.0.0\r\n"
                          "Connection: close\r\n\r\n").encode())
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        offset = next((int(line.split(b":", 1)[1]) for line in reply.split(b"\r\n")
                       if line.lower().startswith(b"upload-offset:")), -1)
        if offset == expected or time.monotonic() > deadline:
            return offset
        time.sleep(0.05)


def test_tuspy_interrupted_upload_resumes_in_a_fresh_client(live, tmp_path: Path) -> None:
    path = tmp_path / "long.m4a"
    data = sample(path, 6 * CHUNK + 99)
    storage = FileStorage(str(tmp_path / "tus-urls.json"))
    first = tuspy(live).uploader(str(path), chunk_size=CHUNK, store_url=True,
                                 url_storage=storage)
    first.upload(stop_at=2 * CHUNK)  # two chunks, then the app is killed ...
    assert first.offset == 2 * CHUNK
    # ... in the middle of the third: 10 000 of its bytes reached the server.
    server, token = live
    drop_mid_patch(first.url, token, first.offset, data[2 * CHUNK:3 * CHUNK], 10_000)
    assert wait_for_offset(first.url, token, 2 * CHUNK + 10_000) == 2 * CHUNK + 10_000

    fresh = tuspy(live).uploader(str(path), chunk_size=CHUNK, store_url=True,
                                 url_storage=FileStorage(str(tmp_path / "tus-urls.json")))
    assert fresh.url == first.url
    assert fresh.offset == 2 * CHUNK + 10_000  # from the server's HEAD
    fresh.upload()
    assert fresh.request.response_headers["blob-hash"] == b3(data)
    assert stored(live, b3(data)) == data


def test_tuspy_with_checksums(live, tmp_path: Path) -> None:
    data = sample(tmp_path / "checked.flac", 3 * CHUNK + 1)
    uploader = tuspy(live).uploader(str(tmp_path / "checked.flac"), chunk_size=CHUNK,
                                    upload_checksum=True)
    uploader.upload()
    assert uploader.request.response_headers["blob-hash"] == b3(data)
    assert stored(live, b3(data)) == data


# -- tus-js-client -----------------------------------------------------------

def run_js(script: Path, live, **options) -> dict:
    server, token = live
    args = {"endpoint": server.url + "/tus/", "token": token, **options}
    result = subprocess.run(["node", str(script), json.dumps(args)], cwd=script.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("options", [
    {},
    {"uploadDataDuringCreation": True, "overridePatchMethod": True},
], ids=["plain", "creation-with-upload+override"])
def test_tus_js_client_upload(tus_js: Path, live, tmp_path: Path, options: dict) -> None:
    data = sample(tmp_path / "voice.ogg", 4 * CHUNK + 5)
    result = run_js(tus_js, live, file=str(tmp_path / "voice.ogg"), chunkSize=CHUNK,
                    metadata={"filename": "voice.ogg", "filetype": "audio/x-test"},
                    **options)
    assert result["status"] == "success" and result["blobHash"] == b3(data)
    assert stored(live, b3(data)) == data
    server, token = live
    meta = json.loads(request("GET", f"{server.url}/blobs/{b3(data)}/meta", token)[1])
    assert meta["content_type"] == "audio/x-test"


def test_tus_js_client_parallel_uploads(tus_js: Path, live, tmp_path: Path) -> None:
    data = sample(tmp_path / "big.wav", 9 * CHUNK + 17)
    result = run_js(tus_js, live, file=str(tmp_path / "big.wav"), chunkSize=CHUNK,
                    parallelUploads=3, metadata={"ref": "js:parallel"})
    assert result["status"] == "success" and result["blobHash"] == b3(data)
    assert stored(live, b3(data)) == data


def test_tus_js_client_resumes_an_aborted_upload(tus_js: Path, live,
                                                 tmp_path: Path) -> None:
    path = tmp_path / "memo.mp3"
    data = sample(path, 5 * CHUNK + 3)
    urls = str(tmp_path / "urls.json")
    first = run_js(tus_js, live, file=str(path), chunkSize=CHUNK, urlStorage=urls,
                   abortAfterChunks=2)
    assert first["status"] == "aborted"
    again = run_js(tus_js, live, file=str(path), chunkSize=CHUNK, urlStorage=urls)
    assert again["status"] == "success" and again["url"] == first["url"]
    assert again["chunks"] == 6 - 2  # only what the server was missing
    assert again["blobHash"] == b3(data)
    assert stored(live, b3(data)) == data

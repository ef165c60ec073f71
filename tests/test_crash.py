"""kill -9 of a real server in the middle of work, then a restart on the same
data directory: what was acknowledged is there, byte for byte; nothing
half-done is left behind; the index and the blob tree agree.

Some kills are timed from the client (after so many answers), others from
what the server's tmp/ directory shows, to land inside a commit or a
deletion. The test only watches the directory; it never reaches into the
server.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

import aiohttp
import blake3
import pytest

from serverproc import BlobdServer, blobd_env, http

PIECE = 64 << 10
TIMEOUT = aiohttp.ClientTimeout(total=60)
STAGED = re.compile(r"put-[0-9a-f]{64}-")
TRASH = re.compile(r"del-[0-9a-f]{64}-")
Watch = Callable[[Path, list[str]], bool]


def linked(tmp: Path, names: list[str]) -> bool:
    """A verified body, renamed after its digest, already has its second
    name under blobs/: the index transaction is on its way to COMMIT."""
    for name in names:
        if STAGED.match(name):
            try:
                if os.stat(tmp / name).st_nlink >= 2:
                    return True
            except FileNotFoundError:
                continue
    return False


def trashed(tmp: Path, names: list[str]) -> bool:
    """A blob was moved out of its place inside a delete transaction. The
    entry lives well under a millisecond, so the kill lands before the
    COMMIT only some of the time; after it, the rest of the time."""
    return any(TRASH.match(name) for name in names)


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Killer:
    """Sends the server SIGKILL once: now, or (once armed) from a thread
    polling tmp/ the moment ``watch`` says it shows what we wait for."""

    def __init__(self, server: BlobdServer, watch: Watch | None = None) -> None:
        self.pid = server.pid
        self.tmp = server.data_dir / "tmp"
        self.watch = watch
        self.fired = threading.Event()
        self.seen: list[str] = []  # tmp/ as the watcher saw it at the kill
        self._armed = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "Killer":
        if self.watch is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._armed.set()  # wake a watcher that was never armed, to end it
        if self._thread.is_alive():
            self._thread.join()

    def trigger(self) -> None:
        """The client-side moment has come: kill now, or arm the watcher."""
        if self.watch is None:
            self.kill()
        else:
            self._armed.set()

    def kill(self) -> None:
        with self._lock:
            if not self.fired.is_set():
                os.kill(self.pid, signal.SIGKILL)
                self.fired.set()

    def _watch(self) -> None:
        self._armed.wait()
        while not self._done.is_set() and not self.fired.is_set():
            names = os.listdir(self.tmp)
            if self.watch(self.tmp, names):  # type: ignore[misc]
                self.kill()
                self.seen = names
                return
            self._done.wait(0.0005)


# -- what the store must look like after any crash ------------------------------

def check_tmp_empty(server: BlobdServer) -> None:
    """Start-up recovery has left nothing in tmp/ (checked while serving)."""
    leftovers = sorted(p.name for p in (server.data_dir / "tmp").iterdir())
    assert leftovers == [], f"tmp/ not cleaned at start-up: {leftovers}"


def check_index_matches_files(data_dir: Path) -> dict[str, int]:
    """With the server stopped: every blob file has its row and every row
    its file, files hash to their names, and each refcount is the number of
    references. Returns {hash: refcount}."""
    files = {}
    for path in (data_dir / "blobs").rglob("*"):
        if path.is_file():
            rel = path.relative_to(data_dir / "blobs").parts
            assert rel == (path.name[:2], path.name[2:4], path.name), f"misplaced {path}"
            files[path.name] = path
    with sqlite3.connect(data_dir / "index.sqlite3") as db:
        rows = dict(db.execute("SELECT hash, refcount FROM blobs").fetchall())
        sizes = dict(db.execute("SELECT hash, size FROM blobs").fetchall())
        refs = Counter(h for (h,) in db.execute("SELECT hash FROM refs"))
    assert sorted(files) == sorted(rows), (
        f"files without a row: {sorted(set(files) - set(rows))}; "
        f"rows without a file: {sorted(set(rows) - set(files))}")
    for digest, path in files.items():
        data = path.read_bytes()
        assert len(data) == sizes[digest] and b3(data) == digest, f"damaged {path}"
    assert set(refs) <= set(rows), f"references to no blob: {set(refs) - set(rows)}"
    wrong = {h: (n, refs[h]) for h, n in rows.items() if n != refs[h]}
    assert not wrong, f"refcount != references (refcount, refs): {wrong}"
    # With the default grace period of 0 a blob at zero references is gone.
    assert all(n > 0 for n in rows.values()), rows
    return rows


async def fetch(http: aiohttp.ClientSession, url: str, token: str) -> tuple[int, bytes]:
    async with http.get(url, headers=auth(token)) as resp:
        return resp.status, await resp.read()


# -- kill -9 during concurrent uploads -----------------------------------------

@dataclass
class Upload:
    index: int
    body: bytes
    token: str
    seconds: float               # how long sending the body takes
    ref: str | None = None
    sent: int = 0
    status: int | None = None    # the response, if one arrived

    @property
    def digest(self) -> str:
        return b3(self.body)

    @property
    def mid_body(self) -> bool:
        return 0 < self.sent < len(self.body)


def plan_uploads(alice: str, bob: str) -> list[Upload]:
    rng = random.Random(20240611)
    uploads = []
    for i in range(20):
        body = rng.randbytes(rng.randint(1 << 20, 4 << 20))
        uploads.append(Upload(i, body, alice, seconds=0.4 + 0.13 * ((i * 7) % 20),
                              ref=f"take-{i}" if i % 3 == 0 else None))
    # The same content again, from another owner: answered 200 or 201
    # depending on which commits first, and a blob with two references.
    for i, source in ((16, 2), (17, 5), (18, 9)):
        uploads[i].body, uploads[i].token = uploads[source].body, bob
    return uploads


async def send(http: aiohttp.ClientSession, url: str, up: Upload,
               changed: Callable[[], None]) -> None:
    async def body() -> AsyncIterator[bytes]:
        pause = up.seconds / (len(up.body) / PIECE)
        for start in range(0, len(up.body), PIECE):
            yield up.body[start:start + PIECE]
            up.sent = min(start + PIECE, len(up.body))
            changed()
            await asyncio.sleep(pause)

    headers = auth(up.token)
    if up.ref:
        headers["Blob-Ref"] = up.ref
    if up.index % 2:
        headers["Content-Length"] = str(len(up.body))  # the others go chunked
    async with http.put(f"{url}/blobs/{up.digest}", data=body(), headers=headers) as resp:
        await resp.read()
        up.status = resp.status
        changed()


def answered(ups: list[Upload]) -> int:
    return sum(u.status is not None for u in ups)


# When to pull the plug: a condition on the uploads, and what tmp/ must
# then show (None: kill as soon as the condition holds).
MOMENTS: dict[str, tuple[Callable[[list[Upload]], bool], Watch | None]] = {
    # Nothing answered yet: every upload is somewhere in its body.
    "mid-body": (lambda ups: sum(u.sent >= len(u.body) // 3 for u in ups) >= 3, None),
    # A verified body is linked into place, its transaction not yet done.
    "commit": (lambda ups: answered(ups) >= 2, linked),
    # Many answered, the rest still arriving.
    "after-acks": (lambda ups: answered(ups) >= 10, None),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
async def test_kill9_during_uploads_loses_nothing_acknowledged(tmp_path: Path,
                                                               moment: str) -> None:
    condition, watch = MOMENTS[moment]
    with BlobdServer(tmp_path) as server:
        alice, bob = server.token("alice"), server.token("bob")
        uploads = plan_uploads(alice, bob)
        with Killer(server, watch) as killer:
            def changed() -> None:
                if condition(uploads):
                    killer.trigger()

            async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
                results = await asyncio.gather(
                    *(send(http, server.url, up, changed) for up in uploads),
                    return_exceptions=True)
        assert killer.fired.is_set(), (f"the {moment!r} moment never came: "
                                       f"{results}\n{server.state()}")
        server.kill9()
        if watch is not None:
            assert any(STAGED.match(n) for n in killer.seen), killer.seen
        in_flight = [u.index for u in uploads if u.status is None]
        assert sum(u.mid_body for u in uploads) >= 2, in_flight
        for up, result in zip(uploads, results):
            assert up.status in (None, 200, 201), (up.index, up.status, result)
            assert (up.status is None) == isinstance(result, Exception), (up.index, result)
        acked = [u for u in uploads if u.status in (200, 201)]

        server.start()
        check_tmp_empty(server)
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            for up in uploads:
                status, data = await fetch(http, f"{server.url}/blobs/{up.digest}", alice)
                if up in acked:
                    assert status == 200, (up.index, status)
                if status == 200:  # acknowledged or not, never a partial blob
                    assert data == up.body and b3(data) == up.digest, up.index
                else:
                    assert status == 404, (up.index, status)
            for up in acked:
                if up.ref:
                    async with http.get(f"{server.url}/refs/{up.ref}",
                                        headers=auth(up.token)) as resp:
                        assert resp.status == 200, up.ref
                        assert (await resp.json())["hash"] == up.digest
        assert server.terminate() == 0, server.state()

    refcounts = check_index_matches_files(server.data_dir)
    for up in acked:
        assert up.digest in refcounts
    both = {u.digest for u in acked if u.token == bob} & {
        u.digest for u in acked if u.token == alice}
    for digest in both:
        assert refcounts[digest] >= 2


# -- kill -9 during a storm of deletions -----------------------------------------

# (answers before the kill, what tmp/ must show then)
STORM_MOMENTS: dict[str, tuple[int, Watch | None]] = {
    "after-acks": (20, None),
    "in-transaction": (0, trashed),
}


@pytest.mark.parametrize("moment", list(STORM_MOMENTS))
async def test_kill9_during_delete_storm_keeps_index_and_files_in_step(
        tmp_path: Path, moment: str) -> None:
    kill_after, watch = STORM_MOMENTS[moment]
    rng = random.Random(moment)
    bodies = [rng.randbytes(rng.randint(1 << 10, 256 << 10)) for _ in range(60)]
    shared = set(range(0, 60, 6))  # bob holds these too: they must survive
    with BlobdServer(tmp_path) as server:
        alice, bob = server.token("alice"), server.token("bob")
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            gate = asyncio.Semaphore(16)

            async def put(body: bytes, token: str) -> None:
                async with gate, http.put(f"{server.url}/blobs/{b3(body)}", data=body,
                                          headers=auth(token)) as resp:
                    assert resp.status in (200, 201), await resp.text()

            await asyncio.gather(*(put(b, alice) for b in bodies))
            await asyncio.gather(*(put(bodies[i], bob) for i in shared))

            deleted: set[int] = set()
            killer = Killer(server, watch)

            # A few at a time: with all 60 in flight, a busy machine could
            # read every answer before the kill (found flaky under load).
            storm = asyncio.Semaphore(8)

            async def delete(i: int) -> None:
                async with storm, http.delete(f"{server.url}/blobs/{b3(bodies[i])}",
                                              headers=auth(alice)) as resp:
                    assert resp.status == 204, await resp.text()
                    deleted.add(i)
                if len(deleted) >= kill_after:
                    killer.trigger()

            order = list(range(60))
            rng.shuffle(order)
            with killer:
                if kill_after == 0:
                    killer.trigger()
                results = await asyncio.gather(*(delete(i) for i in order),
                                               return_exceptions=True)
        assert killer.fired.is_set(), f"never killed: {results}\n{server.state()}"
        server.kill9()
        if watch is not None:
            assert any(TRASH.match(n) for n in killer.seen), killer.seen
        assert len(deleted) < 60, "every delete was answered before the kill"
        for i, result in zip(order, results):
            assert isinstance(result, aiohttp.ClientError) or i in deleted, (i, result)

        server.start()
        check_tmp_empty(server)
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            for i, body in enumerate(bodies):
                status, data = await fetch(http, f"{server.url}/blobs/{b3(body)}", bob)
                if i in shared:
                    assert status == 200, (i, status)  # bob still holds it
                elif i in deleted:
                    assert status == 404, (i, status)
                else:
                    assert status in (200, 404), (i, status)  # delete never answered
                if status == 200:
                    assert data == body, i
        assert server.terminate() == 0, server.state()

    refcounts = check_index_matches_files(server.data_dir)
    for i, body in enumerate(bodies):
        if i in shared:
            # Bob's reference is left; alice's went if her delete committed.
            expected = (1,) if i in deleted else (1, 2)
            assert refcounts.get(b3(body)) in expected, (i, refcounts.get(b3(body)))
        elif i in deleted:
            assert b3(body) not in refcounts, i
        else:
            assert refcounts.get(b3(body)) in (None, 1), i


# -- what a crash leaves of upload sessions ----------------------------------------

def test_session_leftovers_are_undone_at_start_and_by_fsck(tmp_path: Path) -> None:
    """A crash between an upload session's row and its file leaves one
    without the other (found by review: preallocated files of sessions
    never inserted stayed in uploads/ for ten minutes after the restart,
    charged to nobody, and fsck did not look there)."""
    with BlobdServer(tmp_path) as server:
        alice = server.token("alice")
        kept = json.loads(http("POST", f"{server.url}/uploads", alice,
                               json.dumps({"size": 5000}).encode())[1])
        lost = json.loads(http("POST", f"{server.url}/uploads", alice,
                               json.dumps({"size": 7000}).encode())[1])
        server.kill9()
        uploads = server.data_dir / "uploads"
        (uploads / lost["id"]).unlink()                     # its row, but no file
        (uploads / ("f" * 32)).write_bytes(b"\0" * 200_000)  # a file, but no row
        report = subprocess.run(
            [sys.executable, "-m", "blobd", "fsck", "-c", str(server.config_path)],
            capture_output=True, text=True, timeout=60, env=blobd_env())
        assert report.returncode == 1, report.stdout + report.stderr
        assert f"uploads/{'f' * 32}" in report.stdout and lost["id"] in report.stdout
        server.start()
        assert sorted(os.listdir(uploads)) == [kept["id"]]
        status, body = http("GET", f"{server.url}/uploads", alice)
        assert status == 200
        assert [s["id"] for s in json.loads(body)["uploads"]] == [kept["id"]]
        status, body = http("GET", f"{server.url}/quota", alice)
        assert json.loads(body)["reserved_bytes"] == 5000
        assert server.terminate() == 0, server.state()


def test_a_session_file_left_short_is_allocated_at_start(tmp_path: Path) -> None:
    """Found by the crash campaign: a session's row is written before its
    file is allocated (at creation, and when a tus PATCH sets a deferred
    length), so a kill -9 between the two left a file shorter than the
    known length: its disk room was never taken, and a full disk showed
    only at a later PATCH rather than "now". The state is made here as
    that kill leaves it."""
    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        alice = server.token("alice")
        native = json.loads(http("POST", f"{server.url}/uploads", alice,
                                 json.dumps({"size": 300_000}).encode())[1])
        tus = {"Tus-Resumable": "1.0.0", "Authorization": f"Bearer {alice}"}
        req = urllib_request(f"{server.url}/tus/", "POST",
                             {**tus, "Upload-Defer-Length": "1", "Content-Length": "0"})
        deferred = req.headers["Location"].rstrip("/").rsplit("/", 1)[1]
        urllib_request(f"{server.url}/tus/{deferred}", "PATCH", {
            **tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
            b"a" * 1000)
        urllib_request(f"{server.url}/tus/{deferred}", "PATCH", {
            **tus, "Upload-Offset": "1000", "Upload-Length": "200000",
            "Content-Type": "application/offset+octet-stream"})
        server.kill9()
        uploads = server.data_dir / "uploads"
        os.truncate(uploads / native["id"], 0)
        os.truncate(uploads / deferred, 1000)
        server.start()
        for name, size in ((native["id"], 300_000), (deferred, 200_000)):
            st = (uploads / name).stat()
            assert (st.st_size, st.st_blocks * 512 >= size) == (size, True), name
        assert (uploads / deferred).read_bytes()[:1000] == b"a" * 1000
        data = b"a" * 1000 + os.urandom(199_000)
        done = urllib_request(f"{server.url}/tus/{deferred}", "PATCH", {
            **tus, "Upload-Offset": "1000",
            "Content-Type": "application/offset+octet-stream"}, data[1000:])
        assert done.headers["Blob-Hash"] == b3(data)


def test_kill9_during_a_deferred_length_patch_gives_its_room_back(tmp_path: Path) -> None:
    """Found by review: a deferred-length tus PATCH reserves (and allocates)
    the room its Content-Length declares before reading; killed mid-body,
    the reservation and the allocated file outlived the restart, holding
    the owner's quota and the disk until the upload expired."""
    config = {"storage": {"fsync": False, "min_free_bytes": "1MiB"},
              "quotas": {"default": {"max_bytes": "200MiB"}}}
    with BlobdServer(tmp_path, config) as server:
        token = server.token("alice")
        tus = {"Tus-Resumable": "1.0.0", "Authorization": f"Bearer {token}"}
        req = urllib_request(f"{server.url}/tus/", "POST",
                             {**tus, "Upload-Defer-Length": "1", "Content-Length": "0"})
        path = "/tus/" + req.headers["Location"].rstrip("/").rsplit("/", 1)[1]
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall((f"PATCH {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                      "Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
                      "Content-Type: application/offset+octet-stream\r\n"
                      f"Content-Length: {150 << 20}\r\n\r\n").encode() + b"x" * (1 << 20))
        deadline = time.monotonic() + 10
        while json.loads(http("GET", f"{server.url}/quota", token)[1])["reserved_bytes"] == 0:
            assert time.monotonic() < deadline, "the PATCH never reserved its room"
            time.sleep(0.05)
        server.kill9()
        sock.close()
        server.start()
        quota = json.loads(http("GET", f"{server.url}/quota", token)[1])
        upload = next((server.data_dir / "uploads").iterdir())
        assert quota["reserved_bytes"] == 0, quota   # its offset: nothing recorded
        assert upload.stat().st_size == 0 and upload.stat().st_blocks == 0
        assert "gave back the room 1 deferred-length uploads" in server.stderr_tail()
        # And the upload goes on from its offset.
        done = urllib_request(f"{server.url}{path}", "PATCH", {
            **tus, "Upload-Offset": "0", "Upload-Length": "5",
            "Content-Type": "application/offset+octet-stream"}, b"hello")
        assert done.status == 204 and done.headers["Upload-Offset"] == "5"


def urllib_request(url: str, method: str, headers: dict[str, str], data: bytes = b""):
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        resp.read()
        return resp

"""``[server] workers = 2``: two server processes on one port, one index.

Real ``blobd serve`` processes (see serverproc.py). What one process
guarantees must hold between two: a PUT racing the DELETE of the last
reference, quota checks under concurrent uploads, and ``kill -9`` of a
worker (the supervisor replaces it; what was acknowledged is intact; what it
left half-done is undone, with its sibling still serving).

Requests go out on fresh connections, which the kernel spreads over the
workers' sockets; each test checks that both workers did work.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import aiohttp
import blake3
import pytest

from blobd.layout import Layout, tmp_pid
from mirrorhelp import mirror_section, unique_prefix
from serverproc import (BlobdServer, blobd_env, children, free_port, http, owns_listener,
                        port_is_free, run_blobd, to_toml, wait_until)
from test_crash import check_index_matches_files

TIMEOUT = aiohttp.ClientTimeout(total=60)
BACKGROUND = re.compile(r"worker (\d+) \(pid (\d+)\) started, running the background work")


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(what: str, check, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    wait_until(check, what, timeout)


def wait_replaced(server: BlobdServer, dead: int) -> list[int]:
    """Until the supervisor has a new second worker serving in place of ``dead``."""
    def replaced() -> bool:
        pids = server.workers()
        return (len(pids) == 2 and dead not in pids
                and all(owns_listener(pid, server.port) for pid in pids))
    try:
        wait_for(f"worker {dead} to be replaced", replaced)
    except AssertionError as exc:
        # What the supervisor said is what tells a slow machine from a bug.
        raise AssertionError(f"{exc}; workers now {server.workers()}, listening"
                             f" {[p for p in server.workers() if owns_listener(p, server.port)]};"
                             f" {server.state()}") from None
    return server.workers()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[BlobdServer]:
    with BlobdServer(tmp_path, {"server": {"workers": 2},
                                "storage": {"fsync": False}}) as server:
        yield server


def test_start_up_says_where_it_serves_once(pair: BlobdServer) -> None:
    """Found by review: four lines (each worker's, the supervisor's log line
    and a bare print of it), where a lone server has one."""
    def said() -> list[str]:
        text = pair.stdout_path.read_text() + pair.stderr_tail(200)
        return [line for line in text.splitlines() if " serving " in line]

    wait_for("the supervisor's line", lambda: any("workers" in line for line in said()))
    time.sleep(0.5)  # a worker's own line would be out by now
    assert len(said()) == 1, said()
    assert f"on {pair.url} with 2 workers (pids " in said()[0]


def test_two_workers_share_the_port_and_one_data_dir_lock(pair: BlobdServer) -> None:
    workers = pair.workers()
    assert len(workers) == 2
    assert all(owns_listener(pid, pair.port) for pid in workers)
    assert not owns_listener(pair.pid, pair.port)  # the supervisor only holds the port
    assert http("GET", f"{pair.url}/healthz")[0] == 200
    # Exactly one of them runs the background work.
    assert len(BACKGROUND.findall(pair.stderr_tail(200))) == 1
    # The supervisor holds the data dir: another server on it stops at once.
    other = run_blobd("serve", "-c", str(pair.config_path), "--port", str(free_port()),
                      timeout=60)
    assert other.returncode != 0
    assert "another blobd is serving" in other.stderr


@pytest.mark.parametrize("first, second", [(2, 2), (1, 2), (2, 1)])
def test_a_second_server_on_the_port_fails_to_start_whatever_its_workers(
        tmp_path: Path, first: int, second: int) -> None:
    """Another data dir, the same port: the workers' SO_REUSEPORT must not
    let the second join the first and take half of its connections."""
    with BlobdServer(tmp_path / "first", {"server": {"workers": first}}) as server:
        config = tmp_path / "second.toml"
        config.write_text(to_toml({"server": {
            "host": "127.0.0.1", "port": server.port, "workers": second,
            "data_dir": str(tmp_path / "second")}}))
        other = subprocess.Popen([sys.executable, "-m", "blobd", "serve", "-c", str(config)],
                                 env=blobd_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            _, err = other.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            other.terminate()  # its supervisor stops its workers
            _, err = other.communicate()
            pytest.fail(f"the second server started:\n{err[-2000:]}")
        assert other.returncode == 1
        assert err.strip() == (f"blobd: error: cannot listen on http://127.0.0.1:"
                               f"{server.port}: address already in use")
        assert http("GET", f"{server.url}/healthz")[0] == 200


async def _race_once(http_: aiohttp.ClientSession, url: str, alice: str, bob: str,
                     data: bytes, expect: bool) -> None:
    digest = b3(data)
    async with http_.put(f"{url}/blobs/{digest}", data=data, headers=auth(bob)) as resp:
        assert resp.status == 201
    put, delete = await asyncio.gather(
        http_.put(f"{url}/blobs/{digest}", data=data, headers=auth(alice),
                  expect100=expect),
        http_.delete(f"{url}/blobs/{digest}", headers=auth(bob)))
    put.release()
    delete.release()
    assert delete.status == 204
    assert put.status in (200, 201)
    # Alice was answered 200/201: she holds a reference, so the blob exists,
    # whichever worker answers next.
    async with http_.get(f"{url}/blobs/{digest}", headers=auth(alice)) as get:
        assert get.status == 200, f"PUT said {put.status} but GET says {get.status}"
        assert await get.read() == data
    async with http_.get(f"{url}/blobs/{digest}/meta", headers=auth(alice)) as meta:
        assert (await meta.json())["refcount"] == 1
    async with http_.delete(f"{url}/blobs/{digest}", headers=auth(alice)) as gone:
        assert gone.status == 204


async def test_put_racing_delete_of_the_last_reference_across_workers(
        pair: BlobdServer) -> None:
    alice, bob = pair.token("alice"), pair.token("bob")
    before = {pid: cpu_ticks(pid) for pid in pair.workers()}
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        for i in range(200):
            await _race_once(session, pair.url, alice, bob, os.urandom(2000 + i),
                             expect=bool(i % 2))
        datas = [os.urandom(3000) for _ in range(100)]
        await asyncio.gather(*(_race_once(session, pair.url, alice, bob, d, expect=True)
                               for d in datas))
    assert all(cpu_ticks(pid) > ticks for pid, ticks in before.items()), "one worker idle"
    assert pair.terminate() == 0
    assert check_index_matches_files(pair.data_dir) == {}


def _usage(data_dir: Path, owner: str) -> tuple[int, int, int, int]:
    """(used_blobs, used_bytes, holdings, bytes of the holdings) from the index."""
    with sqlite3.connect(data_dir / "index.sqlite3") as db:
        used_blobs, used_bytes = db.execute(
            "SELECT used_blobs, used_bytes FROM owners WHERE owner = ?", (owner,)).fetchone()
        held, held_bytes = db.execute(
            "SELECT count(*), coalesce(sum(b.size), 0) FROM holdings h"
            " JOIN blobs b ON b.hash = h.hash WHERE h.owner = ?", (owner,)).fetchone()
    return used_blobs, used_bytes, held, held_bytes


async def _upload_many(url: str, token: str, bodies: list[bytes]) -> list[int]:
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        async def one(i: int, body: bytes) -> int:
            # Half announce their size and wait for 100 Continue: those are
            # checked before their bodies are read, the rest at commit.
            async with session.post(f"{url}/blobs", data=body, headers=auth(token),
                                    expect100=bool(i % 2)) as resp:
                if resp.status != 201:
                    assert (await resp.json())["error"] == "quota_exceeded"
                return resp.status
        return await asyncio.gather(*(one(i, body) for i, body in enumerate(bodies)))


async def test_concurrent_uploads_never_pass_a_quota_across_workers(tmp_path: Path) -> None:
    quotas = {"default": {"max_blobs": 10},
              "bob": {"max_blobs": 1000, "max_bytes": 100_000}}
    with BlobdServer(tmp_path, {"server": {"workers": 2}, "quotas": quotas}) as server:
        alice, bob = server.token("alice"), server.token("bob")
        before = {pid: cpu_ticks(pid) for pid in server.workers()}
        by_count = await _upload_many(server.url, alice,
                                      [os.urandom(1000) for _ in range(40)])
        by_bytes = await _upload_many(server.url, bob,
                                      [os.urandom(9000) for _ in range(40)])
        assert all(cpu_ticks(pid) > ticks for pid, ticks in before.items()), "one worker idle"
        assert server.terminate() == 0
    assert by_count.count(201) == 10, by_count
    assert by_bytes.count(201) == 100_000 // 9000, by_bytes
    assert _usage(server.data_dir, "alice") == (10, 10_000, 10, 10_000)
    assert _usage(server.data_dir, "bob") == (11, 99_000, 11, 99_000)
    check_index_matches_files(server.data_dir)


async def test_concurrent_new_names_never_pass_max_refs_across_workers(
        tmp_path: Path) -> None:
    config = {"server": {"workers": 2}, "storage": {"fsync": False},
              "quotas": {"default": {"max_refs": 10}}}
    with BlobdServer(tmp_path, config) as server:
        alice = server.token("alice")
        held = os.urandom(1000)
        before = {pid: cpu_ticks(pid) for pid in server.workers()}
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
            async with session.put(f"{server.url}/blobs/{b3(held)}", data=held,
                                   headers=auth(alice)) as resp:
                assert resp.status == 201

            async def name(i: int) -> int:
                async with session.put(f"{server.url}/refs/n{i}", json={"hash": b3(held)},
                                       headers=auth(alice)) as resp:
                    return resp.status
            # New names for a held blob and new blobs (each a new name), at once.
            by_name, by_blob = await asyncio.gather(
                asyncio.gather(*(name(i) for i in range(30))),
                _upload_many(server.url, alice, [os.urandom(500) for _ in range(30)]))
        assert all(cpu_ticks(pid) > ticks for pid, ticks in before.items()), "one worker idle"
        assert server.terminate() == 0
    statuses = [*by_name, *by_blob]
    assert statuses.count(200) + statuses.count(201) == 9, statuses
    assert statuses.count(507) == 51, statuses
    with sqlite3.connect(server.data_dir / "index.sqlite3") as db:
        assert db.execute("SELECT used_refs FROM owners WHERE owner = 'alice'").fetchone() == (10,)
        assert db.execute("SELECT count(*) FROM refs").fetchone() == (10,)
        assert db.execute("SELECT count(*) FROM blobs").fetchone() == (1 + by_blob.count(201),)
    check_index_matches_files(server.data_dir)


def _stalled_upload(server: BlobdServer, token: str, sent: int, size: int) -> socket.socket:
    """A POST that announces ``size`` bytes, sends ``sent`` of them, and waits."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST /blobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}"
                 f"\r\nContent-Length: {size}\r\n\r\n".encode())
    sock.sendall(os.urandom(sent))
    return sock


def test_kill9_of_a_worker_mid_upload(tmp_path: Path) -> None:
    with BlobdServer(tmp_path, {"server": {"workers": 2}}) as server:
        token = server.token()
        acked = {}
        for i in range(20):
            data = os.urandom(50_000 + i)
            status, _ = http("POST", f"{server.url}/blobs", token, data)
            assert status == 201
            acked[b3(data)] = data
        tmp = server.data_dir / "tmp"
        upload = _stalled_upload(server, token, sent=3 << 20, size=8 << 20)
        wait_for("the upload's temp file", lambda: any(
            name.startswith("put-new-") for name in os.listdir(tmp)))
        (name,) = [n for n in os.listdir(tmp) if n.startswith("put-new-")]
        victim = tmp_pid(name)
        assert victim in server.workers()

        os.kill(victim, signal.SIGKILL)
        upload.settimeout(10)
        try:  # the connection died with its worker: closed, or reset
            assert upload.recv(100) == b""
        except ConnectionResetError:
            pass
        upload.close()
        wait_replaced(server, victim)
        # What the dead worker left in tmp/ was undone before its
        # replacement started, with the other worker serving all along.
        assert os.listdir(tmp) == []
        assert "undid 1 temp files worker" in server.stderr_tail(200)
        for digest, data in acked.items():
            assert http("GET", f"{server.url}/blobs/{digest}", token) == (200, data)
        fresh = os.urandom(70_000)
        assert http("POST", f"{server.url}/blobs", token, fresh)[0] == 201
        assert server.terminate() == 0
    check_index_matches_files(server.data_dir)


def test_kill9_of_a_worker_inside_a_commit(tmp_path: Path) -> None:
    """The kill lands between the link into blobs/ and the COMMIT (a staged
    temp file with a second name): the replacement starts only once the
    link is undone, and the index and the blob tree agree."""
    with BlobdServer(tmp_path, {"server": {"workers": 2}}) as server:
        token = server.token()
        tmp = server.data_dir / "tmp"
        killed: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set() and not killed:
                for name in os.listdir(tmp):
                    if name.startswith("put-") and not name.startswith("put-new-"):
                        try:
                            linked = os.stat(tmp / name).st_nlink >= 2
                        except FileNotFoundError:
                            continue
                        pid = tmp_pid(name)
                        if linked and pid in server.workers():
                            os.kill(pid, signal.SIGKILL)
                            killed.append(pid)
                            return
                time.sleep(0.0002)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        acked: dict[str, bytes] = {}

        def client() -> None:
            while not stop.is_set():
                data = os.urandom(200_000)
                try:
                    status, _ = http("POST", f"{server.url}/blobs", token, data)
                except OSError:
                    continue  # its worker was killed
                if status == 201:
                    acked[b3(data)] = data

        clients = [threading.Thread(target=client, daemon=True) for _ in range(8)]
        for thread in clients:
            thread.start()
        wait_for("a kill inside a commit", lambda: bool(killed), timeout=60)
        stop.set()
        for thread in [watcher, *clients]:
            thread.join()
        wait_replaced(server, killed[0])
        assert re.search(r"undid \d+ temp files worker \d left behind", server.stderr_tail(200))
        for digest, data in acked.items():
            assert http("GET", f"{server.url}/blobs/{digest}", token) == (200, data)
        assert server.terminate() == 0
    rows = check_index_matches_files(server.data_dir)
    assert set(acked) <= set(rows)
    assert not any(name.startswith("put-") for name in os.listdir(tmp))


def test_background_work_moves_with_worker_zero(tmp_path: Path) -> None:
    config = {"server": {"workers": 2},
              "gc": {"grace_seconds": 1, "sweep_interval_seconds": 1}}
    with BlobdServer(tmp_path, config) as server:
        token = server.token()
        (first,) = BACKGROUND.findall(server.stderr_tail(200))
        background = int(first[1])
        os.kill(background, signal.SIGKILL)
        wait_replaced(server, background)
        wait_for("a new background worker", lambda: len(
            BACKGROUND.findall(server.stderr_tail(200))) == 2)
        (_, second) = BACKGROUND.findall(server.stderr_tail(200))
        assert second[0] == "0" and int(second[1]) in server.workers()
        # ...and it works: a blob at zero references goes after its grace.
        data = os.urandom(5000)
        assert http("POST", f"{server.url}/blobs", token, data)[0] == 201
        assert http("DELETE", f"{server.url}/blobs/{b3(data)}", token)[0] == 204
        path = server.data_dir / "blobs" / b3(data)[:2] / b3(data)[2:4] / b3(data)
        wait_for("the sweeper", lambda: not path.exists(), timeout=20)



def test_uploads_to_either_worker_are_mirrored_at_once(tmp_path: Path, s3server) -> None:
    """Found by review: only worker 0 runs the mirror worker, and an upload
    committed by worker 1 waited for its 5 s poll (the wake-up was per
    process): 4.7 to 5 s from the 201 to mirror state done for half of them."""
    mirror = mirror_section(s3server, unique_prefix(), backup_interval_seconds=0)
    with BlobdServer(tmp_path, {"server": {"workers": 2}, "storage": {"fsync": False},
                                "mirror": mirror}) as server:
        token = server.token()
        before = {pid: cpu_ticks(pid) for pid in server.workers()}
        took = []
        for _ in range(12):  # each on a new connection: the kernel spreads them
            status, body = http("POST", f"{server.url}/blobs", token, os.urandom(4000))
            assert status == 201, body
            created = time.monotonic()
            digest = json.loads(body)["hash"]

            def done() -> bool:
                _, meta = http("GET", f"{server.url}/blobs/{digest}/meta", token)
                return json.loads(meta)["mirror"]["state"] == "done"
            wait_for(f"{digest} mirrored", done, timeout=10)
            took.append(time.monotonic() - created)
        assert all(cpu_ticks(pid) > ticks for pid, ticks in before.items()), "one worker idle"
        assert max(took) < 2, [f"{t:.2f}" for t in took]


def test_sigterm_stops_every_worker(pair: BlobdServer) -> None:
    workers = pair.workers()
    assert pair.terminate() == 0
    assert not any(alive(pid) for pid in workers)
    assert "all workers stopped" in pair.stderr_tail()


def test_tmp_names_carry_the_process_id() -> None:
    assert tmp_pid(f"put-new-{os.getpid()}.0a1b2c") == os.getpid()
    assert tmp_pid("del-" + "a" * 64 + "-42.ffff") == 42
    assert tmp_pid("put-new-0a1b2c3d4e5f6a7b") is None  # an older name
    assert tmp_pid("junk") is None
    # Index snapshots for the mirror too: a dead worker 0's is cleaned up.
    backup = Layout(Path("/x")).backup_temp_path().name
    assert tmp_pid(backup) == os.getpid() and backup.startswith("backup-")


def test_socket_activation_every_worker_serves_on_the_passed_socket(tmp_path: Path) -> None:
    """Under systemd socket activation (blobd.socket) the workers serve on
    the socket systemd passed -- a replaced worker too -- and nothing binds
    [server] port."""
    activated, configured = free_port(), free_port()
    config_path = tmp_path / "blobd.toml"
    config_path.write_text(to_toml({"server": {"port": configured, "workers": 2,
                                               "data_dir": str(tmp_path / "data")},
                                    "storage": {"fsync": False}}))
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", f"127.0.0.1:{activated}",
             sys.executable, "-m", "blobd", "serve", "-c", str(config_path)],
            env=blobd_env(), stdout=stdout, stderr=stderr)
    url = f"http://127.0.0.1:{activated}/healthz"

    def serving(dead: int | None = None) -> bool:
        # systemd-socket-activate starts blobd at the first connection.
        if not _answers(url):
            return False
        pids = children(proc.pid)
        return (len(pids) == 2 and dead not in pids
                and all(owns_listener(pid, activated) for pid in pids))
    def started() -> bool:
        # Under socket activation a worker owns the listener from its fork,
        # before it tells the supervisor it serves; one killed before that
        # is a failed start (the server exits), not a worker to replace.
        return serving() and "with 2 workers" in err.read_text()
    try:
        wait_for("the activated workers", started)
        assert port_is_free(configured)
        assert not owns_listener(proc.pid, configured)
        victim = max(children(proc.pid))
        os.kill(victim, signal.SIGKILL)
        wait_for(f"worker {victim} to be replaced", lambda: serving(dead=victim))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert f"on http://127.0.0.1:{activated} with 2 workers" in err.read_text(), \
            err.read_text()[-2000:]
    finally:
        # The workers run in a process group of their own: kill -9 of the
        # supervisor alone would leave them serving.
        for pid in children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def _answers(url: str) -> bool:
    try:
        return http("GET", url, timeout=2)[0] == 200
    except OSError:
        return False


def test_a_second_copy_of_a_chunk_never_writes_over_the_first_across_workers(
        pair: BlobdServer) -> None:
    """A client retries a chunk while its first copy, damaged on the way,
    is still coming in, and the retry lands on either worker. The copy in
    flight holds the chunk's byte range; the retry asks it to let go (a
    lock on a byte past the data, seen across processes), so the damaged
    copy stops (409, nothing of it kept) before the retry writes a byte,
    and the blob is the good bytes."""
    token = pair.token("alice")
    size = 1 << 20
    before = {pid: cpu_ticks(pid) for pid in pair.workers()}
    for _ in range(6):
        good, bad = os.urandom(size), os.urandom(size)
        status, body = http("POST", f"{pair.url}/uploads", token,
                            json.dumps({"size": size, "chunk_size": size}).encode())
        assert status == 201
        chunk = f"/uploads/{json.loads(body)['id']}/0"
        md5 = base64.b64encode(hashlib.md5(good).digest()).decode()
        damaged = socket.create_connection(("127.0.0.1", pair.port))
        try:
            head = (f"PUT {chunk} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
                    f"Content-Length: {size}\r\nContent-MD5: {md5}\r\n\r\n")
            damaged.sendall(head.encode() + bad[:100_000])
            time.sleep(0.3)
            assert _put_chunk(pair.url + chunk, token, good, md5) == 204
            damaged.settimeout(10)
            answer = damaged.recv(4096)
            assert answer.startswith(b"HTTP/1.1 409") and b"took it over" in answer, answer
        finally:
            damaged.close()
        status, body = http("POST", f"{pair.url}{chunk.rsplit('/', 1)[0]}/complete", token)
        assert status == 201 and json.loads(body)["hash"] == b3(good)
    assert all(cpu_ticks(pid) > ticks for pid, ticks in before.items())


def _put_chunk(url: str, token: str, data: bytes, md5: str) -> int:
    request = urllib.request.Request(url, data=data, method="PUT", headers={
        **auth(token), "Content-MD5": md5})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_kill9_of_the_supervisor_stops_its_workers(tmp_path: Path) -> None:
    """Outside systemd nothing else would stop them: orphaned workers would
    serve on unsupervised and hold the data dir against a restart."""
    with BlobdServer(tmp_path, {"server": {"workers": 2, "shutdown_timeout_seconds": 5},
                                "storage": {"fsync": False}}) as server:
        workers = server.workers()
        assert len(workers) == 2
        server.kill9()
        wait_for("the orphaned workers to stop", lambda: not any(map(alive, workers)))
        server.start()
        assert http("GET", f"{server.url}/healthz")[0] == 200
        assert len(server.workers()) == 2


def test_metrics_add_up_the_workers(tmp_path: Path) -> None:
    """A scrape lands on one worker. Each used to answer with its own
    request counters, so from one scrape to the next they jumped between
    the two workers' figures and never added up."""
    config = {"storage": {"fsync": False}, "server": {"workers": 2},
              "auth": {"anonymous_metrics": True}}
    def healthz_count() -> float:
        _, body = http("GET", f"{server.url}/metrics")
        match = re.search(r'^blobd_http_requests_total\{[^}]*route="/healthz"[^}]*'
                          r'status="200"[^}]*\} (\S+)$', body.decode(), re.M)
        assert match, body.decode()[:2000]
        return float(match.group(1))

    # Left by a supervisor killed with -9: wiped under the data dir's lock.
    stale = tmp_path / "data" / "metrics"
    stale.mkdir(parents=True)
    (stale / "counter_99999999.db").write_bytes(b"left over")
    with BlobdServer(tmp_path, config) as server:
        assert not (stale / "counter_99999999.db").exists()
        before = healthz_count()   # its start-up check's, on either worker
        pids = set()
        for _ in range(40):   # fresh connections: both workers answer some
            status, _ = http("GET", f"{server.url}/healthz")
            assert status == 200
        for pid in children(server.proc.pid):
            pids.add(pid)
        seen = [healthz_count() for _ in range(8)]
        assert seen == [before + 40] * 8, (before, seen)
        assert len(pids) == 2
        # A worker killed and replaced: what it counted is still counted.
        os.kill(max(pids), signal.SIGKILL)
        wait_replaced(server, max(pids))
        assert all(healthz_count() >= before + 40 for _ in range(4))
        server.terminate()
    assert not stale.exists()


def test_a_worker_killed_between_a_session_commit_and_its_file_removal(
        pair: BlobdServer) -> None:
    """Completing a session commits the blob (the session's file linked
    into blobs/), then removes the file from uploads/. A worker killed in
    between left it there while its siblings served on: a second name of
    the blob's bytes that kept them on disk after the blob's deletion, until
    the next restart; a completion sent again answered from the record and
    left it too. The kill's state is made by linking the file back (found
    by tests/stress/crash_torture.py)."""
    token = pair.token("alice")
    data = os.urandom(100_000)
    uploads = pair.data_dir / "uploads"

    def committed_session() -> tuple[str, Path]:
        status, body = http("POST", f"{pair.url}/uploads", token,
                            json.dumps({"size": len(data), "chunk_size": len(data)}).encode())
        assert status == 201
        sid = json.loads(body)["id"]
        assert http("PUT", f"{pair.url}/uploads/{sid}/0", token, data)[0] == 204
        status, _ = http("POST", f"{pair.url}/uploads/{sid}/complete", token)
        assert status in (200, 201) and os.listdir(uploads) == []
        blob = pair.data_dir / "blobs" / b3(data)[:2] / b3(data)[2:4] / b3(data)
        os.link(blob, uploads / sid)
        return sid, blob

    sid, _ = committed_session()
    assert http("POST", f"{pair.url}/uploads/{sid}/complete", token)[0] == 200
    assert os.listdir(uploads) == []

    sid, _ = committed_session()
    victim = pair.workers()[1]
    os.kill(victim, signal.SIGKILL)
    wait_replaced(pair, victim)
    assert os.listdir(uploads) == []
    # Said as what it was (found by review: "undid 1 temp files", of a
    # session's file in uploads/).
    assert "removed 1 committed upload sessions' files from uploads/" in pair.stderr_tail(200)
    assert http("DELETE", f"{pair.url}/blobs/{b3(data)}", token)[0] == 204
    assert pair.terminate() == 0
    check_index_matches_files(pair.data_dir)

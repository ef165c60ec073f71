"""kill -9 at random moments of mixed load, then check the store restarts clean.

Not part of the test suite (pytest does not collect it); run it by hand from
the repository root, for as long as you like:

    /work/venv/bin/python tests/stress/crash_torture.py --cycles 60 --mirror-cycles 30

A real ``blobd serve`` with ``[server] workers = 2`` and fsync on runs on a
data dir under ``--workdir`` (default: a new dir in /tmp). Six owners (two
with small quotas, so 507s happen) each run one client doing PUT by hash,
POST, DELETE, named refs, native sessions, tus uploads (deferred length too)
and Range GETs, small and few-MB bodies, shared bodies uploaded by several
owners at once. At a random moment 0.02-2 s into the load one of three
kills comes:

* ``all``: SIGKILL to the supervisor and both workers at once;
* ``worker``: SIGKILL to one worker; the load goes on while it is replaced;
* ``supervisor``: SIGKILL to the supervisor alone (its workers drain and
  stop; the restart is retried until it gets the data dir, and the wait
  is reported).

Each client keeps a model of what was acknowledged and what was in flight.
After each kill the server is (re)started and, with no load: ``blobd fsck``
finds nothing; every name holds what the model allows (an acknowledged
value, or one that was in flight); no stray name; every referenced blob
serves its exact bytes and no unreferenced one is left; ``/quota`` of each
owner adds up; tmp/ is empty and uploads/ holds exactly the open sessions'
files; acknowledged session chunks and tus offsets survive, and the
interrupted sessions then finish with the right blob. Every fifth cycle
the server is stopped and an offline ``blobd fsck`` (which judges tmp/ and
uploads/ too) must find nothing. With ``--mirror-cycles`` a second store
mirrors to a real SeaweedFS (tests/s3server.py) and every blob must
eventually be in the bucket, and nothing else.

The first failed check stops the run (the data dir is kept, its path
printed); the summary gives cycles per mode, requests acknowledged and
requests in flight at the kills. Every process started is killed by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from mirrorhelp import Bucket, mirror_section, unique_prefix  # noqa: E402
from serverproc import BlobdServer, blobd_env  # noqa: E402
from storecheck import assert_store_consistent  # noqa: E402

OWNERS = ["alice", "bob", "carol", "dave", "q0", "q1"]  # q*: small quotas
MODES = ("all", "worker", "supervisor")
KIB, MIB = 1024, 1024 * 1024
TUS = {"Tus-Resumable": "1.0.0"}


class CheckFailed(AssertionError):
    pass


class Draining(Exception):
    """503: a worker whose supervisor is gone is shutting down."""


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def fail(message: str) -> None:
    raise CheckFailed(message)


# -- the model -----------------------------------------------------------------


@dataclass
class Session:
    """An upload session the model knows the id of."""
    sid: str
    owner: str
    protocol: str  # 'native' or 'tus'
    data: bytes
    ref: str
    chunk_size: int = 0
    acked_chunks: set[int] = field(default_factory=set)
    acked_offset: int = 0
    deferred: bool = False
    finishing: bool = False  # the request that completes it was sent
    aborting: bool = False  # the DELETE was sent


@dataclass
class Model:
    bodies: dict[str, bytes] = field(default_factory=dict)
    # (owner, name) -> the values the name may hold (None: absent). One
    # value once acknowledged; more while a request changing it is unanswered.
    refs: dict[tuple[str, str], set[str | None]] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)  # bodies sent since the last check
    stats: Counter = field(default_factory=Counter)

    trace_path: Path | None = None

    def trace(self, line: str) -> None:
        if self.trace_path is not None:
            with open(self.trace_path, "a") as fh:
                fh.write(f"{time.time():.3f} {line}\n")

    def possible(self, owner: str, name: str) -> set[str | None]:
        return self.refs.setdefault((owner, name), {None})

    def held_hashes(self, owner: str) -> set[str]:
        return {h for (o, _), vals in self.refs.items() if o == owner for h in vals if h}


class Change:
    """A request that may set names: ``with model.change(...) as c`` widens
    the names' possible values before it is sent; ``c.done()`` narrows them
    on a 2xx, ``c.refused()`` restores them on an error answer; with
    neither (no answer: the kill) both stay possible."""

    def __init__(self, model: Model, owner: str, sets: dict[str, str | None],
                 what: str = "") -> None:
        self.model, self.owner, self.sets, self.what = model, owner, sets, what
        self.before = {name: set(model.possible(owner, name)) for name in sets}
        self.settled = False

    def __enter__(self) -> "Change":
        for name, value in self.sets.items():
            self.model.possible(self.owner, name).add(value)
        self.model.stats["sent"] += 1
        self.model.trace(f"{self.owner} {self.what} {self.sets} sent")
        return self

    def done(self) -> None:
        self.model.trace(f"{self.owner} {self.what} {self.sets} done")
        for name, value in self.sets.items():
            self.model.refs[(self.owner, name)] = {value}
        self.settled = True
        self.model.stats["acked"] += 1

    def undo(self) -> None:
        """Answered, and the names were not to change after all."""
        self._unchanged("answered, no change", "acked")

    def refused(self) -> None:
        self._unchanged("refused", "refused")

    def _unchanged(self, how: str, counted_as: str) -> None:
        self.model.trace(f"{self.owner} {self.what} {self.sets} {how}")
        for name in self.sets:
            self.model.refs[(self.owner, name)] = self.before[name]
        self.settled = True
        self.model.stats[counted_as] += 1

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if not self.settled:
            self.model.trace(f"{self.owner} {self.what} {self.sets} unanswered: {exc_type}")
            self.model.stats["unanswered"] += 1
        return False


# -- the load --------------------------------------------------------------------


class Client:
    """One owner's client: one request at a time, chosen at random."""

    def __init__(self, harness: "Harness", owner: str, token: str, rng: random.Random) -> None:
        self.h, self.owner, self.token, self.rng = harness, owner, token, rng
        self.auth = {"Authorization": f"Bearer {token}"}
        self.names = 0

    @property
    def model(self) -> Model:
        return self.h.model

    @property
    def url(self) -> str:
        return self.h.server.url

    def body(self) -> bytes:
        roll = self.rng.random()
        if roll < 0.25 and self.h.shared:
            data = self.rng.choice(self.h.shared)  # the same body from several owners
        else:
            size = (self.rng.randint(1, 64) * KIB if roll < 0.9
                    else self.rng.randint(1 * MIB, 3 * MIB))
            data = self.rng.randbytes(size)
        self.model.bodies.setdefault(b3(data), data)
        self.model.touched.add(b3(data))
        return data

    def new_name(self) -> str:
        self.names += 1
        return f"n{self.names % 40}"  # names are re-pointed too

    async def run(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        ops = [(self.put, 4), (self.post, 3), (self.delete_blob, 2), (self.put_ref, 2),
               (self.delete_ref, 1), (self.native, 1), (self.tus, 1), (self.range_get, 2)]
        weights = [w for _, w in ops]
        while not stop.is_set():
            op = self.rng.choices([f for f, _ in ops], weights)[0]
            try:
                await op(http, stop)
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, Draining):
                self.model.stats["connection_errors"] += 1
                if not self.h.killing:
                    self.model.stats["errors_without_kill"] += 1
                await asyncio.sleep(0.05)

    def known(self) -> list[tuple[str, str]]:
        """(name, hash) the model is sure of."""
        return [(n, next(iter(v))) for (o, n), v in self.model.refs.items()
                if o == self.owner and len(v) == 1 and None not in v]

    async def _store(self, resp: aiohttp.ClientResponse, change: Change, data: bytes) -> None:
        if resp.status in (200, 201):
            body = await resp.json()
            if body["hash"] != b3(data) or body["size"] != len(data):
                fail(f"{self.owner}: stored {body} for {b3(data)} of {len(data)} bytes")
            change.done()
        else:
            await self._refused(resp, change, {507, 413})

    async def _refused(self, resp: aiohttp.ClientResponse, change: Change | None,
                       expected: set[int]) -> None:
        text = await resp.text()
        if resp.status == 503 and self.h.killing:
            # Refused as the server shuts down: it must have changed nothing.
            if change is not None:
                change.refused()
            raise Draining()
        if resp.status not in expected:
            fail(f"{self.owner}: unexpected {resp.status} {resp.method} {resp.url}: {text}")
        self.model.stats[f"status_{resp.status}"] += 1
        if change is not None:
            change.refused()

    async def put(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        data = self.body()
        digest = b3(data)
        headers = dict(self.auth)
        name = digest
        if self.rng.random() < 0.4:
            name = headers["Blob-Ref"] = self.new_name()
        with Change(self.model, self.owner, {name: digest}, "PUT") as change:
            async with http.put(f"{self.url}/blobs/{digest}", data=data,
                                headers=headers) as resp:
                await self._store(resp, change, data)

    async def post(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        data = self.body()
        with Change(self.model, self.owner, {b3(data): b3(data)}, "POST") as change:
            async with http.post(f"{self.url}/blobs", data=data, headers=self.auth) as resp:
                await self._store(resp, change, data)

    async def delete_blob(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        known = self.known()
        if not known:
            return
        digest = self.rng.choice(known)[1]
        names = [n for (o, n), v in self.model.refs.items()
                 if o == self.owner and digest in v]
        before = {n: set(self.model.possible(self.owner, n)) for n in names}
        for n in names:
            self.model.possible(self.owner, n).add(None)
        self.model.stats["sent"] += 1
        self.model.trace(f"{self.owner} DELETE blob {digest} names {names}")
        answered = False
        try:
            async with http.delete(f"{self.url}/blobs/{digest}", headers=self.auth) as resp:
                if resp.status == 204:
                    for n in names:
                        self.model.refs[(self.owner, n)] = (before[n] - {digest}) | {None}
                    self.model.stats["acked"] += 1
                    self.model.trace(f"{self.owner} DELETE blob {digest}: 204")
                else:
                    self.model.trace(f"{self.owner} DELETE blob {digest}: {resp.status}")
                    await self._refused(resp, None, {404})
                    for n in names:
                        self.model.refs[(self.owner, n)] = before[n]
                answered = True
        finally:
            if not answered:
                self.model.stats["unanswered"] += 1

    async def put_ref(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        known = self.known()
        if not known:
            return
        digest = self.rng.choice(known)[1]
        name = self.new_name()
        with Change(self.model, self.owner, {name: digest}, "PUT ref") as change:
            async with http.put(f"{self.url}/refs/{name}", json={"hash": digest},
                                headers=self.auth) as resp:
                if resp.status == 200:
                    change.done()
                else:
                    await self._refused(resp, change, {507})

    async def delete_ref(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        known = self.known()
        if not known:
            return
        name = self.rng.choice(known)[0]
        with Change(self.model, self.owner, {name: None}, "DELETE ref") as change:
            async with http.delete(f"{self.url}/refs/{name}", headers=self.auth) as resp:
                if resp.status == 204:
                    change.done()
                else:
                    await self._refused(resp, change, {404})

    async def range_get(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        known = self.known()
        if not known:
            return
        digest = self.rng.choice(known)[1]
        data = self.model.bodies[digest]
        start = self.rng.randrange(len(data))
        end = min(len(data) - 1, start + self.rng.randint(0, 256 * KIB))
        async with http.get(f"{self.url}/blobs/{digest}",
                            headers={**self.auth, "Range": f"bytes={start}-{end}"}) as resp:
            body = await resp.read()
            # The owner holds it for sure: no other client changes its names.
            if resp.status == 206:
                if body != data[start:end + 1]:
                    fail(f"{self.owner}: Range {start}-{end} of {digest} has other bytes")
            elif resp.status == 503 and self.h.killing:
                raise Draining()
            else:
                fail(f"{self.owner}: Range GET of {digest}: {resp.status} {body[:200]!r}")

    # -- sessions --

    async def native(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        data = self.body()
        digest = b3(data)
        chunk = self.rng.choice([64 * KIB, 256 * KIB, 1 * MIB])
        ref = self.new_name() if self.rng.random() < 0.5 else digest
        spec = {"size": len(data), "chunk_size": chunk, "hash": digest}
        if ref != digest:
            spec["ref"] = ref
        # Content stored already: the session is made complete, and the
        # name given, at once.
        with Change(self.model, self.owner, {ref: digest}, "create session") as change:
            async with http.post(f"{self.url}/uploads", json=spec,
                                 headers=self.auth) as resp:
                if resp.status != 201:
                    await self._refused(resp, change, {507, 413})
                    return
                made = await resp.json()
                sid = made["id"]
                if made["blob_hash"] is not None:
                    if made["blob_hash"] != digest:
                        fail(f"session {sid} made complete as {made}")
                    change.done()
                    return
                change.undo()
        session = Session(sid, self.owner, "native", data, ref, chunk_size=chunk)
        self.model.trace(f"{self.owner} session {sid} {len(data)} {digest} ref {ref}")
        self.model.sessions[sid] = session
        self.model.stats["sessions"] += 1
        count = -(-len(data) // chunk)
        order = list(range(count))
        self.rng.shuffle(order)
        abort = self.rng.random() < 0.15
        for n, index in enumerate(order):
            if abort and n == len(order) // 2:
                break
            piece = data[index * chunk:(index + 1) * chunk]
            async with http.put(f"{self.url}/uploads/{sid}/{index}", data=piece,
                                headers=self.auth) as resp:
                if resp.status != 204:
                    await self._refused(resp, None, set())
                session.acked_chunks.add(index)
        if abort:
            await self.abort(http, session)
            return
        await self.complete_native(http, session)

    async def complete_native(self, http: aiohttp.ClientSession, session: Session) -> None:
        session.finishing = True
        digest = b3(session.data)
        with Change(self.model, self.owner, {session.ref: digest},
                    f"complete {session.sid}") as change:
            async with http.post(f"{self.url}/uploads/{session.sid}/complete",
                                 headers=self.auth) as resp:
                if resp.status in (200, 201):
                    body = await resp.json()
                    if body["hash"] != digest:
                        fail(f"session {session.sid} completed as {body}")
                    change.done()
                    del self.model.sessions[session.sid]
                else:
                    # Over quota at completion: the session stays, to abort.
                    await self._refused(resp, change, {507})
                    await self.abort(http, session)

    async def abort(self, http: aiohttp.ClientSession, session: Session) -> None:
        where = "uploads" if session.protocol == "native" else "tus"
        headers = {**self.auth, **(TUS if where == "tus" else {})}
        session.aborting = True
        self.model.trace(f"{self.owner} abort {session.sid}")
        async with http.delete(f"{self.url}/{where}/{session.sid}", headers=headers) as resp:
            if resp.status not in (204, 404):
                await self._refused(resp, None, set())
        self.model.sessions.pop(session.sid, None)

    async def tus(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        data = self.body()
        digest = b3(data)
        ref = self.new_name() if self.rng.random() < 0.5 else digest
        meta = f"filetype {base64.b64encode(b'application/octet-stream').decode()}"
        if ref != digest:
            meta += f",ref {base64.b64encode(ref.encode()).decode()}"
        deferred = self.rng.random() < 0.4
        headers = {**self.auth, **TUS, "Upload-Metadata": meta}
        headers.update({"Upload-Defer-Length": "1"} if deferred
                       else {"Upload-Length": str(len(data))})
        async with http.post(f"{self.url}/tus/", headers=headers) as resp:
            if resp.status != 201:
                await self._refused(resp, None, {507, 413})
                return
            sid = resp.headers["Location"].rstrip("/").rsplit("/", 1)[1]
        session = Session(sid, self.owner, "tus", data, ref, deferred=deferred)
        self.model.trace(f"{self.owner} tus {sid} {len(data)} {digest} ref {ref}")
        self.model.sessions[sid] = session
        self.model.stats["sessions"] += 1
        await self.patch_tus(http, session, stop)

    async def patch_tus(self, http: aiohttp.ClientSession, session: Session,
                        stop: asyncio.Event | None) -> None:
        data, offset = session.data, session.acked_offset
        digest = b3(data)
        while offset < len(data):
            piece = data[offset:offset + self.rng.choice([16 * KIB, 200 * KIB, 1 * MIB])]
            last = offset + len(piece) == len(data)
            headers = {**self.auth, **TUS, "Upload-Offset": str(offset),
                       "Content-Type": "application/offset+octet-stream"}
            if last and session.deferred:
                headers["Upload-Length"] = str(len(data))
            change = Change(self.model, self.owner, {session.ref: digest} if last else {},
                            f"PATCH {session.sid} {offset}+{len(piece)}")
            with change:
                if last:
                    session.finishing = True
                async with http.patch(f"{self.url}/tus/{session.sid}", data=piece,
                                      headers=headers) as resp:
                    if resp.status != 204:
                        if resp.status == 507:  # a deferred length grows past the quota
                            await self._refused(resp, change, {507})
                            await self.abort(http, session)
                            return
                        await self._refused(resp, change, set())
                    offset = int(resp.headers["Upload-Offset"])
                    session.acked_offset = offset
                    if last:
                        if resp.headers.get("Blob-Hash") != digest:
                            fail(f"tus {session.sid} finished as {resp.headers}")
                        change.done()
                        del self.model.sessions[session.sid]
                    else:
                        change.done()
            if stop is not None and stop.is_set() and self.rng.random() < 0.5:
                return  # left unfinished, resumed after the check


# -- the harness -----------------------------------------------------------------


class SamePortServer(BlobdServer):
    """Restarts on the port of the first start, as a real restart does: a
    server killed halfway must not keep its successor off the port."""

    fixed: int | None = None

    def _spawn(self) -> None:
        if self.fixed is None:
            super()._spawn()
            self.fixed = self.port
            return
        self.port = self.fixed
        self._write_config()
        self.starts += 1
        self.stdout_path = self.workdir / f"serve-{self.starts}.out"
        self.stderr_path = self.workdir / f"serve-{self.starts}.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "blobd", "serve", "-c", str(self.config_path)],
                cwd=self.workdir, env=blobd_env(), stdout=out, stderr=err,
                stdin=subprocess.DEVNULL, start_new_session=True)


class Harness:
    def __init__(self, args: argparse.Namespace, workdir: Path, mirror: Any | None) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.model = Model()
        self.shared: list[bytes] = []
        self.killing = False
        self.mirror = mirror
        self.prefix = unique_prefix() if mirror else None
        config: dict[str, Any] = {
            "server": {"workers": 2},
            # info, not warning: BlobdServer counts a server with workers as
            # started only at the supervisor's "serving ... with 2 workers"
            # line, which is logged at info.
            "logging": {"level": "info", "access_log": False},
            "storage": {"fsync": True, "min_free_bytes": "1MiB"},
            "quotas": {"default": {"max_bytes": "48MiB"},
                       "q0": {"max_bytes": "3MiB", "max_blobs": 10},
                       "q1": {"max_bytes": "6MiB", "max_refs": 8}},
            "uploads": {"max_sessions_per_owner": 3, "idle_timeout_seconds": 5},
            "gc": {"grace_seconds": 0},
        }
        if mirror is not None:
            config["mirror"] = mirror_section(mirror, self.prefix, backup_interval_seconds=0)
        self.server = SamePortServer(workdir, config, startup_timeout=60)
        self.tokens: dict[str, str] = {}
        self.cycles: Counter = Counter()
        self.blocked: list[float] = []  # supervisor kills: seconds until a restart got in
        self.refusals: Counter = Counter()  # why restarts were refused meanwhile
        self.orphans: list[int] = []  # the workers of a supervisor killed alone
        self.startup_repairs: Counter = Counter()
        self.log_path = workdir / "torture.log"
        self.model.trace_path = workdir / "trace.log"

    def log(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with open(self.log_path, "a") as fh:
            fh.write(f"{stamp} {line}\n")
        print(f"{stamp} {line}", flush=True)

    # -- processes --

    def start(self, retry: bool = False) -> None:
        """Start; with ``retry``, again and again while the data dir or the
        port is still held (after a supervisor-only kill its workers drain)."""
        began = time.monotonic()
        while True:
            try:
                self.server.start()
                break
            except (RuntimeError, TimeoutError) as exc:
                if not retry or time.monotonic() - began > 90:
                    raise
                last = str(exc).strip().splitlines()[-1]
                self.refusals[last[:100]] += 1
                time.sleep(0.1)
        if retry:
            self.blocked.append(time.monotonic() - began)
        self.wait_workers(2)
        if not self.tokens:
            for owner in OWNERS:
                self.tokens[owner] = self.server.token(owner, "read,write")

    def wait_workers(self, count: int, timeout: float = 30.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.server.workers()
            if len(pids) == count:
                return pids
            time.sleep(0.05)
        fail(f"expected {count} workers, have {self.server.workers()}")
        return []

    def all_pids(self) -> list[int]:
        return [self.server.pid, *self.server.workers()] if self.server.running else []

    @staticmethod
    def wait_gone(pids: list[int], timeout: float = 60.0) -> float:
        began = time.monotonic()
        while any(_alive(p) for p in pids):
            if time.monotonic() - began > timeout:
                fail(f"processes {[p for p in pids if _alive(p)]} still alive after {timeout}s")
            time.sleep(0.02)
        return time.monotonic() - began

    # -- one cycle --

    async def cycle(self, mode: str, number: int) -> None:
        stop = asyncio.Event()
        self.shared = [self.rng.randbytes(self.rng.randint(1, 48) * KIB) for _ in range(2)]
        for data in self.shared:
            self.model.bodies.setdefault(b3(data), data)
        timeout = aiohttp.ClientTimeout(total=40, sock_connect=3)
        before = Counter(self.model.stats)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            # aiohttp sends a PUT or DELETE again, once, when a kept-alive
            # connection breaks: a DELETE the killed worker did would then
            # be answered 404 by another, and the model misled.
            assert hasattr(http, "_retry_connection"), "aiohttp changed: see this line"
            http._retry_connection = False
            clients = [Client(self, o, self.tokens[o], random.Random(self.rng.random()))
                       for o in OWNERS]
            tasks = [asyncio.create_task(c.run(http, stop)) for c in clients]
            await asyncio.sleep(self.rng.uniform(0.02, 2.0))
            sent = self.model.stats["sent"] - before["sent"]
            self.killing = True
            self.model.trace("KILL")
            detail = await asyncio.to_thread(self.kill, mode)
            if mode == "worker":
                await asyncio.sleep(self.rng.uniform(0.3, 1.5))  # the others keep serving
            stop.set()
            await asyncio.gather(*tasks)
        self.killing = False
        if mode == "all":
            await asyncio.to_thread(self.offline_fsck, "after the kill, before start-up")
        if mode == "all":
            await asyncio.to_thread(self.start)
        elif mode == "supervisor":
            await asyncio.to_thread(self.start, True)
            alive = [p for p in self.orphans if _alive(p)]
            if alive:
                fail(f"the killed supervisor's workers {alive} outlived the restart")
            detail += f"; restarted after {self.blocked[-1]:.2f}s"
        else:
            await asyncio.to_thread(self.wait_workers, 2)
        gained = Counter(self.model.stats) - before
        self.log(f"cycle {number} {mode}{' mirror' if self.mirror else ''}: killed after"
                 f" {sent} requests ({detail}); acked {gained['acked']},"
                 f" unanswered {gained['unanswered']}, refused {gained['refused']}")
        self.model.trace("check")
        await self.check(timeout, full=number % 5 == 0)
        if number % 5 == 0:
            await asyncio.to_thread(self.server.terminate, 60)
            await asyncio.to_thread(self.offline_fsck, "after a clean stop", True)
            await asyncio.to_thread(self.start)
        self.cycles[mode] += 1

    def kill(self, mode: str) -> str:
        pids = self.all_pids()
        supervisor, workers = pids[0], pids[1:]
        if mode == "all":
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            self.server._reap()
            self.wait_gone(pids)
            return f"pids {pids}"
        if mode == "worker":
            victim = self.rng.choice(workers)
            os.kill(victim, signal.SIGKILL)
            return f"worker {victim}"
        os.kill(supervisor, signal.SIGKILL)
        self.server._reap()
        self.orphans = workers
        return f"supervisor {supervisor}"

    # -- checks --

    def offline_fsck(self, when: str, strict: bool = False) -> None:
        result = self.server.cli("fsck")
        if result.returncode == 0:
            return
        kinds = [line.split(":")[0].strip() for line in result.stdout.splitlines()
                 if line.startswith("  ") and ":" in line]
        if strict:
            fail(f"fsck {when}:\n{result.stdout}{result.stderr}")
        self.startup_repairs.update(kinds)
        self.log(f"  fsck {when} (start-up must repair it): {'; '.join(kinds)}")

    async def check(self, http_timeout: aiohttp.ClientTimeout, full: bool) -> None:
        async with aiohttp.ClientSession(timeout=http_timeout) as http:
            await self.check_sessions(http)
            await self.check_refs(http, full)
        await asyncio.to_thread(self.check_disk)
        if self.mirror is not None:
            await self.check_mirror()

    async def check_sessions(self, http: aiohttp.ClientSession) -> None:
        """Acknowledged chunks and offsets are kept; finish every session."""
        for session in list(self.model.sessions.values()):
            client = Client(self, session.owner, self.tokens[session.owner],
                            random.Random(self.rng.random()))
            if session.protocol == "native":
                async with http.get(f"{self.server.url}/uploads/{session.sid}",
                                    headers=client.auth) as resp:
                    if resp.status == 404 and (session.finishing or session.aborting):
                        del self.model.sessions[session.sid]  # check_refs sees the result
                        continue
                    if resp.status != 200:
                        fail(f"session {session.sid}: {resp.status} {await resp.text()}")
                    received = set((await resp.json())["received"])
                if not session.acked_chunks <= received:
                    fail(f"session {session.sid} lost acknowledged chunks"
                         f" {sorted(session.acked_chunks - received)}")
                for index in sorted(set(range(-(-len(session.data) // session.chunk_size)))
                                    - received):
                    chunk = session.chunk_size
                    async with http.put(f"{self.server.url}/uploads/{session.sid}/{index}",
                                        data=session.data[index * chunk:(index + 1) * chunk],
                                        headers=client.auth) as resp:
                        if resp.status != 204:
                            fail(f"resume {session.sid} chunk {index}: {resp.status}")
                await client.complete_native(http, session)
            else:
                async with http.head(f"{self.server.url}/tus/{session.sid}",
                                     headers={**client.auth, **TUS}) as resp:
                    if resp.status == 404 and (session.finishing or session.aborting):
                        del self.model.sessions[session.sid]
                        continue
                    if resp.status == 507:
                        # Its last byte was in, its commit cut off: HEAD
                        # commits it, and the owner's room is gone meanwhile.
                        self.model.stats["tus_head_507"] += 1
                        await client.abort(http, session)
                        continue
                    if resp.status != 200:
                        fail(f"tus {session.sid}: HEAD {resp.status}")
                    offset = int(resp.headers["Upload-Offset"])
                    if "Blob-Hash" in resp.headers:
                        if resp.headers["Blob-Hash"] != b3(session.data):
                            fail(f"tus {session.sid} finished as {resp.headers['Blob-Hash']}")
                        del self.model.sessions[session.sid]
                        continue
                if offset < session.acked_offset:
                    fail(f"tus {session.sid} at {offset}, {session.acked_offset} acknowledged")
                session.acked_offset = offset
                await client.patch_tus(http, session, None)
            self.model.stats["sessions_resumed"] += 1
        # Sessions whose creation was unanswered: the model has no id; the
        # owners' limits would fill up with them.
        await asyncio.to_thread(self.abort_unknown_sessions)

    def abort_unknown_sessions(self) -> None:
        with self.index() as db:
            rows = db.execute("SELECT id, owner, protocol FROM uploads"
                              " WHERE result_hash IS NULL").fetchall()
        for sid, owner, protocol in rows:
            if sid in self.model.sessions:
                continue
            where = "uploads" if protocol == "native" else "tus"
            request = urllib.request.Request(
                f"{self.server.url}/{where}/{sid}", method="DELETE",
                headers={"Authorization": f"Bearer {self.tokens[owner]}", **TUS})
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        request, timeout=20) as resp:
                    status = resp.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            if status != 204:
                fail(f"DELETE {where}/{sid}: {status}")
            self.model.stats["unknown_sessions_aborted"] += 1

    def index(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.server.data_dir / 'index.sqlite3'}?mode=ro",
                               uri=True, timeout=30)

    async def check_refs(self, http: aiohttp.ClientSession, full: bool) -> None:
        """Names against the model, usage against the names, blobs against
        their bytes: those sent since the last check (all when ``full``) in
        full, the others by HEAD."""
        everyone: set[str] = set()
        for owner in OWNERS:
            auth = {"Authorization": f"Bearer {self.tokens[owner]}"}
            names: dict[str, tuple[str, int]] = {}
            after = None
            while True:
                params = {"limit": "1000", **({"after": after} if after else {})}
                async with http.get(f"{self.server.url}/refs", params=params,
                                    headers=auth) as resp:
                    page = await resp.json()
                names.update({r["name"]: (r["hash"], r["size"]) for r in page["refs"]})
                after = page["next"]
                if not after:
                    break
            for (o, name), values in list(self.model.refs.items()):
                if o != owner:
                    continue
                have = names.get(name, (None, 0))[0]
                if have not in values:
                    fail(f"{owner}/{name} is {have}, the model allows {values}")
                self.model.refs[(o, name)] = {have}
            for name in names:
                if (owner, name) not in self.model.refs:
                    fail(f"{owner}/{name}: a name no request made")
            held = {h: size for h, size in names.values()}
            for h, size in held.items():
                if h not in self.model.bodies:
                    fail(f"{owner} holds {h}, a blob no request stored")
                if size != len(self.model.bodies[h]):
                    fail(f"{h}: size {size}, stored {len(self.model.bodies[h])} bytes")
            async with http.get(f"{self.server.url}/quota", headers=auth) as resp:
                quota = await resp.json()
            if (quota["used_bytes"], quota["used_blobs"]) != (sum(held.values()), len(held)):
                fail(f"{owner}: /quota says {quota['used_bytes']} bytes in"
                     f" {quota['used_blobs']} blobs; holds {sum(held.values())} in {len(held)}")
            everyone |= set(held)
        auth = {"Authorization": f"Bearer {self.tokens['alice']}"}
        for digest, data in list(self.model.bodies.items()):
            if digest in everyone and (full or digest in self.model.touched):
                # Anyone's: alice reads it (read scope is not per owner).
                async with http.get(f"{self.server.url}/blobs/{digest}", headers=auth) as resp:
                    body = await resp.read()
                if resp.status != 200 or b3(body) != digest:
                    fail(f"{digest}: GET {resp.status}, {len(body)} bytes, not its content")
                self.model.stats["blobs_read"] += 1
            elif digest in everyone:
                async with http.head(f"{self.server.url}/blobs/{digest}",
                                     headers=auth) as resp:
                    if resp.status != 200 or resp.content_length != len(data):
                        fail(f"{digest}: HEAD {resp.status}, {resp.content_length} bytes")
            else:
                async with http.head(f"{self.server.url}/blobs/{digest}",
                                     headers=auth) as resp:
                    if resp.status != 404:
                        fail(f"{digest}: nobody references it, HEAD says {resp.status}")
                if not any(s.data is data for s in self.model.sessions.values()):
                    del self.model.bodies[digest]  # keeps the model small
        self.model.refs = {k: v for k, v in self.model.refs.items() if v != {None}}
        self.model.touched.clear()
        self.held = everyone

    def check_disk(self) -> None:
        data = self.server.data_dir
        blobs = assert_store_consistent(data)
        if set(blobs) != self.held:
            fail(f"index blobs and referenced blobs differ: {set(blobs) ^ self.held}")
        with self.index() as db:
            open_ids = {sid for (sid,) in db.execute(
                "SELECT id FROM uploads WHERE result_hash IS NULL")}
            reserved = db.execute(
                "SELECT o.owner, o.reserved_bytes, o.reserved_blobs,"
                " (SELECT coalesce(sum(reserved_bytes), 0) FROM uploads u"
                "  WHERE u.owner = o.owner AND u.result_hash IS NULL),"
                " (SELECT count(*) FROM uploads u"
                "  WHERE u.owner = o.owner AND u.result_hash IS NULL) FROM owners o").fetchall()
        for owner, rbytes, rblobs, sbytes, sblobs in reserved:
            if (rbytes, rblobs) != (sbytes, sblobs):
                fail(f"{owner}: reserved {rbytes} bytes/{rblobs} blobs, sessions hold"
                     f" {sbytes}/{sblobs}")
        files = {p.name for p in (data / "uploads").iterdir()}
        if files != open_ids:
            fail(f"uploads/ holds {sorted(files)}, open sessions {sorted(open_ids)}")
        live = self.server.cli("fsck")
        if live.returncode != 0:
            fail(f"fsck beside the restarted server:\n{live.stdout}{live.stderr}")

    async def check_mirror(self) -> None:
        bucket = Bucket(self.mirror, self.prefix)
        deadline = time.monotonic() + 90
        while True:
            have = await asyncio.to_thread(bucket.digests)
            if have == self.held:
                return
            if time.monotonic() > deadline:
                fail(f"mirror: missing {sorted(self.held - have)[:5]},"
                     f" extra {sorted(have - self.held)[:5]}")
            await asyncio.sleep(0.5)

    def summary(self) -> str:
        stats = self.model.stats
        parts = [f"cycles {dict(self.cycles)}",
                 f"requests sent {stats['sent']}, acked {stats['acked']},"
                 f" refused {stats['refused']}, unanswered {stats['unanswered']},"
                 f" connection errors {stats['connection_errors']}"
                 f" (without a kill: {stats['errors_without_kill']})",
                 f"sessions {stats['sessions']}, resumed after a kill"
                 f" {stats['sessions_resumed']}, unknown ones aborted"
                 f" {stats['unknown_sessions_aborted']}, tus HEAD refused on quota"
                 f" {stats['tus_head_507']}",
                 f"statuses {({k: v for k, v in stats.items() if k.startswith('status_')})}",
                 f"fsck findings before start-up {dict(self.startup_repairs)}"]
        if self.blocked:
            parts.append(f"supervisor kills: a restart got in after at most"
                         f" {max(self.blocked):.2f}s (mean"
                         f" {sum(self.blocked) / len(self.blocked):.2f}s); refused meanwhile:"
                         f" {dict(self.refusals)}")
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


async def run_phase(args: argparse.Namespace, workdir: Path, cycles: int,
                    mirror: Any | None) -> Harness:
    harness = Harness(args, workdir, mirror)
    harness.log(f"phase in {workdir}{' with the mirror' if mirror else ''}: {cycles} cycles")
    try:
        await asyncio.to_thread(harness.start)
        for number in range(1, cycles + 1):
            mode = MODES[(number - 1) % 3] if args.mode == "mix" else args.mode
            harness.model.trace(f"cycle {number} {mode}")
            await harness.cycle(mode, number)
    except BaseException:
        harness.log(f"FAILED; data dir kept: {harness.server.data_dir}")
        raise
    finally:
        leftover = [*harness.all_pids(), *harness.orphans]
        harness.server.stop()
        for pid in leftover:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        harness.log(harness.summary())
    return harness


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=30, help="cycles without the mirror")
    parser.add_argument("--mirror-cycles", type=int, default=0, help="cycles with the mirror")
    parser.add_argument("--mode", choices=["mix", *MODES], default="mix")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="blobd-torture-"))
    print(f"seed {args.seed}, workdir {workdir}", flush=True)
    if args.cycles:
        await run_phase(args, workdir / "plain", args.cycles, None)
    if args.mirror_cycles:
        from s3server import SeaweedS3
        s3 = SeaweedS3(workdir / "seaweed")
        s3.start()
        try:
            await run_phase(args, workdir / "mirror", args.mirror_cycles, s3)
        finally:
            s3.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

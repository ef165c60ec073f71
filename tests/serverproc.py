"""Run a real ``blobd serve`` in a subprocess, for tests that need a process:
kill -9, restarts on the same data directory, memory of the server alone,
the command line.

    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        token = server.token("alice", "read,write")
        ... requests to server.url ...
        server.kill9()
        server.start()          # same config file, same data dir, new port

Leaving the ``with`` block always stops the process. The helper knows
nothing of blobd's internals: it speaks only the command line, the config
file, HTTP and ``/proc``; but :meth:`BlobdServer.token` calls what
``blobd token create`` calls, rather than start a Python for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORT = 8420  # the embedded default config's port
# Straight to 127.0.0.1, whatever *_proxy variables the environment has.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, token: str | None = None, data: bytes | None = None,
         timeout: float = 10.0) -> tuple[int, bytes]:
    """One blocking request; (status, body) for errors too."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def _make_token(config_path: Path, owner: str, scopes: str) -> str:
    """What ``blobd token create`` does, on an existing store, keeping this
    process's umask (opening a store makes it blobd's private one)."""
    from blobd import auth
    from blobd.cli.common import open_index
    from blobd.config import load_config

    umask = os.umask(0)
    os.umask(umask)
    try:
        async with open_index(load_config(config_path), must_exist=True) as store:
            async with store.write() as tx:
                _, token = await auth.create_token(tx.conn, owner,
                                                   auth.parse_scopes(scopes))
    finally:
        os.umask(umask)
    return token


# A store made as the first `blobd serve` makes it, without serving: for
# tests that need one made by a given user or under a given umask.
MAKE_STORE = ("import asyncio, sys\n"
              "from blobd.config import load_config\n"
              "from blobd.store import Store\n"
              "async def main():\n"
              "    store = Store(load_config(sys.argv[1]))\n"
              "    await store.open()\n"
              "    await store.close()\n"
              "asyncio.run(main())\n")


def blobd_env() -> dict[str, str]:
    """The environment for a blobd subprocess: this checkout importable
    from any working directory."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_blobd(*args: str, cwd: Path | None = None,
              timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m blobd ARGS`` to completion; the caller checks the result."""
    return subprocess.run([sys.executable, "-m", "blobd", *args], cwd=cwd or REPO_ROOT,
                          env=blobd_env(), capture_output=True, text=True,
                          timeout=timeout)


def wait_until(check: Any, what: str, timeout: float = 10.0) -> None:
    """Poll ``check()`` until it is true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reserve_port() -> socket.socket:
    """A socket bound (not listening) to a free port, with SO_REUSEADDR.

    While it is open the kernel hands the port to no other bind(0), yet a
    server that also sets SO_REUSEADDR (aiohttp does) can still listen on
    it: other test processes cannot steal the port in between.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on 127.0.0.1/0.0.0.0:<port> (from /proc/net/tcp)."""
    inodes = set()
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def owns_listener(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the socket listening on ``port``."""
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                return True
        except OSError:
            continue
    return False


def descendants(pid: int) -> list[int]:
    """The process and all its descendants (workers, or a wrapper's server)."""
    return [pid, *(d for child in children(pid) for d in descendants(child))]


def children(pid: int) -> list[int]:
    """The direct children of a process (``[server] workers`` > 1: its workers)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found.extend(int(child) for child in fh.read().split())
        except FileNotFoundError:
            continue
    return found


def port_is_free(port: int) -> bool:
    """Whether a server could listen on the port now. SO_REUSEADDR, as
    aiohttp sets it, so connections of an earlier server lingering in
    TIME_WAIT do not count; only a live listener does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def to_toml(sections: dict[str, Any]) -> str:
    """TOML for a config: tables of scalars and lists, nested tables as
    dotted headers (``[quotas.default]``)."""
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in scalars.items())
        lines.append("")
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{name}.{key}", value)

    for name, values in sections.items():
        table(name, values)
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def read_status_kib(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), None once gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler:
    """Samples a process's VmRSS from a thread, so a busy event loop in the
    test process cannot make it miss a peak."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []  # bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            kib = read_status_kib(self.pid, "VmRSS")
            if kib is not None:
                self.samples.append(kib * 1024)
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


class BlobdServer:
    """One ``blobd serve`` process on a config file it writes itself.

    ``config`` holds TOML sections; ``server.host``, ``server.port`` and
    ``server.data_dir`` are filled in (a free port on every start, the data
    directory under ``workdir`` unless given). With ``embedded_defaults``
    no config file is passed at all: the server must then listen on
    127.0.0.1:8420 with its data in ``<workdir>/blobd-data``. ``env`` adds
    environment variables (NOTIFY_SOCKET, ...); ``tls`` is the client-side
    context that trusts the server's certificate, for a server configured
    with ``tls_cert``/``tls_key`` (its url is then https). ``wrapper`` is a
    command the server runs under (it ends with the server's argv).
    """

    def __init__(self, workdir: Path, config: dict[str, Any] | None = None, *,
                 data_dir: Path | None = None, embedded_defaults: bool = False,
                 startup_timeout: float = 30.0, env: dict[str, str] | None = None,
                 tls: ssl.SSLContext | None = None, wrapper: list[str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.wrapper = list(wrapper or [])
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.embedded_defaults = embedded_defaults
        self.config = {name: dict(values) for name, values in (config or {}).items()}
        default_data = self.workdir / ("blobd-data" if embedded_defaults else "data")
        self.data_dir = Path(data_dir) if data_dir is not None else default_data
        self.config_path = self.workdir / "blobd.toml"
        self.startup_timeout = startup_timeout
        self.env = dict(env or {})
        self.tls = tls
        self.port = DEFAULT_PORT
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._samplers: list[RssSampler] = []
        self._samples: list[int] = []
        self._reservation: socket.socket | None = None

    # -- life cycle ----------------------------------------------------------

    def __enter__(self) -> "BlobdServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, wait: bool = True) -> "BlobdServer":
        """Start (again) on the same data directory; returns when /healthz is
        200, or at once with ``wait=False`` (the caller then watches it)."""
        if self.running:
            raise RuntimeError("blobd is already running")
        for attempt in range(3):
            self._spawn()
            if not wait:
                return self
            try:
                self._wait_healthy()
                return self
            except _PortTaken:
                # Someone took the free port between our probe and the bind.
                self._reap()
                if self.embedded_defaults or attempt == 2:
                    raise RuntimeError(f"blobd could not bind port {self.port}:\n"
                                       f"{self.stderr_tail()}") from None
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        args = [*self.wrapper, sys.executable, "-m", "blobd", "serve"]
        if not self.embedded_defaults:
            self._reservation = reserve_port()
            self.port = self._reservation.getsockname()[1]
            self._write_config()
            args += ["-c", str(self.config_path)]
        self.starts += 1
        self.stdout_path = self.workdir / f"serve-{self.starts}.out"
        self.stderr_path = self.workdir / f"serve-{self.starts}.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # Files, not pipes: a chatty access log must never block the server.
            self.proc = subprocess.Popen(args, cwd=self.workdir,
                                         env={**blobd_env(), **self.env},
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def _write_config(self) -> None:
        sections = {name: dict(values) for name, values in self.config.items()}
        # Off unless asked for: see SCRUB_OFF in conftest.py.
        sections.setdefault("scrub", {"bytes_per_second": 0})
        server = sections.setdefault("server", {})
        server.update(host="127.0.0.1", port=self.port, data_dir=str(self.data_dir))
        self.config_path.write_text(to_toml(sections))
        if self.wrapper:
            # The wrapper may run the server as another user; this process's
            # umask may be private (a store opened here sets blobd's).
            self.workdir.chmod(0o755)
            self.config_path.chmod(0o644)

    def _wait_healthy(self) -> None:
        try:
            self._poll_health()
        finally:
            if self._reservation is not None:
                self._reservation.close()
                self._reservation = None

    def _poll_health(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.proc.poll() if self.proc else None
            if code is not None:
                # Our process is gone: anyone still listening took the port.
                if (listening_inodes(self.port)
                        or "address already in use" in self.stderr_tail().lower()):
                    raise _PortTaken()
                raise RuntimeError(f"blobd serve exited with {code} during start-up:\n"
                                   f"{self.stderr_tail()}")
            # Some other server may answer on the port while ours is still
            # starting (and about to fail to bind): the answer must be ours.
            if self._health_status() == 200 and self._listens() and self._all_serving():
                return
            time.sleep(0.05)
        self.kill9()
        raise TimeoutError(f"blobd did not answer GET /healthz with 200 within "
                           f"{self.startup_timeout}s:\n{self.stderr_tail()}")

    def _all_serving(self) -> bool:
        """With ``[server] workers`` > 1, /healthz answers once one worker
        serves, while the supervisor still waits for the others, and a
        worker that dies in that window fails the start (exit 1) rather
        than being replaced: a test that kills one must wait for the
        supervisor's "serving ... with N workers" line first (logged at
        info: a server told to log less is taken at its first 200)."""
        workers = self.config.get("server", {}).get("workers", 1)
        level = str(self.config.get("logging", {}).get("level", "info")).lower()
        if workers <= 1 or level not in ("debug", "info"):
            # Above info the line is not logged: /healthz is all there is.
            return True
        return f" with {workers} workers" in self.stderr_tail(400)

    def _listens(self) -> bool:
        """Our process, or (with workers) one of its children, holds the
        listening socket."""
        assert self.proc is not None
        return any(owns_listener(pid, self.port) for pid in descendants(self.proc.pid))

    def _health_status(self) -> int | None:
        try:
            if self.tls is None:
                return http("GET", self.url + "/healthz", timeout=2)[0]
            with urllib.request.urlopen(self.url + "/healthz", timeout=2,
                                        context=self.tls) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def kill9(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut of the process."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        assert self.proc is not None, "blobd was never started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
                raise TimeoutError(f"blobd did not stop within {timeout}s of SIGTERM:\n"
                                   f"{self.stderr_tail()}") from None
        return self._reap()

    def stop(self) -> None:
        """Stop whatever is running, however; never raises for a dead process."""
        for sampler in self._samplers:
            sampler.stop()
        self._samplers.clear()
        if self.running:
            try:
                self.terminate()
            except TimeoutError:
                pass  # terminate() has already killed it
        self._reap()

    def _reap(self) -> int:
        if self.proc is None:
            return 0
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(15)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- facts ---------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "blobd was never started"
        return self.proc.pid

    def workers(self) -> list[int]:
        """Pids of the worker processes (``[server] workers`` > 1)."""
        return sorted(children(self.pid))

    def state(self) -> str:
        """For failure messages: is it running, and what did it last say."""
        if self.proc is None:
            return "blobd was never started"
        code = self.proc.poll()
        status = f"running as pid {self.proc.pid}" if code is None else f"exited with {code}"
        return f"blobd {status} on {self.url}; stderr tail:\n{self.stderr_tail()}"

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = Path(self.stderr_path).read_text(errors="replace")
        except (AttributeError, FileNotFoundError):
            return "(no stderr)"
        return "\n".join(text.splitlines()[-lines:]) or "(stderr is empty)"

    # -- tokens --------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a ``blobd`` command against this server's config (or, with the
        embedded defaults, in its working directory with no config)."""
        if not self.embedded_defaults:
            if not self.config_path.exists():
                self._write_config()
            args = (*args, "-c", str(self.config_path))
        return run_blobd(*args, cwd=self.workdir, timeout=timeout)

    def token(self, owner: str = "alice", scopes: str = "read,write") -> str:
        """A new token, made by the functions ``blobd token create`` runs,
        in this process: starting the command took most of its time, about
        a hundred times a suite run (tests/test_cli.py runs the command
        itself). Under a wrapper (another user's server) or the embedded
        defaults it comes from the command."""
        if self.wrapper or self.embedded_defaults:
            return self._token_from_command(owner, scopes)
        if not self.config_path.exists():
            self._write_config()
        work = _make_token(self.config_path, owner, scopes)
        # A thread of its own: the caller may be a test's event loop.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, work).result()

    def _token_from_command(self, owner: str, scopes: str) -> str:
        """A new token from ``blobd token create``: its last stdout line."""
        result = self.cli("token", "create", "--owner", owner, "--scopes", scopes)
        if result.returncode != 0:
            raise RuntimeError(f"blobd token create failed ({result.returncode}):\n"
                               f"{result.stderr}")
        return result.stdout.strip().splitlines()[-1]

    # -- memory --------------------------------------------------------------

    def rss(self) -> int:
        """Resident set size now, in bytes."""
        return (read_status_kib(self.pid, "VmRSS") or 0) * 1024

    def rss_hwm(self) -> int:
        """The kernel's own high-water mark of the resident set, in bytes."""
        return (read_status_kib(self.pid, "VmHWM") or 0) * 1024

    @contextmanager
    def sample_rss(self, interval: float = 0.02) -> Iterator[RssSampler]:
        """Sample VmRSS every ``interval`` seconds for the block's duration."""
        sampler = RssSampler(self.pid, interval)
        self._samplers.append(sampler)
        sampler.start()
        try:
            yield sampler
        finally:
            sampler.stop()
            if sampler in self._samplers:
                self._samplers.remove(sampler)
            self._samples.extend(sampler.samples)

    @property
    def rss_peak(self) -> int:
        """The highest VmRSS any :meth:`sample_rss` block saw, in bytes."""
        return max(self._samples, default=0)


class _PortTaken(Exception):
    pass

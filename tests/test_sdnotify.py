"""blobd.sdnotify against real Unix datagram sockets and real passed fds."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from blobd import sdnotify
from blobd.sdnotify import Notifier, listen_fds, notify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bound_receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture(params=["path", "abstract"])
def receiver(request, tmp_path, monkeypatch):
    """A datagram socket playing systemd, with $NOTIFY_SOCKET pointing at it."""
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        env_value = address
    else:
        name = f"blobd-test-{uuid.uuid4().hex}"
        address = "\0" + name
        env_value = "@" + name
    sock = _bound_receiver(address)
    monkeypatch.setenv("NOTIFY_SOCKET", env_value)
    yield sock
    sock.close()


def _received(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


def _assert_nothing_pending(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_notify_sends_the_message_verbatim(receiver):
    assert notify("READY=1\nSTATUS=hello") is True
    assert _received(receiver) == "READY=1\nSTATUS=hello"


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda n: n.ready(), "READY=1"),
        (lambda n: n.ready("serving on 127.0.0.1:8420"), "READY=1\nSTATUS=serving on 127.0.0.1:8420"),
        (lambda n: n.stopping(), "STOPPING=1"),
        (lambda n: n.stopping("draining 2 uploads"), "STOPPING=1\nSTATUS=draining 2 uploads"),
        (lambda n: n.status("mirror: 3 queued"), "STATUS=mirror: 3 queued"),
        (lambda n: n.watchdog(), "WATCHDOG=1"),
    ],
    ids=["ready", "ready-status", "stopping", "stopping-status", "status", "watchdog"],
)
def test_notifier_messages(receiver, call, expected):
    assert call(Notifier()) is True
    assert _received(receiver) == expected


def test_status_newlines_cannot_inject_assignments(receiver):
    Notifier().status("line one\nWATCHDOG=1")
    assert _received(receiver) == "STATUS=line one WATCHDOG=1"


def test_utf8_status(receiver):
    Notifier().status("Café – 3 blobs")
    assert _received(receiver) == "STATUS=Café – 3 blobs"


def test_not_under_systemd_is_false(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    assert Notifier().ready() is False


def test_unusable_address_is_false(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert notify("READY=1") is False


def test_vanished_socket_is_false_not_an_exception(tmp_path, monkeypatch):
    path = tmp_path / "gone.sock"
    _bound_receiver(str(path)).close()  # the file stays, nobody listens
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "never-existed.sock"))
    assert notify("READY=1") is False


def test_full_receiver_queue_does_not_block(tmp_path, monkeypatch):
    """Nobody reads: sends must fail fast (EAGAIN), never stall the caller."""
    path = str(tmp_path / "full.sock")
    sock = _bound_receiver(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    started = time.monotonic()
    results = [notify("X=" + "y" * 1000) for _ in range(5000)]
    elapsed = time.monotonic() - started
    sock.close()
    assert results[0] is True
    assert results[-1] is False, "the queue never filled; test proves nothing"
    assert elapsed < 5


# --- watchdog -------------------------------------------------------------


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "250000", "WATCHDOG_PID": "{pid}"}, 0.25),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
    ids=["usec", "own-pid", "other-pid", "zero", "unset"],
)
def test_watchdog_interval(monkeypatch, env, expected):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(pid=os.getpid(), other=os.getpid() + 1))
    assert Notifier().watchdog_interval() == expected


@pytest.mark.parametrize("key, value", [("WATCHDOG_USEC", "30s"), ("WATCHDOG_PID", "-1")])
def test_watchdog_interval_rejects_garbage(monkeypatch, key, value):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=key):
        Notifier().watchdog_interval()


async def test_run_watchdog_pings_at_half_the_interval(receiver):
    interval = 0.2  # pings every 0.1 s
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    receiver.setblocking(False)

    def on_datagram() -> None:
        assert receiver.recv(4096) == b"WATCHDOG=1"
        arrivals.append(loop.time())

    loop.add_reader(receiver.fileno(), on_datagram)
    task = asyncio.create_task(Notifier().run_watchdog(interval))
    await asyncio.sleep(1.05)  # pings due at 0, 0.1, ..., 1.0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.25)  # a stopped task must not ping again
    loop.remove_reader(receiver.fileno())

    # The mean gap tolerates a late tick on a busy machine; pinging at the
    # full interval (6 pings) or flooding would both fall outside.
    assert 9 <= len(arrivals) <= 12, arrivals
    mean_gap = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
    assert 0.09 <= mean_gap <= 0.13, mean_gap
    assert loop.time() - arrivals[-1] >= 0.25


async def test_run_watchdog_rejects_non_positive_interval():
    with pytest.raises(ValueError):
        await Notifier().run_watchdog(0)


async def test_watchdog_pid_mismatch_disables_it(receiver, monkeypatch):
    """What the daemon does: only run the task when an interval is armed."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier().watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    interval = Notifier().watchdog_interval()
    assert interval == 0.2
    task = asyncio.create_task(Notifier().run_watchdog(interval))
    await asyncio.sleep(0.05)
    task.cancel()
    assert await asyncio.to_thread(_received, receiver) == "WATCHDOG=1"


# --- socket activation -------------------------------------------------------

# The child reports what listen_fds() gave it, then proves the socket is the
# one the parent made by accepting a connection on it.
CHILD = """
import json, os, sys
from blobd.sdnotify import listen_fds
socks = listen_fds()
report = {
    "fds": [s.fileno() for s in socks],
    "families": [int(s.family) for s in socks],
    "types": [int(s.type) for s in socks],
    "inheritable": [os.get_inheritable(s.fileno()) for s in socks],
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
print(json.dumps(report), flush=True)
if socks:
    conn, _ = socks[0].accept()
    conn.sendall(b"hello from fd %d" % socks[0].fileno())
    conn.close()
"""


class Child:
    """A python child whose fd 3 is `listener`, as systemd would start it.

    subprocess can keep a descriptor (pass_fds) but not renumber it, and
    LISTEN_PID must be the child's own pid, known only after fork. So:
    posix_spawn a shell with the socket dup2'ed to fd 3 (dup2 clears
    close-on-exec), and let the shell set LISTEN_PID=$$ before it execs
    python, which keeps that pid.
    """

    SCRIPT = ': "${LISTEN_PID:=$$}"; export LISTEN_PID; exec "$0" -c "$1"'

    def __init__(self, env_extra: dict[str, str], listener: socket.socket):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        env.update(env_extra, PYTHONPATH=ROOT)
        read_end, write_end = os.pipe()
        actions = [
            (os.POSIX_SPAWN_DUP2, write_end, 1),
            (os.POSIX_SPAWN_DUP2, listener.fileno(), 3),
        ]
        argv = ["/bin/sh", "-c", self.SCRIPT, sys.executable, CHILD]
        self.pid = os.posix_spawn("/bin/sh", argv, env, file_actions=actions)
        os.close(write_end)
        self.stdout = os.fdopen(read_end)
        self.returncode: int | None = None

    def report(self) -> dict:
        line = self.stdout.readline()
        assert line, f"child died: rc={self.wait()}"
        return json.loads(line)

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def close(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, 9)
            self.wait()
        self.stdout.close()


def test_listen_fds_in_child_gets_the_socket_at_fd_3():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    child = Child({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}, listener)
    try:
        report = child.report()
        assert report["fds"] == [3]
        assert report["families"] == [socket.AF_INET]
        assert report["types"] == [socket.SOCK_STREAM]
        assert report["inheritable"] == [False]
        assert report["env_left"] == []
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            assert conn.recv(100) == b"hello from fd 3"
        assert child.wait() == 0
    finally:
        listener.close()
        child.close()


def test_listen_fds_for_another_pid_is_ignored_but_unset():
    listener = socket.create_server(("127.0.0.1", 0))
    child = Child({"LISTEN_FDS": "1", "LISTEN_PID": "1"}, listener)
    try:
        assert child.report() == {
            "fds": [], "families": [], "types": [], "inheritable": [], "env_left": [],
        }
        assert child.wait() == 0
    finally:
        listener.close()
        child.close()


def test_listen_fds_without_activation_is_empty(monkeypatch):
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        monkeypatch.delenv(key, raising=False)
    assert listen_fds() == []


def test_listen_fds_malformed_raises_and_still_unsets(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "two")
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        listen_fds()
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ


def test_listen_fds_under_systemd_socket_activate(tmp_path):
    """The real thing: systemd's own activator passes the socket."""
    port = _free_port()
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
         "--fdname=http", sys.executable, "-c", CHILD],
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        conn = _connect_with_retry(port)
        report = json.loads(proc.stdout.readline())
        assert report["fds"] == [3]
        assert report["types"] == [socket.SOCK_STREAM]
        assert report["env_left"] == []
        assert conn.recv(100) == b"hello from fd 3"
        conn.close()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _connect_with_retry(port: int) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_module_constant_matches_sd_listen_fds():
    assert sdnotify.SD_LISTEN_FDS_START == 3

"""Stand-in for `blobd serve` in run-trial.sh.

It speaks to a real systemd through blobd.sdnotify exactly as the server is
meant to (listen_fds, READY/STATUS, watchdog, STOPPING) and serves, on
GET /, a JSON report of what the sandbox lets it do. With WEDGE=1 it blocks
its own event loop, to show the watchdog restarting it.
"""

import asyncio
import mmap
import os
import resource
import signal
import socket
import sys
import time

sys.path[:0] = os.environ["BLOBD_TRIAL_PATH"].split(":")

import aiosqlite  # noqa: E402  (found through BLOBD_TRIAL_PATH)
import blake3  # noqa: E402
from aiohttp import web  # noqa: E402

from blobd.sdnotify import Notifier, listen_fds  # noqa: E402

READ_PROBES = ("/home", "/root", "/etc/blobd/blobd.toml", "/proc/1/cmdline", "/proc/stat")
WRITE_PROBES = ("/var/lib/blobd/probe", "/etc/probe", "/tmp/probe", "/work/probe")


def _outcome(action) -> str:
    try:
        result = action()
    except OSError as exc:
        return f"error {exc.errno} ({os.strerror(exc.errno)})"
    return result or "ok"


def _read(path: str) -> str:
    if os.path.isdir(path):
        os.listdir(path)
    else:
        with open(path, "rb") as f:
            f.read()
    return "readable"


def _write(path: str) -> str:
    with open(path, "w") as f:
        f.write("x")
    return f"writable, mode {oct(os.stat(path).st_mode & 0o777)}"


def probe() -> dict:
    """What this process may do; blocking, so it runs in a thread."""
    report = {"uid": os.getuid(), "gid": os.getgid(), "argv": sys.argv}
    report |= {path: _outcome(lambda p=path: _read(p)) for path in READ_PROBES}
    report |= {path: _outcome(lambda p=path: _write(p)) for path in WRITE_PROBES}
    rwx = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    report["wx_mmap"] = _outcome(lambda: mmap.mmap(-1, 4096, prot=rwx) and "allowed")
    report["setuid"] = _outcome(lambda: os.setuid(0))
    report["netlink"] = _outcome(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close())
    report["setaffinity"] = _outcome(lambda: os.sched_setaffinity(0, {0}))
    report["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)
    report["pids_visible"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return report


async def touch_index() -> None:
    async with aiosqlite.connect("/var/lib/blobd/index.sqlite") as db:
        await db.execute("create table if not exists t (h)")
        await db.execute("insert into t values (?)", (blake3.blake3(b"x").hexdigest(),))
        await db.commit()


async def main() -> None:
    notifier = Notifier()
    sockets = listen_fds()
    interval = notifier.watchdog_interval()
    await touch_index()
    report = await asyncio.to_thread(probe)
    report |= {"listen_fds": [s.fileno() for s in sockets], "watchdog": interval}

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(report)

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    if sockets:
        site = web.SockSite(runner, sockets[0])
    else:
        site = web.TCPSite(runner, "127.0.0.1", 8420)
    await site.start()

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    watchdog = asyncio.create_task(notifier.run_watchdog(interval)) if interval else None
    notifier.ready("serving (stand-in)")
    if os.environ.get("WEDGE"):
        await asyncio.sleep(1)
        time.sleep(3600)  # blocks the loop on purpose: the watchdog must fire
    await stop.wait()
    notifier.stopping("draining")
    if watchdog:
        watchdog.cancel()
    await runner.cleanup()


asyncio.run(main())

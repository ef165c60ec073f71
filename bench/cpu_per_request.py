"""CPU per small upload, the figure that survives a busy machine.

    python -m bench.cpu_per_request blobd-fsync --workers 2
    python -m bench.cpu_per_request seaweedfs --duration 10

Starts one server (as bench/run.py does), runs the small-PUT load against it
(two `bench.load` processes x 16 connections, 64 KiB unique bodies) and
prints requests per second, the server's CPU time per request (user and
system, summed over its whole process tree, from /proc) and how idle the
machine stayed. A server that leaves the CPUs idle while its clients wait
is waiting on something (a lock, a disk flush, a thread hand-off); one that
uses them all is bounded by the CPU time each request costs. That split is
what decided every change in bench/README.md's profiling notes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import procs, servers

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` and all its descendants."""
    user = system = 0
    for p in [pid, *procs.descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        user, system = user + int(fields[11]), system + int(fields[12])
    return user / TICK, system / TICK


def machine_ticks() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def start(kind: str, root: Path, workers: int) -> servers.Server:
    if kind == "seaweedfs":
        return servers.start_seaweedfs(root)
    if kind == "nginx":
        return servers.start_nginx(root)
    if kind in ("blobd-fsync", "blobd-nofsync"):
        name = "blobd(fsync)" if kind == "blobd-fsync" else "blobd(nofsync)"
        return servers.start_blobd(root, name, kind == "blobd-fsync", workers)
    raise SystemExit(f"unknown server {kind!r}")


def measure(server: servers.Server, duration: float) -> dict[str, float]:
    start_at = time.time() + 1.5
    argv = [sys.executable, "-m", "bench.load", "--base-url", server.base_url,
            "--method", server.upload_method, "--path", server.upload_path,
            "--connections", "16", "--duration", str(duration),
            "--start-at", str(start_at)]
    for name, value in server.headers.items():
        argv += ["--header", f"{name}: {value}"]
    loads = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE) for _ in range(2)]
    time.sleep(max(0.0, start_at - time.time()))
    cpu0, ticks0 = tree_cpu_seconds(server.proc.pid), machine_ticks()
    time.sleep(duration)
    cpu1, ticks1 = tree_cpu_seconds(server.proc.pid), machine_ticks()
    results = [json.loads(p.communicate()[0].decode().splitlines()[-1]) for p in loads]
    done = sum(r["requests"] for r in results)
    errors = sum(r["errors"] for r in results)
    ticks = [b - a for a, b in zip(ticks0, ticks1)]
    per_request = 1e6 / max(done, 1)
    return {"requests_per_s": done / duration, "errors": errors,
            "user_us": (cpu1[0] - cpu0[0]) * per_request,
            "system_us": (cpu1[1] - cpu0[1]) * per_request,
            "server_cores": (sum(cpu1) - sum(cpu0)) / duration,
            "machine_idle": ticks[3] / sum(ticks), "iowait": ticks[4] / sum(ticks)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_per_request",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("server", choices=["blobd-fsync", "blobd-nofsync", "nginx", "seaweedfs"])
    parser.add_argument("--workers", type=int, default=1, help="blobd's [server] workers")
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="blobd-cpu-") as tmp:
        server = start(args.server, Path(tmp), args.workers)
        try:
            m = measure(server, args.duration)
        finally:
            procs.stop_tree(server.proc)
    print(f"{args.server}: {m['requests_per_s']:,.0f} req/s ({m['errors']} errors),"
          f" CPU per request {m['user_us']:.0f} us user + {m['system_us']:.0f} us system"
          f" ({m['server_cores']:.2f} cores), machine idle {m['machine_idle']:.0%},"
          f" iowait {m['iowait']:.0%}")
    return 1 if m["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

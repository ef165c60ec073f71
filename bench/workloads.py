"""The workloads: what is measured, and how.

Per-server workloads take a running `Server` and return {metric: value}.
The same client drives every server: curl for single large streams, wrk for
small GETs, bench/load.py for small uploads. Only the method, the path and
(for blobd) the Authorization header differ. Sizes are bytes; MB is 10^6 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiohttp
import blake3

from bench import payloads, procs
from bench.servers import REPO_ROOT, Server, ensure_debian_tool

MIB = 1024 * 1024
BENCH_DIR = Path(__file__).resolve().parent


class WorkloadError(RuntimeError):
    """A measurement could not be taken or is invalid; the message says why."""


@dataclass(frozen=True)
class Settings:
    quick: bool
    reps: int
    large_size: int
    small_size: int
    small_objects: int
    duration_s: float
    small_get_connections: int
    small_put_connections: int
    load_processes: int
    wrk_threads: int
    rss_streams: int
    rss_size: int
    index_sizes: tuple[int, ...]
    index_samples: int
    dd_size: int
    hash_size: int
    blobd_workers: int = 1

    @classmethod
    def for_mode(cls, quick: bool) -> "Settings":
        cpus = os.cpu_count() or 1
        return cls(
            quick=quick, reps=1 if quick else 3,
            large_size=(256 if quick else 1024) * MIB, small_size=64 * 1024,
            small_objects=256 if quick else 1000, duration_s=3.0 if quick else 15.0,
            small_get_connections=64, small_put_connections=32,
            load_processes=min(2, cpus), wrk_threads=min(2, cpus),
            rss_streams=8, rss_size=(64 if quick else 256) * MIB,
            index_sizes=(1_000, 1_000_000), index_samples=500 if quick else 2000,
            dd_size=(256 if quick else 1024) * MIB, hash_size=(128 if quick else 512) * MIB,
        )


@dataclass(frozen=True)
class Metric:
    workload: str
    label: str
    unit: str
    higher_is_better: bool
    aggregate: str = "median"       # over repetitions; "max" for peaks


METRICS: dict[str, Metric] = {
    "large_get_mb_s": Metric("large_get", "large GET, 1 stream", "MB/s", True),
    "large_put_mb_s": Metric("large_put", "large PUT, 1 stream", "MB/s", True),
    "small_get_rps": Metric("small_get", "small GET 64 KiB, 64 conns", "req/s", True),
    "small_get_p99_ms": Metric("small_get", "small GET p99", "ms", False),
    "small_put_rps": Metric("small_put", "small PUT 64 KiB, 32 conns", "req/s", True),
    "small_put_p99_ms": Metric("small_put", "small PUT p99", "ms", False),
    "rss_peak_mb": Metric("rss", "peak RSS, 8 parallel PUTs", "MB", False, "max"),
    "pss_peak_mb": Metric("rss", "peak PSS, 8 parallel PUTs", "MB", False, "max"),
    "dd_fsync_mb_s": Metric("limits", "disk: dd conv=fsync", "MB/s", True),
    "blake3_mb_s": Metric("limits", "BLAKE3, 1 thread", "MB/s", True),
    "sha256_mb_s": Metric("limits", "SHA-256, 1 thread", "MB/s", True),
}


def index_metric_keys(n: int) -> dict[str, Metric]:
    """Metrics of the index-scale workload at n indexed blobs."""
    return {
        f"index_startup_s@{n}": Metric("index_scale", f"start-up, {n:,} blobs", "s", False),
        f"index_head_p50_ms@{n}": Metric("index_scale", f"HEAD p50, {n:,} blobs", "ms", False),
        f"index_head_p99_ms@{n}": Metric("index_scale", f"HEAD p99, {n:,} blobs", "ms", False),
        f"index_get_p50_ms@{n}": Metric("index_scale", f"GET 64 KiB p50, {n:,} blobs", "ms", False),
    }


# ---------------------------------------------------------------- shared state


class Bench:
    """What the workloads share: settings, an HTTP session, payload files and seeded objects."""

    def __init__(self, settings: Settings, root: Path, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.root = root
        self.session = session
        self.payload_dir = root / "payloads"
        self.payload_dir.mkdir(exist_ok=True)
        self.large_get_path: dict[str, str] = {}     # server name -> path of its large object
        self.small_paths_file: dict[str, Path] = {}  # server name -> file of small-object paths
        # One large file serves both: seeded for large_get, then restamped for each large_put.
        self.large_file = self.payload_dir / "large.bin"
        self.rss_files = [self.payload_dir / f"rss-{i}.bin" for i in range(settings.rss_streams)]
        self.hashes: dict[Path, str] = {}

    async def prepare_payloads(self, selected: list[str]) -> None:
        """Write the payload files the selected workloads upload, and hash them."""
        s = self.settings
        wanted = [(self.large_file, s.large_size)] if {"large_get", "large_put"} & set(selected) else []
        wanted += [(f, s.rss_size) for f in self.rss_files] if "rss" in selected else []
        for path, size in wanted:
            await asyncio.to_thread(payloads.write_payload, path, size)
            self.hashes[path] = await asyncio.to_thread(payloads.blake3_file, path)

    async def new_contents(self, files: list[Path]) -> None:
        """Fresh content (and BLAKE3) for files about to be uploaded again: nothing a server
        stored before (seeded objects, earlier repetitions) can be deduplicated against."""
        for path in files:
            self.hashes[path] = await asyncio.to_thread(payloads.restamp, path)

    async def seed(self, server: Server, large: bool, small: bool) -> None:
        """Store what the GET workloads read: one large object and many small ones."""
        if large:
            target = server.object_path("large-get", self.hashes[self.large_file])
            await curl_put(server, target, self.large_file)
            self.large_get_path[server.name] = target
        if small:
            bodies = payloads.small_bodies(self.settings.small_objects, self.settings.small_size)
            paths = [server.object_path(key, digest) for key, _, digest in bodies]
            await put_many(self.session, server.base_url, server.headers,
                           [(p, body) for p, (_, body, _) in zip(paths, bodies)])
            paths_file = server.workdir / "small-paths.txt"
            paths_file.write_text("\n".join(paths) + "\n")
            self.small_paths_file[server.name] = paths_file

    async def delete(self, server: Server, path: str) -> None:
        """Best effort, untimed: keeps the disk from filling up over repetitions."""
        with contextlib.suppress(aiohttp.ClientError):
            async with self.session.delete(server.base_url + path, headers=server.headers) as resp:
                await resp.read()


# ---------------------------------------------------------------- clients


async def run_process(argv: list[str], timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a command to completion; kill it if it overruns or we are cancelled."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def curl(server: Server, path: str, extra: list[str], timeout_s: float = 600) -> dict:
    """One curl transfer, body discarded; returns curl's own %{json} figures."""
    headers = [a for k, v in server.headers.items() for a in ("-H", f"{k}: {v}")]
    argv = [ensure_debian_tool("curl", "curl"), "-sS", "-o", "/dev/null", "-w", "%{json}", *headers, *extra, server.base_url + path]
    rc, out, err = await run_process(argv, timeout_s)
    if rc != 0:
        raise WorkloadError(f"curl exited {rc}: {err.strip()}")
    return json.loads(out)


async def curl_put(server: Server, path: str, file: Path) -> dict:
    # "Expect:" drops curl's 100-continue round trip, which not every server answers at once.
    info = await curl(server, path, ["-T", str(file), "-H", "Expect:",
                                     "-H", "Content-Type: application/octet-stream"])
    if info["http_code"] not in (200, 201, 204):
        raise WorkloadError(f"PUT {path} answered HTTP {info['http_code']}")
    return info


async def put_many(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str],
                   items: list[tuple[str, bytes]], concurrency: int = 16) -> None:
    """PUT every (path, body), concurrency at a time; any failure raises."""
    queue = list(reversed(items))

    async def one_worker() -> None:
        while queue:
            path, body = queue.pop()
            async with session.put(base_url + path, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status not in (200, 201, 204):
                    raise WorkloadError(f"seeding PUT {path} answered HTTP {resp.status}")

    await asyncio.gather(*(one_worker() for _ in range(concurrency)))


def mb_per_s(size: float, seconds: float) -> float:
    return size / seconds / 1e6


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        raise WorkloadError("no successful requests")
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[int(rank) - 1]


# ---------------------------------------------------------------- per-server workloads


async def large_get(bench: Bench, server: Server) -> dict[str, float]:
    """One stream GET of the large object, bytes discarded by curl. An untimed GET goes
    first: the other workloads write gigabytes in between, and whether a server's copy
    was still in the page cache would otherwise decide more than the server does."""
    await curl(server, bench.large_get_path[server.name], [])
    info = await curl(server, bench.large_get_path[server.name], [])
    if info["http_code"] != 200 or info["size_download"] != bench.settings.large_size:
        raise WorkloadError(f"GET answered HTTP {info['http_code']} with {info['size_download']} bytes")
    return {"large_get_mb_s": mb_per_s(info["size_download"], info["time_total"])}


async def large_put(bench: Bench, server: Server) -> dict[str, float]:
    """One stream PUT of a large file (new content each repetition; blobd's hash known beforehand)."""
    file = bench.large_file
    path = server.object_path(f"large-put-{bench.hashes[file][:16]}", bench.hashes[file])
    info = await curl_put(server, path, file)
    if info["size_upload"] != bench.settings.large_size:
        raise WorkloadError(f"curl uploaded {info['size_upload']} bytes")
    await bench.delete(server, path)
    return {"large_put_mb_s": mb_per_s(info["size_upload"], info["time_total"])}


async def small_get(bench: Bench, server: Server) -> dict[str, float]:
    """wrk, 64 connections, rotating over the seeded 64 KiB objects for the duration."""
    s = bench.settings
    wrk = ensure_debian_tool("wrk", "wrk")
    auth = server.headers.get("Authorization", "")
    argv = [wrk, f"-t{s.wrk_threads}", f"-c{s.small_get_connections}", f"-d{s.duration_s:g}s",
            "--timeout", "10s", "-s", str(BENCH_DIR / "wrk_paths.lua"), server.base_url,
            "--", str(bench.small_paths_file[server.name]), auth]
    rc, out, err = await run_process(argv, s.duration_s + 60)
    found = re.search(r"^BENCH_JSON (.*)$", out, re.MULTILINE)
    if rc != 0 or not found:
        raise WorkloadError(f"wrk exited {rc}: {(err or out).strip()[-300:]}")
    r = json.loads(found.group(1))
    socket_errors = r["errors_connect"] + r["errors_read"] + r["errors_write"] + r["errors_timeout"]
    if r["errors_status"] or socket_errors > r["requests"] // 1000:
        raise WorkloadError(f"wrk saw {r['errors_status']} HTTP errors and {socket_errors} socket errors "
                            f"in {r['requests']} requests")
    return {"small_get_rps": r["requests"] / (r["duration_us"] / 1e6),
            "small_get_p99_ms": r["p99_us"] / 1000.0}


async def small_put(bench: Bench, server: Server) -> dict[str, float]:
    """bench/load.py processes, 32 connections in all, unique 64 KiB bodies for the duration."""
    s = bench.settings
    per_proc = split_evenly(s.small_put_connections, s.load_processes)
    start_at = time.time() + 1.5        # lets every process import aiohttp before the window opens
    headers = [a for k, v in server.headers.items() for a in ("--header", f"{k}: {v}")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    runs = [run_process([sys.executable, "-m", "bench.load", "--base-url", server.base_url,
                         "--method", server.upload_method, "--path", server.upload_path,
                         "--connections", str(n), "--duration", str(s.duration_s),
                         "--body-size", str(s.small_size), "--start-at", repr(start_at), *headers],
                        s.duration_s + 120, env) for n in per_proc]
    latencies: list[float] = []
    for rc, out, err in await asyncio.gather(*runs):
        if rc != 0:
            raise WorkloadError(f"bench.load exited {rc}: {err.strip()[-300:]}")
        r = json.loads(out)
        if r["errors"]:
            raise WorkloadError(f"{r['errors']} failed uploads, e.g. {r['error_sample']}")
        latencies.extend(r["latencies_ms"])
    latencies.sort()
    return {"small_put_rps": len(latencies) / s.duration_s,
            "small_put_p99_ms": percentile(latencies, 99)}


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def peak_rss(bench: Bench, server: Server) -> dict[str, float]:
    """Peak RSS of the server's process tree, sampled every 50 ms during parallel large PUTs."""
    paths = [server.object_path(f"rss-{bench.hashes[f][:16]}", bench.hashes[f]) for f in bench.rss_files]
    sampler = RssSampler(server.pid)
    pss = RssSampler(server.pid, measure=procs.tree_pss_bytes, interval_s=0.2)
    sampler.start()
    pss.start()
    try:
        await asyncio.gather(*(curl_put(server, p, f) for p, f in zip(paths, bench.rss_files)))
    finally:
        sampler.stop()
        pss.stop()
    for path in paths:
        await bench.delete(server, path)
    return {"rss_peak_mb": sampler.peak / 1e6, "pss_peak_mb": pss.peak / 1e6}


class RssSampler:
    """Samples a process tree's memory (RSS unless told) every interval_s in a thread,
    keeping the peak."""

    def __init__(self, pid: int, interval_s: float = 0.05,
                 measure: Callable[[int], int] = procs.tree_rss_bytes) -> None:
        self.pid, self.interval_s, self.peak, self.measure = pid, interval_s, 0, measure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.peak = self.measure(self.pid)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.measure(self.pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.measure(self.pid))


PER_SERVER = {
    "large_get": large_get,
    "large_put": large_put,
    "small_get": small_get,
    "small_put": small_put,
    "rss": peak_rss,
}


# ---------------------------------------------------------------- machine limits


async def limits(bench: Bench) -> dict[str, float]:
    """What the machine allows: sequential write with fsync, single-thread hashing."""
    s = bench.settings
    target = bench.root / "dd.bin"
    dd = shutil.which("dd") or "dd"
    rc, out, err = await run_process([dd, "if=/dev/zero", f"of={target}", "bs=1M",
                                      f"count={s.dd_size // MIB}", "conv=fsync"], 600)
    target.unlink(missing_ok=True)
    found = re.search(r"^(\d+) bytes .* copied, ([\d.,]+) s", err, re.MULTILINE)
    if rc != 0 or not found:
        raise WorkloadError(f"dd exited {rc}: {err.strip()[-200:]}")
    seconds = float(found.group(2).replace(",", "."))
    blake3_rate, sha256_rate = await asyncio.to_thread(hash_rates, s.hash_size)
    return {"dd_fsync_mb_s": mb_per_s(int(found.group(1)), seconds),
            "blake3_mb_s": blake3_rate, "sha256_mb_s": sha256_rate}


def hash_rates(size: int) -> tuple[float, float]:
    data = os.urandom(size)
    start = time.perf_counter()
    blake3.blake3(data, max_threads=1).digest()
    mid = time.perf_counter()
    hashlib.sha256(data).digest()
    end = time.perf_counter()
    return mb_per_s(size, mid - start), mb_per_s(size, end - mid)

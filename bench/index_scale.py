"""Index-scale workload (blobd only): does a big index slow start-up or lookups?

For each n (1,000 and 1,000,000): a fresh blobd (fsync on) creates its
schema, is stopped, gets n synthetic rows straight into SQLite
(bench/populate.py), and is then started STARTS times, timing spawn to the
first 200 from GET /healthz. The last instance then receives UPLOADS real
64 KiB blobs over HTTP, and HEAD and GET latencies are sampled on one
keep-alive connection, one request at a time, round-robin over those blobs.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics

import aiohttp

from bench import payloads, procs
from bench.populate import populate_index
from bench.servers import create_blobd_token, free_ports, launch_blobd, write_blobd_config
from bench.workloads import Bench, WorkloadError, percentile, put_many

STARTS = 3
UPLOADS = 100
WARMUP = 50


class NotAvailable(RuntimeError):
    """The workload cannot run in this checkout (populate_index raised ImportError)."""


async def index_scale(bench: Bench) -> dict[str, float]:
    results: dict[str, float] = {}
    for n in bench.settings.index_sizes:
        results.update(await measure_at(bench, n))
    return results


async def measure_at(bench: Bench, n: int) -> dict[str, float]:
    workdir = bench.root / f"index-{n}"
    workdir.mkdir()
    data_dir = workdir / "data"
    (port,) = free_ports(1)
    base_url = f"http://127.0.0.1:{port}"
    cfg = write_blobd_config(workdir, data_dir, port, fsync=True,
                             workers=bench.settings.blobd_workers)
    headers = {"Authorization": f"Bearer {await asyncio.to_thread(create_blobd_token, cfg, workdir)}"}
    proc = None
    try:
        proc, _ = await asyncio.to_thread(launch_blobd, cfg, workdir, base_url)   # creates the schema
        procs.stop_tree(proc)
        try:
            await asyncio.to_thread(populate_index, data_dir, n)
        except ImportError as exc:
            raise NotAvailable(f"populate_index: {exc}") from exc
        startups = []
        for attempt in range(STARTS):
            if attempt:
                procs.stop_tree(proc)
            proc, seconds = await asyncio.to_thread(launch_blobd, cfg, workdir, base_url)
            startups.append(seconds)
        return {f"index_startup_s@{n}": statistics.median(startups),
                **await lookup_latencies(bench, base_url, headers, n)}
    finally:
        if proc is not None:
            procs.stop_tree(proc)
        shutil.rmtree(workdir, ignore_errors=True)


async def lookup_latencies(bench: Bench, base_url: str, headers: dict[str, str], n: int) -> dict[str, float]:
    bodies = payloads.small_bodies(UPLOADS, bench.settings.small_size)
    paths = [f"/blobs/{digest}" for _, _, digest in bodies]
    await put_many(bench.session, base_url, headers, [(p, body) for p, (_, body, _) in zip(paths, bodies)])

    samples = bench.settings.index_samples
    head = await sequential_latencies(base_url, headers, "HEAD", paths, samples)
    get = await sequential_latencies(base_url, headers, "GET", paths, samples)
    return {f"index_head_p50_ms@{n}": percentile(head, 50), f"index_head_p99_ms@{n}": percentile(head, 99),
            f"index_get_p50_ms@{n}": percentile(get, 50)}


async def sequential_latencies(base_url: str, headers: dict[str, str], method: str,
                               paths: list[str], count: int) -> list[float]:
    """count requests, one at a time on one connection; sorted latencies in ms, warm-up dropped."""
    loop = asyncio.get_running_loop()
    out = []
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(WARMUP + count):
            start = loop.time()
            async with session.request(method, base_url + paths[i % len(paths)], headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise WorkloadError(f"{method} {paths[i % len(paths)]} answered HTTP {resp.status}")
            if i >= WARMUP:
                out.append((loop.time() - start) * 1000.0)
    return sorted(out)

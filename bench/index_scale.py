"""Index-scale workload (blobd only): does a big index slow start-up or lookups?

For each n (1,000 and 1,000,000): a fresh blobd (fsync on) creates its
schema, is stopped, gets n synthetic rows straight into SQLite
(bench/populate.py), and is then started STARTS times, timing spawn to the
first 200 from GET /healthz. The last instance of each size stays up and
receives UPLOADS real 64 KiB blobs over HTTP. Then HEAD and GET latencies
are sampled one request at a time on one keep-alive connection per
instance, round-robin over its blobs, the instances taking turns request
by request: a stall of the shared machine, or the page cache the workloads
before filled, falls on both sizes alike instead of on whichever ran later.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
from dataclasses import dataclass

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


@dataclass
class Instance:
    """A running blobd holding n synthetic blobs plus UPLOADS real ones."""
    n: int
    base_url: str
    headers: dict[str, str]
    paths: list[str]


async def index_scale(bench: Bench) -> dict[str, float]:
    results: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        instances = []
        for n in bench.settings.index_sizes:
            instance, startup = await stack.enter_async_context(started(bench, n))
            results[f"index_startup_s@{n}"] = startup
            instances.append(instance)
        results.update(await lookup_latencies(bench, instances))
    return results


@contextlib.asynccontextmanager
async def started(bench: Bench, n: int):
    """(instance, median start-up seconds) for a blobd with n blobs indexed;
    stopped and its files removed on exit."""
    workdir = bench.root / f"index-{n}"
    workdir.mkdir()
    data_dir = workdir / "data"
    (port,) = free_ports(1)
    base_url = f"http://127.0.0.1:{port}"
    cfg = write_blobd_config(workdir, data_dir, port, fsync=True,
                             workers=bench.settings.blobd_workers)
    # The synthetic rows have no files: a scrub pass over them would find a
    # million missing blobs while the latencies are sampled.
    cfg.write_text(cfg.read_text() + "\n[scrub]\nbytes_per_second = 0\n")
    proc = None
    try:
        proc, _ = await asyncio.to_thread(launch_blobd, cfg, workdir, base_url)   # creates the schema
        token = await asyncio.to_thread(create_blobd_token, cfg, workdir)
        headers = {"Authorization": f"Bearer {token}"}
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
        bodies = payloads.small_bodies(UPLOADS, bench.settings.small_size)
        paths = [f"/blobs/{digest}" for _, _, digest in bodies]
        await put_many(bench.session, base_url, headers,
                       [(p, body) for p, (_, body, _) in zip(paths, bodies)])
        yield Instance(n, base_url, headers, paths), statistics.median(startups)
    finally:
        if proc is not None:
            procs.stop_tree(proc)
        shutil.rmtree(workdir, ignore_errors=True)


async def lookup_latencies(bench: Bench, instances: list[Instance]) -> dict[str, float]:
    samples = bench.settings.index_samples
    head = await interleaved_latencies(instances, "HEAD", samples)
    get = await interleaved_latencies(instances, "GET", samples)
    out: dict[str, float] = {}
    for instance in instances:
        n = instance.n
        out |= {f"index_head_p50_ms@{n}": percentile(head[n], 50),
                f"index_head_p99_ms@{n}": percentile(head[n], 99),
                f"index_get_p50_ms@{n}": percentile(get[n], 50)}
    return out


async def interleaved_latencies(instances: list[Instance], method: str,
                                count: int) -> dict[int, list[float]]:
    """count requests per instance, one at a time, the instances taking
    turns; sorted latencies in ms per n, warm-up dropped."""
    loop = asyncio.get_running_loop()
    out: dict[int, list[float]] = {instance.n: [] for instance in instances}
    async with contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)))
            for _ in instances]
        for i in range(WARMUP + count):
            for instance, session in zip(instances, sessions):
                path = instance.paths[i % len(instance.paths)]
                start = loop.time()
                async with session.request(method, instance.base_url + path,
                                           headers=instance.headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise WorkloadError(f"{method} {path} answered HTTP {resp.status}")
                if i >= WARMUP:
                    out[instance.n].append((loop.time() - start) * 1000.0)
    return {n: sorted(values) for n, values in out.items()}

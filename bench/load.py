"""Closed-loop HTTP upload load generator: `python -m bench.load --help`.

Each of --connections workers keeps one request in flight on its own
keep-alive connection, sending a fresh unique body every time (the first 16
bytes are a UUID, the rest a random block drawn once), so no server can
deduplicate. The same code drives every server: only the method, the path
and the headers differ. Several of these processes may run side by side; all
start sending at the wall-clock time --start-at, so their windows line up.

Prints one JSON object: requests completed inside the window, errors, an
error sample, and every completed request's latency in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

import aiohttp

OK_STATUSES = {200, 201, 204}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8420")
    p.add_argument("--method", default="PUT", choices=["PUT", "POST"])
    p.add_argument("--path", required=True, help="request path; one ending in '/' gets a UUID appended")
    p.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--duration", type=float, default=5.0, help="seconds of measured load")
    p.add_argument("--body-size", type=int, default=64 * 1024)
    p.add_argument("--start-at", type=float, default=0.0, help="time.time() to begin at (0: now)")
    return p.parse_args(argv)


class Stats:
    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.errors = 0
        self.error_sample: str | None = None

    def error(self, what: str) -> None:
        self.errors += 1
        self.error_sample = self.error_sample or what


async def worker(session: aiohttp.ClientSession, args: argparse.Namespace, headers: dict[str, str],
                 block: bytes, deadline: float, stats: Stats) -> None:
    while True:
        key = uuid.uuid4()
        body = key.bytes + block
        path = f"{args.path}{key.hex}" if args.path.endswith("/") else args.path
        start = time.perf_counter()
        if start >= deadline:
            return
        try:
            async with session.request(args.method, args.base_url + path, data=body, headers=headers) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            stats.error(f"{type(exc).__name__}: {exc}")
            continue
        end = time.perf_counter()
        if end > deadline:
            return          # finished after the window closed: not counted
        if status in OK_STATUSES:
            stats.latencies_ms.append((end - start) * 1000.0)
        else:
            stats.error(f"HTTP {status} for {args.method} {path}")


async def run(args: argparse.Namespace) -> dict:
    headers = dict(h.split(": ", 1) for h in args.header)
    headers.setdefault("Content-Type", "application/octet-stream")
    block = os.urandom(args.body_size - 16)
    stats = Stats()
    connector = aiohttp.TCPConnector(limit=args.connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if args.start_at:
            await asyncio.sleep(max(0.0, args.start_at - time.time()))
        begin = time.perf_counter()
        deadline = begin + args.duration
        await asyncio.gather(*(worker(session, args, headers, block, deadline, stats)
                               for _ in range(args.connections)))
    return {"requests": len(stats.latencies_ms), "errors": stats.errors,
            "error_sample": stats.error_sample, "duration_s": args.duration,
            "latencies_ms": [round(x, 3) for x in stats.latencies_ms]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    json.dump(asyncio.run(run(args)), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

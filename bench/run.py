"""blobd benchmark suite: `python bench/run.py [--quick] [--json OUT] [--only WORKLOAD]`.

Starts blobd (fsync on and off), nginx and SeaweedFS on 127.0.0.1, each in
its own temp dir; runs the workloads round-robin over the servers, once per
repetition, so drift hits them all alike; stops every server by PID (also on
Ctrl-C or an error); prints one table and writes the results as JSON.
A server that does not start is reported as n/a and the others carry on.
See bench/README.md for what each workload measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):       # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench import report, servers
from bench.index_scale import NotAvailable, index_scale
from bench.servers import Server, ServerStartError
from bench.workloads import PER_SERVER, Bench, Settings, WorkloadError, limits

WORKLOADS = [*PER_SERVER, "index_scale", "limits"]
SEEDED = ("large_get", "small_get")         # workloads that read objects stored beforehand
STARTERS = {
    report.BLOBD: lambda root, s: servers.start_blobd(root, report.BLOBD, True, s.blobd_workers),
    report.BLOBD_NOFSYNC: lambda root, s: servers.start_blobd(root, report.BLOBD_NOFSYNC, False,
                                                              s.blobd_workers),
    "nginx": lambda root, s: servers.start_nginx(root),
    "seaweedfs": lambda root, s: servers.start_seaweedfs(root),
}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 3 s loads, 1 repetition (~80 s)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--only", help=f"comma-separated workloads out of: {', '.join(WORKLOADS)}")
    p.add_argument("--servers", help=f"comma-separated servers out of: {', '.join(STARTERS)} (default all)")
    p.add_argument("--reps", type=int, help="repetitions (default 1 with --quick, else 3)")
    p.add_argument("--duration", type=float, help="seconds per small-object load (default 5 quick, 15 full)")
    p.add_argument("--workdir", type=Path, help="where the temp dirs go (default: the system temp dir); "
                                                "pick the disk you want measured")
    p.add_argument("--blobd-workers", type=int, default=1,
                   help="[server] workers for both blobd columns (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (server logs, data) afterwards")
    args = p.parse_args(argv)
    args.only = _choices(args.only, WORKLOADS, "--only")
    args.servers = _choices(args.servers, list(STARTERS), "--servers")
    return args


def _choices(text: str | None, allowed: list[str], flag: str) -> list[str]:
    """Parse a comma list; "blobd" means both blobd columns, "blobd-fsync" is "blobd(fsync)"."""
    if text is None:
        return list(allowed)
    picked: list[str] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        matches = [a for a in allowed if item in (a, a.replace("(", "-").rstrip(")"))] or \
                  [a for a in allowed if a.startswith(item + "(")]
        if not matches:
            raise SystemExit(f"{flag}: unknown {item!r}; choose from {', '.join(allowed)}")
        picked += [m for m in matches if m not in picked]
    return [a for a in allowed if a in picked]


T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def settings_for(args: argparse.Namespace) -> Settings:
    s = Settings.for_mode(args.quick)
    overrides = {k: v for k, v in (("reps", args.reps), ("duration_s", args.duration),
                                   ("blobd_workers", args.blobd_workers)) if v is not None}
    return Settings(**{**s.__dict__, **overrides})


# ---------------------------------------------------------------- servers


async def start_servers(root: Path, names: list[str], results: report.Results,
                        settings: Settings) -> dict[str, Server]:
    """Start the servers side by side; one that fails is logged and marked n/a."""
    async def one(name: str) -> Server | None:
        try:
            return await asyncio.to_thread(STARTERS[name], root, settings)
        except (ServerStartError, OSError) as exc:
            results.unavailable[name] = str(exc)
            log(f"{name}: n/a, did not start: {exc}")
            return None

    started = await asyncio.gather(*(one(n) for n in names))
    running = {s.name: s for s in started if s is not None}
    for s in running.values():
        log(f"{s.name}: {s.base_url} pid {s.pid}, files in {s.workdir}")
    return running


async def attempt(results: report.Results, workload: str, column: str, coro) -> dict[str, float] | None:
    """Run one measurement; a failure is recorded (and shown as ERR) instead of ending the run."""
    try:
        values = await coro
    except (WorkloadError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        results.fail(workload, column, f"{type(exc).__name__}: {exc}")
        log(f"{workload} {column}: FAILED: {type(exc).__name__}: {exc}")
        return None
    except (ServerStartError, NotAvailable):
        raise                  # the caller reports these as n/a / not available
    except Exception as exc:   # a bug in the bench itself: loud, with traceback, but the run goes on
        results.fail(workload, column, f"{type(exc).__name__}: {exc}")
        log(f"{workload} {column}: FAILED with an unexpected error:\n{traceback.format_exc()}")
        return None
    results.add(column, values)
    log(f"{workload:<11} {column:<15} " + "  ".join(f"{k}={report.fmt(v)}" for k, v in values.items()))
    return values


# ---------------------------------------------------------------- the run


async def seed_all(bench: Bench, running: dict[str, Server], selected: list[str],
                   results: report.Results) -> set[str]:
    """Write the payloads and store what the GET workloads read; return the servers that failed."""
    await bench.prepare_payloads(selected)
    large, small = "large_get" in selected, "small_get" in selected
    failed = set()
    for server in running.values() if large or small else []:
        try:
            await bench.seed(server, large, small)
        except (WorkloadError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            failed.add(server.name)
            for workload in [w for w in SEEDED if w in selected]:
                results.fail(workload, server.name, f"seeding failed: {type(exc).__name__}: {exc}")
            log(f"seeding {server.name} FAILED: {type(exc).__name__}: {exc}")
        else:
            log(f"seeded {server.name}")
    return failed


async def run_repetition(bench: Bench, rep: int, running: dict[str, Server], selected: list[str],
                         results: report.Results, unseeded: set[str]) -> None:
    await bench.new_contents(([bench.large_file] if "large_put" in selected else []) +
                             (bench.rss_files if "rss" in selected else []))
    order = list(running.values())
    order = order[rep % len(order):] + order[: rep % len(order)] if order else []
    for workload in [w for w in PER_SERVER if w in selected]:
        for server in order:
            if workload in SEEDED and server.name in unseeded:
                continue        # seeding failed, already reported: nothing to read
            if server.proc.poll() is not None:
                results.fail(workload, server.name, f"server exited with code {server.proc.returncode}")
                continue
            # What the previous measurement left unwritten in the page cache
            # (nginx and SeaweedFS do not fsync: GiBs after the large and RSS
            # loads) would otherwise be flushed by whichever server syncs next.
            await asyncio.to_thread(os.sync)
            await attempt(results, workload, server.name, PER_SERVER[workload](bench, server))
    if "limits" in selected:
        await attempt(results, "limits", report.MACHINE, limits(bench))


async def run_index_scale(bench: Bench, results: report.Results) -> None:
    report.add_index_metrics(results, bench.settings.index_sizes)
    reason = results.unavailable.get(report.BLOBD)
    if reason is None:
        try:
            await attempt(results, "index_scale", report.BLOBD, index_scale(bench))
            return
        except NotAvailable as exc:
            results.not_available["index_scale"] = str(exc)
            log(f"index_scale: not available: {exc}")
            return
        except ServerStartError as exc:
            reason = str(exc)
    results.unavailable.setdefault(report.BLOBD, reason)
    log(f"index_scale: n/a, blobd did not start: {reason}")


async def run(args: argparse.Namespace, results: report.Results, meta: dict) -> dict[str, dict]:
    settings = settings_for(args)
    meta["settings"] = settings.__dict__
    root = Path(tempfile.mkdtemp(prefix="blobd-bench-", dir=args.workdir))
    log(f"temp root {root}")
    running: dict[str, Server] = {}
    try:
        results.selected = [w for w in args.only if w != "index_scale" or report.BLOBD in args.servers]
        per_server = [w for w in PER_SERVER if w in args.only]
        if per_server:
            running = await start_servers(root, args.servers, results, settings)
        timeout = aiohttp.ClientTimeout(total=900)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            bench = Bench(settings, root, session)
            if per_server or "limits" in args.only:
                unseeded = await seed_all(bench, running, args.only, results)
                for rep in range(settings.reps):
                    log(f"repetition {rep + 1}/{settings.reps}")
                    await run_repetition(bench, rep, running, args.only, results, unseeded)
            # index_scale runs a server of its own: the others would only
            # take CPU and page cache from it.
            await asyncio.to_thread(servers.stop_procs, [s.proc for s in running.values()])
            if "index_scale" in args.only:
                if report.BLOBD in args.servers:
                    await run_index_scale(bench, results)
                else:
                    log(f"index_scale skipped: it runs {report.BLOBD}, which --servers leaves out")
        return {name: {"status": "ok", "base_url": s.base_url, "pid": s.pid} for name, s in running.items()} | \
               {name: {"status": "n/a", "message": msg} for name, msg in results.unavailable.items()}
    finally:
        servers.stop_all()
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def tool_versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "not installed"
        lines = (done.stdout or done.stderr).strip().splitlines()
        return lines[0] if lines else "unknown"

    weed = Path(sys.executable).parent / "weed"
    return {"python": platform.python_version(), "curl": first_line(["curl", "--version"]),
            "wrk": first_line(["wrk", "-v"]), "nginx": first_line(["nginx", "-v"]),
            "weed": first_line([str(weed) if weed.exists() else "weed", "version"])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = report.Results()
    meta = {"quick": args.quick, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "machine": platform.machine()},
            "only": args.only, "servers": args.servers, "versions": tool_versions()}
    try:
        server_info = asyncio.run(_run_with_sigterm(args, results, meta))
    except KeyboardInterrupt:
        log("interrupted; every server was stopped")
        return 130
    print(render_summary(results, meta))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report.to_json(results, meta, server_info), indent=2) + "\n")
    log(f"results written to {args.json}")
    problems = len(results.failures) + len(results.unavailable)
    if problems:
        log(f"{problems} problem(s): " + "; ".join(
            [f"{c} n/a ({m})" for c, m in results.unavailable.items()] +
            [f"{w} {c}: {m}" for (w, c), m in results.failures.items()]))
    return 1 if problems else 0


async def _run_with_sigterm(args: argparse.Namespace, results: report.Results, meta: dict) -> dict:
    """SIGTERM ends the run like Ctrl-C does: the main task is cancelled and servers are stopped."""
    task = asyncio.current_task()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run(args, results, meta)
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


def render_summary(results: report.Results, meta: dict) -> str:
    s = meta["settings"]
    mib = 1024 * 1024
    head = (f"blobd benchmark ({'quick' if meta['quick'] else 'full'}): large object {s['large_size'] // mib} MiB, "
            f"small loads {s['duration_s']:g} s, RSS during {s['rss_streams']} x {s['rss_size'] // mib} MiB PUTs, "
            f"{s['reps']} repetition(s), {meta['host']['cpus']} CPUs, blobd workers = {s['blobd_workers']}")
    return f"\n{head}\n{report.render_table(results)}"


if __name__ == "__main__":
    sys.exit(main())

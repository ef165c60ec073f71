"""``blobd quota set|show``, ``blobd stats``, ``blobd fsck``, ``blobd gc``,
``blobd reprobe``.

All of them are safe beside a running server: quota and stats go through
SQLite like the server does, gc deletes and reprobe updates under the same
write lock as the server's own writers, and fsck checks read-only
(``--repair`` refuses while a server holds the data directory).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any, Awaitable, Callable

from tqdm import tqdm

from .. import fsck, quotas, reaper, sessions, stats
from ..auth import check_owner
from ..index import LIMIT_KEYS, count_blobs
from ..reprobe import Run
from ..store import Store
from .common import add_config_option, config_from_args, find_blobs, human_size, open_index

Sweep = Callable[[Store, "float | None"], Awaitable[int]]
# What ``blobd gc`` runs, in order: (what it removes, sweep(store, now) -> count).
SWEEPS: tuple[tuple[str, Sweep], ...] = (
    ("blobs past their grace period", reaper.sweep),
    ("expired upload sessions and stray session files", sessions.sweep_sessions),
)


def register(sub: argparse._SubParsersAction) -> None:
    _register_quota(sub)
    stats_cmd = sub.add_parser("stats", help="print deduplication and store figures",
                               description="Print the figures of GET /stats.")
    add_config_option(stats_cmd)
    stats_cmd.add_argument("--json", action="store_true", help="print them as JSON")
    stats_cmd.set_defaults(run=show_stats)

    check = sub.add_parser(
        "fsck", help="check (and repair) the blob files against the index",
        description="Reconcile the blob tree and the index: missing, orphan, stray and "
        "damaged files, reference counts and usage, leftover temp and upload-session "
        "files, room a crash left held by deferred-length uploads. Works beside a "
        "running server (read-only); --repair needs the server stopped. Exits 1 when "
        "problems remain.")
    add_config_option(check)
    check.add_argument("--verify", action="store_true",
                       help="also re-hash every blob (reads every byte)")
    check.add_argument("--repair", action="store_true",
                       help="fix what can be fixed without losing data; files that "
                       "cannot be right are moved to quarantine/, never deleted")
    check.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show a progress bar (default: when stderr is a terminal)")
    check.set_defaults(run=run_fsck)

    gc = sub.add_parser("gc", help="delete what is due for deletion now",
                        description="Run the background sweeps at once: blobs whose "
                        "grace period is over. Safe beside a running server.")
    add_config_option(gc)
    gc.set_defaults(run=run_gc)
    _register_reprobe(sub)


def _register_reprobe(sub: argparse._SubParsersAction) -> None:
    again = sub.add_parser(
        "reprobe", help="describe stored blobs again with this version's audio probe",
        description="Read stored blobs again with this version's audio probe and update "
        "their audio facts (GET /meta's audio): a format it did not read before, a "
        "duration now right. By default it probes the blobs whose index row says audio "
        "(an audio content type or audio facts) and those whose first bytes announce an "
        "audio format; --all probes every blob. The content type changes only where the "
        "bytes decided it at upload (an audio type, or application/octet-stream); a type "
        "the client named stays. Never deletes, whatever [audio] require_audio says. Safe "
        "beside a running server. Exits 1 when a file was missing or unreadable, or when "
        "a full disk stopped the run (what was updated before stays).")
    add_config_option(again)
    again.add_argument("hashes", nargs="*", metavar="HASH",
                       help="only these blobs (BLAKE3 hex or sha256:HEX), each probed")
    again.add_argument("--all", dest="probe_all", action="store_true",
                       help="probe every blob, not only those that look like audio")
    again.add_argument("--dry-run", action="store_true",
                       help="list what would change; change nothing")
    again.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show a progress bar (default: when stderr is a terminal)")
    again.set_defaults(run=run_reprobe)


def _register_quota(sub: argparse._SubParsersAction) -> None:
    quota = sub.add_parser("quota", help="show or change an owner's quota",
                           description="Show or change per-owner quota limits.")
    actions = quota.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="an owner's usage and limits")
    add_config_option(show)
    show.add_argument("owner")
    show.add_argument("--json", action="store_true", help="print the GET /quota body")
    show.set_defaults(run=show_quota)

    change = actions.add_parser(
        "set", help="override an owner's limits",
        description="Override limits for one owner. Sizes take integers or strings such "
        "as 10GiB; 'default' returns a limit to the configured value.")
    add_config_option(change)
    change.add_argument("owner")
    for key in LIMIT_KEYS:
        change.add_argument(f"--{key.replace('_', '-')}", dest=key, metavar="VALUE")
    change.set_defaults(run=set_quota)


async def show_quota(args: argparse.Namespace) -> int:
    owner = check_owner(args.owner)
    config = config_from_args(args)
    async with open_index(config, must_exist=True, write=False) as store:
        body = await quotas.report(store.db.reader, owner, config.quota_for(owner))
    _print_quota(body, args.json)
    return 0


async def set_quota(args: argparse.Namespace) -> int:
    owner = check_owner(args.owner)
    raw: dict[str, Any] = {}
    for key in LIMIT_KEYS:
        value = getattr(args, key)
        if value is not None:
            raw[key] = None if value == "default" else _cli_value(value)
    if not raw:
        raise SystemExit("blobd quota set: give at least one limit, e.g. --max-bytes 10GiB")
    changes = quotas.parse_changes(raw)
    async with open_index(config_from_args(args), must_exist=True) as store:
        body = await quotas.set_limits(store, owner, changes)
    _print_quota(body, False)
    return 0


def _cli_value(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _print_quota(body: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(body, indent=2))
        return
    limits = body["limits"]
    print(f"owner         {body['owner']}")
    print(f"stored        {human_size(body['used_bytes'])} of "
          f"{human_size(limits['max_bytes'])} ({body['used_bytes']} bytes)")
    print(f"reserved      {human_size(body['reserved_bytes'])}")
    print(f"blobs         {body['used_blobs']} of {limits['max_blobs']}")
    print(f"references    {body['used_refs']} of {limits['max_refs']}")
    print(f"this month    {human_size(body['monthly_upload_bytes'])} of "
          f"{human_size(limits['max_monthly_upload_bytes'])} uploaded")
    print(f"largest blob  {human_size(limits['max_blob_size'])}")


async def show_stats(args: argparse.Namespace) -> int:
    async with open_index(config_from_args(args), must_exist=True, write=False) as store:
        figures = await stats.figures(store)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    mirror, disk = figures["mirror"], figures["disk"]
    lines = [
        ("blobs", f"{figures['blobs']} ({human_size(figures['stored_bytes'])} stored)"),
        ("references", f"{figures['references']} "
                       f"({human_size(figures['logical_bytes'])} without dedup)"),
        ("dedup ratio", f"{figures['dedup_ratio']:.2f}"),
        ("bytes saved", human_size(figures["bytes_saved"])),
        ("puts", f"{figures['puts']}, {figures['put_dedup_hits']} already stored "
                 f"(hit rate {figures['hash_hit_rate']:.1%})"),
        ("in grace", f"{figures['grace']['blobs']} blobs "
                     f"({human_size(figures['grace']['bytes'])})"),
        ("open sessions", str(figures["sessions_open"])),
        ("disk", f"{human_size(disk['free_bytes'])} free of "
                 f"{human_size(disk['total_bytes'])}"),
        ("mirror", f"{mirror['pending']} pending, {mirror['failed']} failing"
                   + (f" (last error: {mirror['last_error']})" if mirror["last_error"]
                      else "")),
        ("scrub", _scrub_line(figures["scrub"])),
    ]
    for label, value in lines:
        print(f"{label:14}{value}")
    return 0


def _scrub_line(scrub: dict[str, Any]) -> str:
    if not scrub["enabled"]:
        return "off"
    line = (f"{scrub['blobs_checked']} blobs ({human_size(scrub['bytes_checked'])}) checked,"
            f" {scrub['damaged']} moved to quarantine")
    if scrub["missing"]:
        line += f", {scrub['missing']} without a file at the last pass"
    ended = scrub["last_pass_ended"]
    line += f"; last pass ended {ended}" if ended else "; no pass ended yet"
    if scrub["pass_started"]:
        line += f", one under way since {scrub['pass_started']}"
    if scrub["continuous"]:
        line += " (continuous: a pass takes longer than the period at this rate)"
    return line


async def run_fsck(args: argparse.Namespace) -> int:
    show = sys.stderr.isatty() if args.progress is None else args.progress
    bars: list[tqdm] = []

    def progress(desc: str, total: int, unit: str) -> Callable[[int], None]:
        bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                   file=sys.stderr, disable=not show, mininterval=0.5)
        bars.append(bar)
        return bar.update

    config = config_from_args(args)
    try:
        report = await fsck.run(config, verify=args.verify,
                                repair=args.repair, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    for problem in report.problems:
        print(problem.line())
    for line in report.summary():
        print(line)
    damaged = report.damaged_blobs()
    if damaged and config.mirror is not None:
        print(f"  {len(damaged)} blob(s) without a sound file can be fetched back from the"
              f" mirror: run {_heal_command(args)} (naming their hashes after it checks"
              " only those)")
    return 0 if report.ok else 1


def _heal_command(args: argparse.Namespace) -> str:
    """``blobd mirror heal`` on the same store as this command."""
    words = ["blobd", "mirror", "heal"]
    if args.config is not None:
        words += ["-c", args.config]
    if args.data_dir is not None:
        words += ["--data-dir", args.data_dir]
    return shlex.join(words)


async def run_gc(args: argparse.Namespace) -> int:
    async with open_index(config_from_args(args), must_exist=True) as store:
        for label, sweep in SWEEPS:
            count = await sweep(store, None)
            print(f"{label}: {count} deleted")
    return 0


async def run_reprobe(args: argparse.Namespace) -> int:
    show = sys.stderr.isatty() if args.progress is None else args.progress
    async with open_index(config_from_args(args), must_exist=True,
                          write=not args.dry_run) as store:
        digests = (list(dict.fromkeys(b.hash for b in await find_blobs(store, args.hashes)))
                   if args.hashes else None)
        total = len(digests) if digests is not None else await count_blobs(store.db.reader)
        with tqdm(total=total, desc="reprobe", unit="blob", file=sys.stderr,
                  disable=not show, mininterval=0.5) as bar:
            report = await Run(store, args.probe_all, args.dry_run,
                               say=lambda line: tqdm.write(line, file=sys.stdout),
                               warn=lambda line: tqdm.write(line, file=sys.stderr),
                               advance=bar.update).over(digests)
    print(report.summary(args.dry_run))
    if stopped := report.stopped():
        print(stopped, file=sys.stderr)
    return 0 if report.ok else 1

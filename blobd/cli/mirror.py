"""``blobd mirror sync|restore|backup|heal|status``."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from tqdm import tqdm

from ..auth import check_owner
from ..config import Config, MirrorConfig
from ..errors import BlobdError, ConfigError
from ..index import all_blobs, store_id
from ..layout import Layout
from ..mirror import backup, queue
from ..mirror.common import Bar, BarFactory, list_backups, make_target
from ..mirror.heal import Healer, check_and_heal
from ..mirror.restore import ORPHANS_OWNER, restore
from ..mirror.sync import SyncReport, sync
from ..storage.s3 import S3Error
from ..stats import queue_age
from ..store import Store
from .common import add_config_option, config_from_args, find_blobs, open_index, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    mirror = sub.add_parser("mirror", help="reconcile, restore and heal from the S3 mirror",
                            description="Work with the S3-compatible mirror of [mirror].")
    actions = mirror.add_subparsers(dest="action", metavar="ACTION", required=True)

    syncing = _action(actions, "sync", run_sync, "reconcile the store with the bucket",
                      "List the store and the bucket and upload what the bucket lacks, "
                      "rsync-style, and abort multipart uploads a crash left (begun "
                      "more than [mirror] abandoned_upload_hours ago); ends with a fresh "
                      "index backup. Run it again to resume an interrupted sync.")
    syncing.add_argument("--delete", action="store_true",
                         help="also delete objects of blobs the index no longer has")
    syncing.add_argument("--dry-run", action="store_true",
                         help="list what would be done; change nothing")
    syncing.add_argument("--verify", action="store_true",
                         help="compare each object's SHA-256 with the index; re-upload "
                         "mismatches")
    syncing.add_argument("--verify-content", action="store_true",
                         help="also download every object the store has and check its "
                         "size, BLAKE3 and SHA-256; re-upload damaged ones from the local "
                         "file (implies --verify; reads the whole bucket, so it costs the "
                         "bucket's egress)")
    syncing.add_argument("--force", action="store_true",
                         help="with --delete: delete even when the objects may be another "
                         "store's (this index holds no blobs, the newest index backup is of "
                         "another store, or this store never backed up to the bucket)")

    restoring = _action(actions, "restore", run_restore, "rebuild an empty server from "
                        "the bucket", "Restore the newest index backup and every blob "
                        "(verified) into an empty data directory. Run it again to resume.")
    restoring.add_argument("--backup", metavar="KEY",
                           help="restore this index backup (its key, or its name under "
                           "_index/) rather than the newest; needed when the bucket holds "
                           "backups of several stores")
    orphans = restoring.add_mutually_exclusive_group()
    orphans.add_argument("--orphans-owner", default=ORPHANS_OWNER, metavar="NAME",
                         help="owner given the blobs the backup does not know "
                         f"(default: {ORPHANS_OWNER})")
    orphans.add_argument("--skip-orphans", action="store_true",
                         help="leave blobs the backup does not know in the bucket only")

    backing = _action(actions, "backup", run_backup, "upload an index backup now",
                      "Upload a consistent snapshot of the index to <prefix>/_index/. "
                      "Refused when the newest backup there is of another store, or when "
                      "this index holds no blobs and the bucket does.", jobs=False)
    backing.add_argument("--force", action="store_true",
                         help="back up even so (the newest backup is what restore takes)")

    healing = _action(actions, "heal", run_heal, "verify local files, heal from the bucket",
                      "Hash every local blob file (or the ones named) and replace any that "
                      "is missing or damaged with a verified copy from the bucket.")
    healing.add_argument("hashes", nargs="*", metavar="HASH", help="only these blobs")

    _action(actions, "status", run_status, "show the queue and the newest backup",
            "Show the mirror queue and the newest index backup. A mirror that cannot "
            "be reached is reported as 'mirror unreachable: <error>' (exit 0: the "
            "queue shows what waits for it).", jobs=False)


def _action(actions: argparse._SubParsersAction, name: str, run: Callable[..., Any],
            summary: str, description: str, jobs: bool = True) -> argparse.ArgumentParser:
    parser = actions.add_parser(name, help=summary, description=description)
    add_config_option(parser)
    if jobs:
        parser.add_argument("-j", "--jobs", type=positive_int, metavar="N",
                            help="transfers at once (default: [mirror] concurrency)")
        parser.add_argument("--progress", action="store_true", default=None,
                            help="show progress bars even when stderr is not a terminal")
    parser.set_defaults(run=_mirror_errors(run))
    return parser


def _mirror_errors(run: Callable[[argparse.Namespace], Awaitable[int]]
                   ) -> Callable[[argparse.Namespace], Awaitable[int]]:
    @functools.wraps(run)
    async def wrapped(args: argparse.Namespace) -> int:
        try:
            return await run(args)
        except S3Error as exc:
            raise BlobdError("unavailable", f"mirror: {exc}") from None
    return wrapped


def _setup(args: argparse.Namespace) -> tuple[Config, MirrorConfig, int, BarFactory]:
    config = config_from_args(args)
    if config.mirror is None:
        raise ConfigError("mirror: the config has no [mirror] section")
    jobs = getattr(args, "jobs", None) or config.mirror.concurrency
    show = getattr(args, "progress", None)

    def bar(description: str, total: int, unit: str) -> Bar:
        return tqdm(desc=description, total=total, unit=unit, unit_scale=unit == "B",
                    unit_divisor=1024, disable=None if show is None else False,
                    file=sys.stderr)
    return config, config.mirror, jobs, bar


@asynccontextmanager
async def _open_store(config: Config, write: bool = True) -> AsyncIterator[Store]:
    """The existing store of the config: a mistyped data_dir must not become
    a new, empty store (whose sync --delete would empty the bucket, whose
    backup would be restored), nor a half-restored one be worked on."""
    layout = Layout(config.data_dir.resolve())
    if layout.restore_marker_path.exists():
        raise BlobdError("conflict", f"an interrupted 'blobd mirror restore' left {layout.root}"
                         " half-restored; run it again to finish first")
    async with open_index(config, must_exist=True, write=write) as store:
        yield store


async def run_sync(args: argparse.Namespace) -> int:
    config, mirror, jobs, bar = _setup(args)
    async with _open_store(config) as store, make_target(mirror, jobs) as target:
        report = await sync(store, target, mirror, delete=args.delete, dry_run=args.dry_run,
                            verify=args.verify, verify_content=args.verify_content,
                            force=args.force, jobs=jobs, bar=bar)
    for digest, damage in report.damaged.items():
        print(f"damaged in the bucket: {digest}: {damage}")
    if args.dry_run:
        for blob in report.to_upload:
            print(f"would upload {blob.hash} ({blob.size} bytes)")
        for digest in report.to_delete:
            print(f"would delete {digest}")
        for key in report.abandoned:
            print(f"would abort the abandoned multipart upload of {key}")
    for digest in report.requeued:
        print(f"stored again while its object was deleted, queued for upload: {digest}",
              file=sys.stderr)
    for what, error in report.failed.items():
        print(f"failed {what}: {error}", file=sys.stderr)
    print(f"sync: {report.local} blobs in the index, {report.remote} in the bucket;"
          f" {report.in_sync} in sync, {report.mismatched} mismatched;"
          f" {len(report.to_upload)} to upload, {len(report.to_delete)} to delete"
          + ("" if args.dry_run else
             f"; uploaded {report.uploaded} ({report.uploaded_bytes} bytes),"
             f" deleted {report.deleted}, failed {len(report.failed)}"
             + (f", {len(report.gone)} skipped (deleted while the sync ran)"
                if report.gone else ""))
          + f"; {len(report.abandoned)} abandoned multipart uploads"
          + ("" if args.dry_run else f", aborted {report.aborted}")
          + (_read_back_summary(report, args.dry_run) if args.verify_content else ""))
    if report.backup:
        print(f"index backup: {report.backup}")
    if report.stopped:
        print(f"sync stopped: {report.stopped}", file=sys.stderr)
        return 1
    return 1 if report.failed else 0


def _read_back_summary(report: SyncReport, dry_run: bool) -> str:
    return (f"; read back {report.read} objects ({report.read_bytes} bytes),"
            f" {len(report.damaged)} damaged"
            + ("" if dry_run else f", {report.repaired} uploaded again"))


async def run_restore(args: argparse.Namespace) -> int:
    config, mirror, jobs, bar = _setup(args)
    owner = None if args.skip_orphans else check_owner(args.orphans_owner)
    async with make_target(mirror, jobs) as target:
        report = await restore(config, target, jobs=jobs, orphans_owner=owner,
                               backup=args.backup, bar=bar)
    for digest in report.missing:
        print(f"not in the bucket, dropped: {digest}", file=sys.stderr)
    for digest, error in report.unfetched.items():
        print(f"not fetched yet: {digest}: {error}", file=sys.stderr)
    for digest, why in report.corrupt.items():
        print(f"damaged in the bucket, dropped: {digest}: {why}", file=sys.stderr)
    for digest, why in report.unreadable.items():
        print(f"kept without its file: {digest}: {why}; `blobd mirror heal` fetches it"
              " once the mirror serves it", file=sys.stderr)
    orphans = (f"left {len(report.orphans)} in the bucket only" if owner is None
               else f"{len(report.orphans)} given to owner {owner}")
    print(f"restore: index backup {report.backup or '(none)'};"
          f" restored {report.restored} blobs ({report.restored_bytes} bytes),"
          f" {report.already} already in place; not in the backup: {orphans},"
          f" {len(report.deleted_before)} deleted before it left deleted;"
          f" dropped {len(report.missing) + len(report.corrupt)} blobs"
          f" and {report.dropped_refs} references"
          + (f"; {len(report.unreadable)} kept without their file" if report.unreadable
             else ""))
    if report.stopped:
        print(f"restore stopped: {report.stopped}", file=sys.stderr)
    elif report.unfetched:
        print(f"restore not finished: {len(report.unfetched)} blobs not fetched, as the"
              " mirror did not answer; run the restore again to fetch them", file=sys.stderr)
    if not report.finished:
        return 1
    return 1 if report.corrupt or report.unreadable else 0


async def run_backup(args: argparse.Namespace) -> int:
    config, mirror, _, _ = _setup(args)
    async with _open_store(config) as store, make_target(mirror) as target:
        done = await backup.backup_index(store, target, mirror, force=args.force)
    state = "uploaded" if done.uploaded else "unchanged since"
    print(f"index backup {state} {target.url(done.key)} ({done.size} bytes)")
    return 0


async def run_heal(args: argparse.Namespace) -> int:
    config, mirror, jobs, bar = _setup(args)
    async with _open_store(config) as store, make_target(mirror, jobs) as target:
        blobs = await find_blobs(store, args.hashes) if args.hashes else \
            await all_blobs(store.db.reader)
        progress = bar("verify", sum(b.size for b in blobs), "B")
        try:
            checkup = await check_and_heal(store, Healer(store, target, mirror), blobs,
                                           jobs, progress.update)
        finally:
            progress.close()
    for digest in checkup.healed:
        print(f"healed {digest}")
    for digest, why in checkup.unhealable.items():
        print(f"cannot heal {digest}: {why}", file=sys.stderr)
    print(f"heal: {checkup.checked} checked, {len(checkup.healed)} healed,"
          f" {len(checkup.unhealable)} could not be healed")
    if checkup.stopped:
        print(f"heal stopped: {checkup.stopped}", file=sys.stderr)
        return 1
    return 1 if checkup.unhealable else 0


async def run_status(args: argparse.Namespace) -> int:
    config, mirror, _, _ = _setup(args)
    async with _open_store(config, write=False) as store:
        counts = await queue.counts(store.db.reader)
        own = await store_id(store.db.reader)
    print(f"store id: {own}")
    age = queue_age(counts["oldest_enqueued_at"], time.time())
    oldest = f", oldest pending {age:.0f}s" if counts["pending"] else ""
    print(f"queue: {counts['pending']} pending, {counts['failed']} failing{oldest}")
    if counts["last_error"]:
        print(f"last error: {counts['last_error']}")
    try:
        async with make_target(mirror) as target:
            backups = await list_backups(target, mirror)
    except S3Error as exc:
        # A state to report, as the queue's is: not a failure of the command.
        print(f"mirror unreachable: {exc}")
        return 0
    newest = backups[-1] if backups else None
    print(f"index backups: {len(backups)}"
          + (f", newest {target.url(newest.key)}" if newest else "")
          + (" (of another store)" if newest and newest.store_id not in (None, own) else ""))
    return 0

"""Unfinished multipart uploads a crash left in the bucket, and aborting them.

A blob from ``multipart_threshold`` up goes to the bucket in parts. blobd
aborts its own upload when it fails, but a process killed mid-upload
(``kill -9``, a power cut) cannot: the parts stay, invisible to listings,
taking room until aborted (MinIO drops them after a day, SeaweedFS never,
AWS bills them). ``blobd mirror sync`` and the server's start-up abort them.

Only uploads of blob keys under the prefix are touched (nothing else in the
bucket is blobd's), and only those begun more than ``[mirror]
abandoned_upload_hours`` ago: the upload of a big blob may be in flight
right now, from this process or another, and must never be cut. The age is
measured against the S3 server's ``Initiated`` time by this machine's clock;
with a day, a clock off by minutes changes nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .. import layout
from ..config import MirrorConfig
from ..storage.s3 import S3Error, S3Target, Unfinished

log = logging.getLogger(__name__)

# S3-compatible servers that do not list multipart uploads answer this:
# nothing to clean up there, and nothing failed.
_UNSUPPORTED = frozenset({"NotImplemented"})
_REFUSED = frozenset({"AccessDenied"})


@dataclass
class Sweep:
    found: list[Unfinished] = field(default_factory=list)  # abandoned ones
    aborted: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # key -> error


async def find_abandoned(target: S3Target, config: MirrorConfig,
                         now: float | None = None) -> list[Unfinished]:
    """Unfinished uploads of blob keys begun more than
    ``abandoned_upload_hours`` before ``now``. Raises S3Error."""
    cutoff = (time.time() if now is None else now) - config.abandoned_upload_hours * 3600
    found = []
    async for upload in target.list_unfinished(layout.mirror_blobs_prefix(config.prefix)):
        if (upload.initiated < cutoff
                and layout.digest_from_mirror_key(config.prefix, upload.key) is not None):
            found.append(upload)
    return found


async def abort_abandoned(target: S3Target, config: MirrorConfig, *,
                          dry_run: bool = False, now: float | None = None) -> Sweep:
    """Find the abandoned uploads and, unless ``dry_run``, abort them one by
    one (they are few: one per crash). A failed abort is recorded and the
    rest go on; a failed listing raises S3Error."""
    sweep = Sweep()
    try:
        sweep.found = await find_abandoned(target, config, now)
    except S3Error as exc:
        if exc.code in _UNSUPPORTED:
            return sweep
        if exc.code in _REFUSED:
            # A key made before this sweep existed: syncs that passed
            # before an upgrade must not start failing over a clean-up.
            log.warning("mirror: the key may not list multipart uploads (on AWS:"
                        " s3:ListBucketMultipartUploads), so abandoned ones are not"
                        " aborted: %s", exc)
            return sweep
        raise
    if dry_run:
        return sweep
    for upload in sweep.found:
        try:
            await target.abort_unfinished(upload)
            sweep.aborted += 1
        except S3Error as exc:
            sweep.failed[upload.key] = str(exc)
    return sweep


async def sweep_at_start(target: S3Target, config: MirrorConfig) -> None:
    """Once, in the background of the server's worker 0: a mirror that is
    down now is only noted (the next start, or a sync, tries again)."""
    try:
        sweep = await abort_abandoned(target, config)
    except S3Error as exc:
        log.info("mirror: could not look for abandoned multipart uploads: %s", exc)
        return
    if sweep.aborted:
        log.warning("mirror: aborted %d multipart upload(s) abandoned more than %g hours"
                    " ago (a crash mid-upload)", sweep.aborted,
                    config.abandoned_upload_hours)
    for key, error in sweep.failed.items():
        log.warning("mirror: could not abort the abandoned upload of %s: %s", key, error)

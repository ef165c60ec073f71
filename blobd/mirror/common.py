"""What the parts of the mirror share: the target built from the config,
listings of the bucket, verification of a downloaded copy, and a bounded
pool of concurrent jobs."""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Protocol, TypeVar

from .. import files, layout
from ..config import MirrorConfig
from ..errors import ConfigError, first_error
from ..files import Digests
from ..index import BlobRecord
from ..storage.s3 import Listed, S3Error, S3Target

T = TypeVar("T")
log = logging.getLogger(__name__)


class Bar(Protocol):
    """A progress bar, as tqdm makes them."""

    def update(self, n: float = 1) -> object: ...

    def close(self) -> None: ...


# (description, total, unit) -> a bar; the CLI passes tqdm.
BarFactory = Callable[[str, int, str], Bar]


class _NoBar:
    def update(self, n: float = 1) -> None:
        return None

    def close(self) -> None:
        return None


def no_bar(description: str, total: int, unit: str) -> Bar:
    return _NoBar()


class CopyMismatch(Exception):
    """A copy from the mirror is not the blob it should be."""


class Unreadable(Exception):
    """The mirror holds the object but will not serve its bytes (see
    :func:`read_refused`)."""


_Read = TypeVar("_Read")


async def read_refused(read: Callable[[], Awaitable[_Read]]) -> _Read:
    """Run ``read`` (a GET of one object), raising :class:`Unreadable` when
    the store refuses the bytes it holds rather than failing to answer.

    Real rot mostly does not come back as wrong bytes: a store that keeps a
    checksum of what it wrote will not serve a piece that fails it.
    SeaweedFS (4.48; a CRC per needle, one needle per 4 MiB chunk) answers
    a GET of an object whose first chunk rotted with 500 InternalError, and
    one whose later chunk rotted with 200 and a body that stops where that
    chunk begins, while HEAD answers as ever. So: an error the store
    answered with on its side (:attr:`S3Error.server_fault`, after the
    target's own retries), or a body cut short at the same byte twice (a
    lost connection does not break twice at one byte, a refusing store
    does). A mirror that is down or silent (refused, timeouts, a cut that
    moves) raises its S3Error as ever."""
    try:
        return await read()
    except S3Error as exc:
        if exc.server_fault:
            raise Unreadable(str(exc)) from exc
        if exc.cut_at is None:
            raise
        first = exc.cut_at
    try:
        return await read()
    except S3Error as exc:
        if exc.server_fault:
            raise Unreadable(str(exc)) from exc
        if exc.cut_at == first:
            raise Unreadable(f"{exc}, twice") from exc
        raise


# How long the start-up check of the bucket may take (see check_bucket).
BUCKET_CHECK_SECONDS = 10.0
_NO_BUCKET = frozenset({"NoSuchBucket", "NotFound", "404"})
_DENIED = frozenset({"AccessDenied", "Forbidden", "403", "InvalidAccessKeyId",
                     "SignatureDoesNotMatch"})


class MirrorTarget(S3Target):
    """The bucket of ``[mirror]``. Entered with ``async with`` (as every
    ``blobd mirror`` command does), it is opened and then checked once
    (:func:`check_bucket`); :meth:`open` alone checks nothing."""

    async def __aenter__(self) -> MirrorTarget:
        await self.open()
        await check_bucket(self)
        return self


async def check_bucket(target: S3Target) -> bool:
    """Check once that the bucket exists and the credentials work, and log
    one warning naming the bucket and endpoint when not: otherwise every
    blob fails alike later, one by one, and on SeaweedFS a mistyped bucket
    is not even noticed (it makes a bucket of any name on the first upload).
    A mirror that is down or does not answer within BUCKET_CHECK_SECONDS
    is only noted: it may come back, and the queue waits for it. Returns
    whether the bucket answered as usable."""
    where = f"bucket {target.bucket!r} at {target.endpoint}"
    try:
        await asyncio.wait_for(target.check_access(), BUCKET_CHECK_SECONDS)
        return True
    except TimeoutError:
        log.info("mirror: %s did not answer within %gs; not checked", where,
                 BUCKET_CHECK_SECONDS)
    except S3Error as exc:
        if exc.retryable:
            log.info("mirror: %s is not reachable now; not checked: %s", where, exc)
        elif exc.code in _NO_BUCKET:
            log.warning("mirror: %s does not exist; create it, or fix [mirror] bucket"
                        " (some servers, SeaweedFS among them, make a bucket of any name"
                        " on the first upload): %s", where, exc)
        elif exc.code in _DENIED:
            log.warning("mirror: access to %s is denied; check [mirror] access_key,"
                        " secret_key and the key's permissions: %s", where, exc)
        else:
            log.warning("mirror: %s cannot be used: %s", where, exc)
    return False


def make_target(config: MirrorConfig, jobs: int | None = None) -> MirrorTarget:
    """The bucket of ``[mirror]``, not yet opened (no connection is made),
    with connections for ``jobs`` transfers at once (default ``[mirror]
    concurrency``) and a few to spare (index backups, heals on GET)."""
    connections = max(10, (jobs or config.concurrency) + 4)
    try:
        return MirrorTarget(config.endpoint, config.bucket, config.access_key,
                        config.secret_key, config.region, config.prefix,
                        multipart_threshold=config.multipart_threshold,
                        # The queue retries with its own backoff; one quick
                        # retry here covers a dropped keep-alive connection.
                        max_attempts=2, max_connections=connections)
    except S3Error as exc:  # aiobotocore is missing
        raise ConfigError(f"mirror: {exc}") from None


# x-amz-meta-blobd-created: the creation time (this server's clock) of
# the blob an object was uploaded for. A blob deleted and later stored again
# is a new incarnation of the same key: restore tells it from the deleted
# one by this stamp, never by comparing our clock with the S3 server's.
CREATED_METADATA = "blobd-created"


def created_stamp(created_at: float) -> str:
    return f"{created_at:.6f}"


def object_metadata(created_at: float) -> dict[str, str]:
    """The user metadata of a blob's object, besides its SHA-256."""
    return {CREATED_METADATA: created_stamp(created_at)}


def is_upload_of(there: dict[str, Any], blob: BlobRecord, deleted_once: bool) -> bool:
    """Whether the object ``there`` (a HEAD) is this blob's upload. The same
    bytes left from an earlier incarnation (deleted, its object kept or not
    yet removed, then stored again) are not: they must be uploaded again,
    stamped with this one's creation, or a restore from a backup taken
    between the deletion and now would take the content for deleted. An
    object an older blobd uploaded has no stamp: it is this incarnation's
    unless the content was ever deleted while mirrored (``deleted_once``)."""
    if there["sha256"] != blob.sha256 or there["size"] != blob.size:
        return False
    stamp = there["metadata"].get(CREATED_METADATA)
    if stamp is not None:
        return bool(stamp == created_stamp(blob.created_at))
    return not deleted_once


def blob_key(config: MirrorConfig, digest: str) -> str:
    return layout.mirror_key(config.prefix, digest)


async def list_blob_objects(target: S3Target, config: MirrorConfig) -> dict[str, Listed]:
    """Every blob object under the prefix, by digest; other keys (index
    backups, anything a person put there) are left out."""
    found: dict[str, Listed] = {}
    async for listed in target.list(layout.mirror_blobs_prefix(config.prefix)):
        digest = layout.digest_from_mirror_key(config.prefix, listed.key)
        if digest is not None:
            found[digest] = listed
    return found


async def any_blob_object(target: S3Target, config: MirrorConfig) -> bool:
    """Whether the bucket holds at least one blob object (stops at the first)."""
    async with aclosing(target.list(layout.mirror_blobs_prefix(config.prefix))) as keys:
        async for listed in keys:
            if layout.digest_from_mirror_key(config.prefix, listed.key) is not None:
                return True
    return False


@dataclass(frozen=True)
class IndexBackup:
    taken_at: float
    key: str
    store_id: str | None  # None: made before backups carried the store's id


async def list_backups(target: S3Target, config: MirrorConfig) -> list[IndexBackup]:
    """Every index backup, oldest first."""
    found = []
    async for listed in target.list(layout.mirror_backup_prefix(config.prefix)):
        parsed = layout.parse_backup_key(config.prefix, listed.key)
        if parsed is not None:
            found.append(IndexBackup(parsed[0], listed.key, parsed[1]))
    return sorted(found, key=lambda backup: (backup.taken_at, backup.key))


def verify_copy(path: Path, digest: str, sha256: str | None = None,
                size: int | None = None) -> Digests:
    """Hash a downloaded file and check it is the blob ``digest`` (and has
    the SHA-256 and size the index or the object claims). Runs in a thread."""
    return check_copy(files.hash_file(path), digest, sha256, size)


def check_copy(got: Digests, digest: str, sha256: str | None = None,
               size: int | None = None) -> Digests:
    """Raise :class:`CopyMismatch`, naming what is wrong, unless ``got``
    (the digests of a copy from the mirror) is the blob ``digest``."""
    wrong = []
    if got.blake3 != digest:
        wrong.append(f"BLAKE3 {got.blake3}")
    if sha256 is not None and got.sha256 != sha256:
        wrong.append(f"SHA-256 {got.sha256} (expected {sha256})")
    if size is not None and got.size != size:
        wrong.append(f"{got.size} bytes (expected {size})")
    if wrong:
        raise CopyMismatch(f"the mirror's copy of {digest} has " + ", ".join(wrong))
    return got


# Objects in a row that got no answer before a command stops (see Silence).
SILENT_OBJECTS = 3


def no_answer(exc: BaseException | None) -> bool:
    """Whether ``exc`` is the mirror saying nothing: a timeout, a connection
    refused or lost before any answer (after the target's own retries).
    An answer the server gave (a 404, a 5xx, a refusal), a body cut short
    and a copy that is not the blob are the object's own failures."""
    return (isinstance(exc, S3Error) and exc.retryable and exc.status == 0
            and exc.cut_at is None)


class MirrorSilent(Exception):
    """Raised by :func:`run_pool` once its :class:`Silence` has seen enough."""

    def __init__(self, count: int) -> None:
        super().__init__(f"the mirror stopped answering ({count} objects in a row timed out"
                         " or could not connect); nothing after that was tried: run the"
                         " command again when it answers")


class Silence:
    """Counts objects in a row whose request got no answer, so that a
    command stops once the mirror has clearly stopped answering: a mirror
    that hangs (a NAS asleep, a firewall dropping packets) costs each
    object the S3 client's read timeout times its attempts, minutes, and a
    store of thousands of blobs would take days to say so.

    The limit is ``jobs``, at least SILENT_OBJECTS: when the mirror hangs,
    every object in flight times out at about the same moment, so ``jobs``
    failures in a row take one timeout, not more, while one object's bad
    luck (or two, with -j 1) does not stop a run that otherwise gets
    answers. Any object answered in between starts the count again."""

    def __init__(self, jobs: int) -> None:
        self.limit = max(SILENT_OBJECTS, jobs)
        self.row = 0

    @property
    def tripped(self) -> bool:
        return self.row >= self.limit

    def saw(self, exc: BaseException | None) -> None:
        """Note an object that asked the mirror: ``exc`` is its failure, or
        None when the mirror answered (whatever it answered)."""
        if no_answer(exc):
            self.row += 1
        elif not self.tripped:
            self.row = 0


async def run_pool(items: Iterable[T], jobs: int, work: Callable[[T], Awaitable[None]],
                   silence: Silence | None = None) -> None:
    """Run ``work`` on every item, at most ``jobs`` at once, without making
    a task per item (a store may hold millions). The first exception stops
    the pool and is raised as itself; ``work`` handles what should not.
    With ``silence`` (which ``work`` feeds), :class:`MirrorSilent` is
    raised once it trips: no item is started after that, and those in
    flight are cancelled (each cleans up after itself, as on Ctrl-C:
    temporary files removed, multipart uploads aborted)."""
    pending = iter(items)

    def check() -> None:
        if silence is not None and silence.tripped:
            raise MirrorSilent(silence.row)

    async def worker() -> None:
        for item in pending:
            check()
            await work(item)
            check()

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, jobs)):
                group.create_task(worker())
    except ExceptionGroup as failures:
        # An S3Error or a BlobdError, as with one job (an unreachable
        # mirror fails every job alike).
        raise first_error(failures) from None

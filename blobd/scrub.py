"""The background scrub: every blob file re-hashed, slowly, once a period.

A GET serves a file with sendfile and never hashes it, so a file whose
bytes rot but keep their size would be served as is. The scrub (worker 0,
``[scrub]``) reads every blob file in hash order in a thread, at no more
than ``bytes_per_second``, and starts a new pass ``period_seconds`` after
the last one started (at once when a pass took longer: then it runs
continuously, and ``/stats`` says so).

Where it is survives restarts: the last hash checked (``scrub_cursor``),
when the pass started and the last one ended, and how many blobs the pass
has left without their file so far are rows of the index's ``meta`` table,
saved with the ``counters`` figures (``scrub_blobs``, ``scrub_bytes``)
about once a second and at shutdown, also while one big blob is read (its
bytes so far; the cursor waits for its end). A ``kill -9`` re-checks at
most that second's blobs. Every figure is in the index, so ``/stats`` and
``/metrics`` agree on every worker although only worker 0 scrubs.

What an operator alerts on: ``scrub_damaged`` (a counter) grows once per
file moved to quarantine (the file leaves the tree, so it is never found
again); ``scrub_missing`` is the number of blobs the last completed pass
left without their file (found missing, or quarantined and not healed): a
figure of the store's state, not of events, since such a blob is found
again by every pass until a heal or a PUT puts its file back. Its log
lines are written the first time this process finds it so, and each pass
ends with one line saying how many there are.

A file that is not its blob (wrong size or content, unreadable) is moved to
``quarantine/<hash>.<stamp>`` (:meth:`blobd.layout.Layout.damaged_path`):
never served again, kept for a person to look at. The blob is then
missing, which GET already handles: healed from the mirror when one is
configured (the scrub heals it at once too, through the same
:class:`blobd.mirror.heal.Healer`), a 500 otherwise until a PUT of its
bytes puts the file back.

Races: a blob deleted, healed or stored again while it was being read must
not be quarantined. Each of those moves the file inside a write
transaction (a deletion to ``tmp/``, a heal by rename over it, a PUT by
link when it is missing), so the move to quarantine happens in one too,
and only when the blob still has its row and its file is the very one that
was read (same device, inode, mtime and size).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from . import files, index
from .index import BlobRecord
from .mirror.heal import Healer, HealError
from .store import Store

log = logging.getLogger(__name__)

CURSOR, STARTED, ENDED = "scrub_cursor", "scrub_pass_started", "scrub_pass_ended"
# Blobs left without their file by the pass under way so far, and by the
# last completed one (the /stats figure).
PASS_MISSING, MISSING = "scrub_pass_missing", "scrub_missing"
# Rows read per index lookup while walking.
PAGE = 64
# Progress is written to the index at most this often (one small
# transaction), while a big blob is read too.
SAVE_EVERY = 1.0
# After an unexpected failure, the pass is tried again after this long.
RETRY_SECONDS = 60.0
# The least time between a pass's end and the next one's start, whatever
# period_seconds says: on an empty or tiny store a tiny period made passes
# back to back with nothing to throttle them, two index writes each, a
# thousand a second.
REST_SECONDS = 1.0

Identity = tuple[int, int, int, int]


class Stopped(Exception):
    """The server is stopping: the thread hashing a file gives up."""


class Throttle:
    """Holds the reads of a pass to ``rate`` bytes a second; called with
    each chunk's size (in the hashing thread), it sleeps to stay behind."""

    # A slow disk that fell behind must not earn a burst later.
    MAX_DEBT = 1.0

    def __init__(self, rate: int, stop: threading.Event) -> None:
        self.rate = rate
        self.stop = stop
        self.started = time.monotonic()
        self.done = 0

    def __call__(self, count: int) -> None:
        self.done += count
        ahead = self.done / self.rate - (time.monotonic() - self.started)
        if ahead < -self.MAX_DEBT:
            self.started += -ahead - self.MAX_DEBT
        if self.stop.wait(ahead) if ahead > 0 else self.stop.is_set():
            raise Stopped


def identity(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def check_file(path: Path, blob: BlobRecord, throttle: Throttle
               ) -> tuple[str | None, Identity | None]:
    """(what is wrong or None, the identity of the file read); the bytes
    read are counted by ``throttle``. Runs in a thread."""
    try:
        first = os.lstat(path)
    except FileNotFoundError:
        return "missing", None
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})", None
    if not stat.S_ISREG(first.st_mode):
        # As fsck sees it: a directory or a symlink is never a blob file,
        # even when a symlink leads to the right bytes.
        return f"not a regular file ({_kind(first.st_mode)})", identity(first)
    try:
        fh = open(path, "rb", buffering=0)
    except FileNotFoundError:
        return "missing", None
    except OSError as exc:
        try:
            seen: Identity | None = identity(os.lstat(path))
        except OSError:
            seen = None
        return f"unreadable ({exc.strerror or exc})", seen
    with fh:
        seen = identity(os.fstat(fh.fileno()))
        if seen[3] != blob.size:
            return f"{seen[3]} bytes, expected {blob.size}", seen
        try:
            got = files.hash_open_file(fh, throttle)
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})", seen
    if got.size != blob.size or got.blake3 != blob.hash or got.sha256 != blob.sha256:
        return "content does not match its hash", seen
    return None, seen


class Moved(NamedTuple):
    """Where :func:`move_aside` put a file, and the directories whose
    entries changed (to fsync)."""
    target: Path
    dirs: list[Path]


def move_aside(store: Store, digest: str, seen: Identity | None) -> Moved | str | None:
    """Under the write lock: move the blob's file to quarantine if it is
    still the one that was read; "missing" when it was and still is
    missing; None when it changed meanwhile (healed, stored again)."""
    path = store.layout.blob_path(digest)
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    if (identity(st) if st is not None else None) != seen:
        return None
    if st is None:
        return "missing"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    quarantine = store.layout.quarantine_dir
    dirs = [quarantine, path.parent]
    try:
        quarantine.mkdir()
        dirs.append(quarantine.parent)
    except FileExistsError:
        pass
    target = store.layout.damaged_path(digest, stamp)
    if not stat.S_ISREG(st.st_mode):
        # A directory cannot be linked, and a link to a symlink would copy
        # where it points; under the write lock nothing else names targets.
        n = 0
        while os.path.lexists(target):
            n += 1
            target = store.layout.damaged_path(digest, f"{stamp}-{n}")
        os.rename(path, target)
        return Moved(target, dirs)
    for n in range(1, 1000):
        try:
            # link, not rename: never over an earlier damaged copy.
            os.link(path, target)
            break
        except FileExistsError:
            target = store.layout.damaged_path(digest, f"{stamp}-{n}")
    os.unlink(path)
    return Moved(target, dirs)


@dataclass
class Progress:
    """The pass under way."""
    cursor: str           # the last blob checked
    missing: int          # blobs it has left without their file so far
    throttle: Throttle    # also counts the bytes read (``done``)
    blobs: int = 0        # checked since progress was last saved
    published: int = 0    # of ``throttle.done``, the bytes already saved
    saved: float = field(default_factory=time.monotonic)

    def due(self) -> float:
        """Seconds until progress should be saved again."""
        return self.saved + SAVE_EVERY - time.monotonic()


class Scrubber:
    def __init__(self, store: Store, healer: Healer | None) -> None:
        self.store = store
        self.healer = healer
        self.config = store.config.scrub
        self._stop = threading.Event()
        # Blobs this process has reported without their file (as of the
        # last pass), so a pass repeats only the count, not every line.
        self._reported: set[str] = set()

    async def run(self) -> None:
        """Scrub until cancelled; a failure is logged and tried again."""
        try:
            while True:
                try:
                    await self._wait_for_turn()
                    await self._pass()
                except Stopped:
                    return
                except Exception:
                    log.exception("the scrub failed; trying again in %gs", RETRY_SECONDS)
                    await asyncio.sleep(RETRY_SECONDS)
        finally:
            # The hashing thread would go on reading after the task ends.
            self._stop.set()

    async def _wait_for_turn(self) -> None:
        meta = await index.get_meta(self.store.db.reader, CURSOR, STARTED, ENDED)
        if CURSOR in meta or STARTED not in meta:
            return
        due = float(meta[STARTED]) + self.config.period_seconds
        if ENDED in meta:
            due = max(due, float(meta[ENDED]) + REST_SECONDS)
        if due > time.time():
            await asyncio.sleep(due - time.time())

    async def _pass(self) -> None:
        meta = await index.get_meta(self.store.db.reader, CURSOR, PASS_MISSING)
        cursor = meta.get(CURSOR)
        if cursor is None:
            cursor = ""
            async with self.store.write() as tx:
                await index.set_meta(tx.conn, **{CURSOR: cursor, STARTED: repr(time.time()),
                                                 PASS_MISSING: "0"})
            log.info("scrub: pass started (%s/s)", _size(self.config.bytes_per_second))
        else:
            log.info("scrub: pass resumed %s", f"after blob {cursor}" if cursor
                     else "from its start (no blob was checked before it stopped)")
        state = Progress(cursor, int(meta.get(PASS_MISSING, "0")),
                         Throttle(self.config.bytes_per_second, self._stop))
        missing: set[str] = set()
        try:
            while page := await index.blobs_after(self.store.db.reader, state.cursor, PAGE):
                for blob in page:
                    if await self._check(blob, state):
                        missing.add(blob.hash)
                    state.cursor = blob.hash
                    state.blobs += 1
                    if state.due() <= 0:
                        await self._save(state)
        except (asyncio.CancelledError, Stopped):
            self._stop.set()
            with contextlib.suppress(Exception):
                await self._save(state)
            raise
        await self._save(state, ended=time.time())
        # Blobs that have their file again are reported again should they
        # lose it again.
        self._reported &= missing
        if state.missing:
            log.warning("scrub: pass ended; %d blob%s without a file (blobd fsck lists"
                        " them as missing)", state.missing, "" if state.missing == 1 else "s")
        else:
            log.info("scrub: pass ended")

    async def _check(self, blob: BlobRecord, state: Progress) -> bool:
        """Check one blob's file; True when the blob is left without one."""
        path = self.store.layout.blob_path(blob.hash)
        job = asyncio.ensure_future(asyncio.to_thread(check_file, path, blob, state.throttle))
        try:
            while True:
                done, _ = await asyncio.wait({job}, timeout=max(0.0, state.due()))
                if done:
                    break
                # A big blob takes minutes to read at a modest rate: its bytes
                # show in /stats as they are read, not all at its end.
                await self._save(state)
            fault, seen = job.result()
        finally:
            job.cancel()
        if fault is None:
            return False
        return await self._settle(blob, fault, seen, state)

    async def _settle(self, blob: BlobRecord, fault: str, seen: Identity | None,
                      state: Progress) -> bool:
        async with self.store.write() as tx:
            if await index.get_blob(tx.conn, blob.hash) is None:
                return False  # deleted while it was read
            moved = await tx.blocking(move_aside, self.store, blob.hash, seen)
            if moved is None:
                return False  # healed or stored again while it was read
            if isinstance(moved, Moved):
                tx.count(scrub_damaged=1)
                if self.store.config.storage.fsync:
                    # Else a crash could put the file back in the tree, for
                    # the next pass to find and count again.
                    tx.sync_dirs.extend(moved.dirs)
        # A file moved aside is news each time; a blob still without its
        # file is reported by the first pass of this process that finds it.
        quiet = not isinstance(moved, Moved) and blob.hash in self._reported
        if isinstance(moved, Moved):
            log.warning("scrub: blob %s: file %s; moved to %s", blob.hash, fault,
                        moved.target.relative_to(self.store.layout.root))
        elif not quiet:
            log.warning("scrub: blob %s has no file", blob.hash)
        if await self._heal(blob, quiet):
            return False
        self._reported.add(blob.hash)
        state.missing += 1
        return True

    async def _heal(self, blob: BlobRecord, quiet: bool) -> bool:
        """Whether ``blob`` has a file again (or no row: deleted meanwhile)."""
        if self.healer is None:
            if not quiet:
                log.warning("scrub: blob %s cannot be served until a PUT of its bytes (no"
                            " mirror to heal it from)", blob.hash)
            return False
        try:
            await self.healer.heal(blob)
        except HealError as exc:
            if not quiet:
                log.error("scrub: blob %s could not be healed: %s", blob.hash, exc)
            return False
        return True

    async def _save(self, state: Progress, ended: float | None = None) -> None:
        read = state.throttle.done
        async with self.store.write() as tx:
            values: dict[str, str | None] = {CURSOR: state.cursor,
                                             PASS_MISSING: str(state.missing)}
            if ended is not None:
                values = {CURSOR: None, PASS_MISSING: None, ENDED: repr(ended),
                          MISSING: str(state.missing)}
            await index.set_meta(tx.conn, **values)
            tx.count(scrub_blobs=state.blobs, scrub_bytes=read - state.published)
        state.blobs, state.published, state.saved = 0, read, time.monotonic()


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a file"


def _size(count: int) -> str:
    return f"{count / (1 << 20):g} MiB"

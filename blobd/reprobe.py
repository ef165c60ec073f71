"""``blobd reprobe``: stored blobs described again by today's probe.

A blob is probed once, when it is first stored (:mod:`blobd.describe`), and
the probe gets better between releases: a format read for the first time,
a duration now right. This reads the stored files again and brings their
rows up to date.

Which blobs: by default those whose row says audio (an audio content type,
or audio facts) and those whose first bytes announce an audio format
(:func:`blobd.sniff.sniff_mime`); ``probe_all`` probes every blob, for the
few the probe reads that the first bytes do not announce (an MP3 behind
junk). Named blobs are always probed.

What changes: the ``audio`` column, and the content type only where it was
decided by the bytes (:func:`blobd.describe.decided_by_bytes`), which then
becomes what an upload would decide today. A type the client named stays
as decided at upload. Hash, size, references, quotas and mirror state are
never touched, and neither ``[audio] require_audio`` nor ``allowed_types``
deletes anything here: a blob today's rules would refuse stays stored.

Beside a running server (one process or many): the index is read a page at
a time, files are read in threads, and each change is one short write
transaction through :meth:`blobd.store.Store.write` (the cross-process
writer lock, the busy timeout), made only if the row still holds what was
read before the probe. A blob deleted meanwhile is skipped, never brought
back; a kill at any moment leaves each row old or new, never half. A full
disk (the index cannot grow) stops the run at the update it refused: what
was updated before stays, and the summary says where it stopped.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from . import daemonthread, index
from .audio import (AUDIO_MIME_TYPES, PROBE_THREADS, AudioInfo, probe_file, sniff_file,
                    sniff_mime, without_sound)
from .describe import content_type, decided_by_bytes
from .errors import BlobdError
from .files import HEAD_SIZE
from .index import decode_audio
from .store import Store

# Rows held at once: the index of a million blobs is never read whole.
PAGE_ROWS = 256


@dataclass
class Report:
    examined: int = 0
    updated: int = 0
    unchanged: int = 0
    not_audio: int = 0      # not probed: no audio by their row or first bytes
    missing: int = 0
    unreadable: int = 0
    gone: int = 0           # deleted (or described anew) while reprobe ran
    unwritten: int = 0      # due an update when the disk filled up
    disk_full: str | None = None    # why the run stopped, when it did

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unreadable or self.disk_full)

    def summary(self, dry_run: bool) -> str:
        updated = "would be updated" if dry_run else "updated"
        line = (f"reprobe: {self.examined} blobs examined: {self.updated} {updated},"
                f" {self.unchanged} unchanged, {self.not_audio} not audio by their"
                f" first bytes (not probed), {self.missing} with their file missing,"
                f" {self.unreadable} unreadable")
        if self.gone:
            line += f"; {self.gone} skipped (deleted or changed while reprobe ran)"
        return line

    def stopped(self) -> str | None:
        """Why the run stopped before the end, if it did."""
        if not self.disk_full:
            return None
        return (f"reprobe stopped: {self.disk_full}; {self.unwritten} blobs due an update"
                " were not updated: free some room and run it again")


@dataclass(frozen=True)
class Reading:
    head: bytes
    info: AudioInfo | None
    probed: bool
    without_sound: bool = False    # a film with no sound track (see blobd.audio)
    read_type: str | None = None   # past long ID3v2 tags (blobd.audio.sniff_file)


class _WatchedFile(io.FileIO):
    """A file that keeps the first error of its reads. The probe takes any
    exception for "not audio"; a disk's I/O error must not pass for that
    and erase a blob's facts."""

    error: OSError | None = None

    def readinto(self, buffer: Any) -> int | None:
        try:
            return super().readinto(buffer)
        except OSError as exc:
            self.error = self.error or exc
            raise


class WrongSize(Exception):
    """The blob's file is not as long as the blob: damaged (fsck's "size").
    Its bytes are not the blob's, and a cut-off sound probes shorter."""

    def __init__(self, actual: int, expected: int) -> None:
        super().__init__(f"the file is {actual} bytes, its blob {expected}")


def read_blob(path: str, size: int, must_probe: bool) -> Reading:
    """The first bytes of the file and, when it may be audio, its probe.
    Blocking. Raises OSError when the file cannot be opened or read, and
    WrongSize when it is not ``size`` bytes long."""
    raw = _WatchedFile(path)
    with io.BufferedReader(raw) as f:
        actual = os.fstat(raw.fileno()).st_size
        if actual != size:
            raise WrongSize(actual, size)
        head = f.read(HEAD_SIZE)
        if not must_probe and sniff_mime(head) is None:
            return Reading(head, None, probed=False)
        f.seek(0)
        info = probe_file(f)
        silent = info is None and without_sound(f)
        read_type = sniff_file(f) if info is None else None
    if raw.error is not None:
        raise raw.error
    return Reading(head, info, probed=True, without_sound=silent, read_type=read_type)


@dataclass
class Run:
    """One reprobe: its store, its choices and where it reports."""

    store: Store
    probe_all: bool
    dry_run: bool
    say: Callable[[str], None]      # a change (stdout)
    warn: Callable[[str], None]     # a failure (stderr)
    advance: Callable[[int], None]  # the progress bar
    report: Report = field(default_factory=Report)

    async def over(self, digests: list[str] | None) -> Report:
        """Every blob (``digests`` None) or the named ones, which are all
        probed: naming a blob says it may be audio, whatever its row or
        its first bytes say."""
        slots = asyncio.Semaphore(PROBE_THREADS)
        probe_all = self.probe_all or digests is not None
        pages = self._all_rows() if digests is None else self._named_rows(digests)
        async for page in pages:
            if self.report.disk_full:
                break
            await asyncio.gather(*(self._one(row, slots, probe_all) for row in page))
        return self.report

    async def _all_rows(self) -> AsyncIterator[list[Any]]:
        """Every blob's row, a page at a time, in hash order."""
        after = ""
        while page := await index.descriptions_after(self.store.db.reader, after,
                                                     PAGE_ROWS):
            yield page
            after = page[-1]["hash"]

    async def _named_rows(self, digests: list[str]) -> AsyncIterator[list[Any]]:
        for start in range(0, len(digests), PAGE_ROWS):
            page = []
            for digest in digests[start:start + PAGE_ROWS]:
                row = await index.description_of(self.store.db.reader, digest)
                if row is None:
                    self.report.examined += 1
                    self.report.gone += 1
                    self.advance(1)
                else:
                    page.append(row)
            yield page

    async def _one(self, row: Any, slots: asyncio.Semaphore, probe_all: bool) -> None:
        if self.report.disk_full:
            return      # stopped: the rest of the page is not examined
        digest, old_type, old_text = row["hash"], row["content_type"], row["audio"]
        try:
            old_audio: Any = decode_audio(old_text)
        except ValueError:
            old_audio = old_text    # not JSON: whatever the probe says replaces it
        self.report.examined += 1
        try:
            reading = await self._read(digest, row["size"], slots,
                                       probe_all or old_audio is not None
                                       or old_type in AUDIO_MIME_TYPES)
        finally:
            self.advance(1)
        if reading is None:
            return
        if not reading.probed:
            self.report.not_audio += 1
            return
        audio = reading.info.to_json() if reading.info is not None else None
        new_type = (content_type(reading.info, reading.head, None,
                                 without_sound=reading.without_sound,
                                 read_type=reading.read_type)
                    if decided_by_bytes(old_type) else old_type)
        if (new_type, audio) == (old_type, old_audio):
            self.report.unchanged += 1
            return
        if not self.dry_run:
            if self.report.disk_full:
                self.report.unwritten += 1
                return
            try:
                async with self.store.write() as tx:
                    done = await index.redescribe(tx.conn, digest, old_type, old_text,
                                                  new_type, audio)
            except BlobdError as exc:
                if exc.code != "insufficient_storage":
                    raise
                # Rolled back: the row is as it was. The next update would
                # meet the same disk.
                self.report.unwritten += 1
                self.report.disk_full = self.report.disk_full or exc.message
                return
            if not done:
                self.report.gone += 1
                return
        self.report.updated += 1
        verb = "would update" if self.dry_run else "updated"
        self.say(f"{verb} {digest}: {_changes(old_type, old_audio, new_type, audio)}")

    async def _read(self, digest: str, size: int, slots: asyncio.Semaphore,
                    must_probe: bool) -> Reading | None:
        """The blob's reading, or None when it has none (counted)."""
        path = str(self.store.layout.blob_path(digest))
        timeout = self.store.config.audio.probe_timeout_seconds
        try:
            async with slots:
                return await asyncio.wait_for(
                    daemonthread.run(read_blob, path, size, must_probe, name="blobd-reprobe"),
                    timeout)
        except FileNotFoundError:
            # A deletion moves the file into tmp/ inside its transaction:
            # until that commits the row is still there (GET /blobs knows
            # this too). Looked for before the row, which it outlives.
            leaving = await asyncio.to_thread(self.store.layout.trash_paths, digest)
            if leaving or await index.description_of(self.store.db.reader,
                                                     digest) is None:
                self.report.gone += 1
                return None
            self.report.missing += 1
            self.warn(f"missing file: {digest}: {path}")
        except TimeoutError:    # before OSError, of which it is one
            self.report.unreadable += 1
            self.warn(f"cannot read {digest}: the probe gave up after {timeout:g} s"
                      " ([audio] probe_timeout_seconds); its row is left as it was")
        except OSError as exc:
            self.report.unreadable += 1
            self.warn(f"cannot read {digest}: {exc.strerror or exc}: {path}")
        except WrongSize as exc:
            self.report.unreadable += 1
            self.warn(f"cannot read {digest}: {exc}: {path} is damaged (blobd fsck);"
                      " its row is left as it was")
        return None


def _changes(old_type: str, old_audio: Any, new_type: str, audio: Any) -> str:
    parts = []
    if new_type != old_type:
        parts.append(f"content_type {old_type} -> {new_type}")
    if audio != old_audio:
        parts.append(f"audio {json.dumps(old_audio)} -> {json.dumps(audio)}")
    return "; ".join(parts)


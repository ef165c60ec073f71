"""``blobd fsck``: reconcile the blob tree and the index, and the index's
own counts, reporting (and with ``repair`` fixing) what disagrees.

Beside a running server (which holds the data-dir lock) it checks
read-only: discrepancies are confirmed under the SQLite write lock (see
:mod:`blobd.fsck.disk`) and ``tmp/`` and ``uploads/``, full of uploads in
flight, are not judged. ``repair`` needs the data-dir lock itself and refuses while a
server holds it. Blocking work runs in threads; ``progress`` is told the
size of the job and each step of it.

    report = await fsck.run(config, verify=True, repair=False)
    report.ok, report.problems, report.summary()
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import time
from pathlib import Path
from typing import Callable

from .. import files, index
from ..config import Config
from ..errors import BlobdError, first_error
from ..index_sessions import Session
from ..store import ShortFile, Store
from . import disk, drift
from .repair import repair as repair_disk
from .report import KINDS, Problem, Report

__all__ = ["run", "check", "Report", "Problem", "KINDS", "ProgressFactory"]

# (description, total, unit) -> a function told each step's size.
ProgressFactory = Callable[[str, int, str], Callable[[int], None]]


async def run(config: Config, *, verify: bool = False, repair: bool = False,
              progress: ProgressFactory | None = None) -> Report:
    """Open the store the safe way for the job, check it, close it."""
    store = Store(config)
    if not await asyncio.to_thread(store.layout.index_path.exists):
        raise BlobdError("not_found", f"no blobd store in {store.layout.root}")
    if await asyncio.to_thread(store.layout.restore_marker_path.exists):
        # Its index names blobs still to be fetched: fsck would report each
        # as missing, and --repair drop the unreferenced ones for good.
        raise BlobdError("conflict", f"an interrupted 'blobd mirror restore' left"
                         f" {store.layout.root} half-restored; run it again to finish"
                         " before fsck")
    live = False
    try:
        await store.open(exclusive=True, recover=False, write=repair)
    except BlobdError as exc:
        if exc.code != "conflict":
            raise
        if repair:
            raise BlobdError("conflict", f"a blobd server is running on {store.layout.root};"
                             " stop it to run fsck --repair (a plain fsck works beside"
                             " it)") from None
        await store.open(exclusive=False, recover=False, write=False)
        live = True
    try:
        return await check(store, verify=verify, repair=repair, live=live,
                           progress=progress)
    finally:
        await store.close()


async def check(store: Store, *, verify: bool = False, repair: bool = False,
                live: bool = False, progress: ProgressFactory | None = None) -> Report:
    """Check an open store. ``live``: a server may be writing to it (then
    ``repair`` is not allowed)."""
    assert not (live and repair), "repairs need the data-dir lock"
    report = Report(live=live, verified=verify)
    started = time.monotonic()
    if not live:
        # Uploads first: undoing tmp/ as start-up does would clear them too,
        # unreported.
        report.problems += await _check_uploads(store, repair)
        report.problems += await _check_tmp(store, repair)
    advance = await _start_progress(store, verify, progress)
    # The recount is SQL in the index's thread, the tree scan file system
    # calls in others: run them side by side.
    try:
        async with asyncio.TaskGroup() as group:
            drifted = group.create_task(_check_drift(store, repair))
            group.create_task(disk.check_tree(disk.Scan(store, report, verify, advance)))
    except ExceptionGroup as failures:
        raise first_error(failures) from None
    report.problems += drifted.result()
    if repair:
        await repair_disk(store, report.problems)
    # After the repair, so that what it just moved aside is listed too.
    indexed = {digest for digest in await asyncio.to_thread(_quarantined_digests, store)
               if await index.get_blob(store.db.reader, digest) is not None}
    report.problems += await asyncio.to_thread(_quarantined, store, indexed)
    report.seconds = time.monotonic() - started
    return report


def _quarantined_entries(store: Store) -> list[Path]:
    try:
        return sorted(store.layout.quarantine_dir.iterdir())
    except FileNotFoundError:
        return []


def _quarantined_digests(store: Store) -> list[str]:
    return [found.group(1) for path in _quarantined_entries(store)
            if (found := _DAMAGED_NAME.fullmatch(path.name))]


def _quarantined(store: Store, indexed: set[str]) -> list[Problem]:
    """What the scrub (damaged blob files) and --repair moved aside;
    ``indexed``: the digests among their names the index has a blob of."""
    root = store.layout.root
    return [Problem("quarantined", str(path.relative_to(root)), _advice(store, path, indexed))
            for path in _quarantined_entries(store)]


_DAMAGED_NAME = re.compile(r"([0-9a-f]{64})\.[0-9TZ-]+")


def _advice(store: Store, path: Path, indexed: set[str]) -> str:
    """What the file costs and whether it can go: nothing ever deletes
    quarantine/ (a damaged copy may be all that is left of a blob's
    bytes), so the owner needs to know which copies are of no more use."""
    try:
        st = os.lstat(path)
    except OSError:
        return "moved out of the store; inspect it, then delete it"
    cost = (f"{st.st_size} bytes" if stat.S_ISREG(st.st_mode)
            else "a directory" if stat.S_ISDIR(st.st_mode) else "not a file")
    found = _DAMAGED_NAME.fullmatch(path.name)
    if found is None:
        return f"moved out of the store ({cost}); inspect it, then delete it"
    if found.group(1) not in indexed:
        # An orphan or a stray --repair moved aside, or a blob deleted since.
        return (f"moved out of the store ({cost}); the index has no blob of this hash:"
                " inspect it, then delete it")
    if os.path.isfile(store.layout.blob_path(found.group(1))):
        return f"moved out of the store ({cost}); its blob has its file again: delete it"
    return (f"moved out of the store ({cost}); its blob has no file: while fsck reports"
            " that blob missing this may be all that is left of its bytes, else delete it")


async def _check_tmp(store: Store, repair: bool) -> list[Problem]:
    entries = await asyncio.to_thread(files.tmp_entries, store.layout)
    problems = [Problem("tmp", entry.path.name, "left by a server that stopped uncleanly")
                for entry in entries]
    if repair and problems:
        await store.recover()
        for problem in problems:
            problem.repaired = True
            problem.action = "undone as at start-up (removed, or put back in place)"
    return problems


async def _check_uploads(store: Store, repair: bool) -> list[Problem]:
    strays, lost = await store.session_leftovers()
    short = await store.short_session_files()
    ahead = await store.room_held_ahead()
    problems = [Problem("upload", f"uploads/{name}", "no open upload session owns it")
                for name in sorted(strays)]
    problems += [Problem("upload", session_id, "open upload session without its file")
                 for session_id in sorted(lost)]
    # Before recover_sessions, which would mend them unreported.
    mended = await _check_short(store, short, repair) + await _check_ahead(store, ahead, repair)
    if repair and problems:
        await store.recover_sessions()
        for problem in problems:
            problem.repaired = True
            problem.action = ("removed, as at start-up (its reservation released)"
                              if problem.subject in lost else "removed, as at start-up")
    return problems + mended


async def _check_short(store: Store, short: dict[str, ShortFile],
                       repair: bool) -> list[Problem]:
    """Session files a crash left short of their length. Found before any
    other repair: start-up recovery (which undoing tmp/ and uploads/
    runs) allocates them too, and would leave nothing to report."""
    problems = []
    now = time.time()
    for session_id, (have, size, _) in sorted(short.items()):
        problem = Problem("short", f"uploads/{session_id}",
                          f"{have} bytes of its {size}: a crash came before its room"
                          " was allocated")
        problems.append(problem)
        if not repair:
            continue
        if short[session_id].expired(now):
            # Start-up recovery leaves it too: room for a file about to go.
            problem.action = ("not allocated: its session has expired, and the sweeper"
                              " deletes it (blobd gc does it now)")
            continue
        try:
            await store.allocate_session_file(session_id, size)
        except BlobdError as exc:
            problem.action = (f"not repaired: {exc.message}; free some room and run"
                              " fsck --repair again")
            continue
        problem.repaired = True
        problem.action = f"allocated to its {size} bytes, as at start-up"
    return problems


async def _check_ahead(store: Store, ahead: list[tuple[Session, int]],
                       repair: bool) -> list[Problem]:
    """Deferred-length uploads holding room past their offset: a PATCH a
    crash cut off after it reserved (and allocated) room for its bytes.
    Found before any other repair, for the same reason as the short ones:
    start-up recovery gives the room back too."""
    problems = []
    for session, file_size in sorted(ahead, key=lambda item: item[0].id):
        offset, held = session.upload_offset, session.reserved_bytes
        problem = Problem("ahead", f"uploads/{session.id}",
                          f"{held - offset} bytes reserved past its offset {offset} (its"
                          f" file {file_size} bytes): a crash cut off the PATCH that took"
                          " them")
        problems.append(problem)
        if not repair:
            continue
        await store.release_room_ahead(session)
        problem.repaired = True
        problem.action = (f"given back, as at start-up (its file cut to {offset} bytes,"
                          f" {held - offset} bytes of {session.owner}'s reservation released)")
    return problems


async def _check_drift(store: Store, repair: bool) -> list[Problem]:
    problems = await drift.find(store.db.reader)
    if repair and problems:
        async with store.write() as tx:
            await drift.repair(tx.conn)
        left = {(p.kind, p.subject) for p in await drift.find(store.db.reader)}
        for problem in problems:
            if (problem.kind, problem.subject) not in left:
                problem.repaired = True
                problem.action = "recounted from the references"
    return problems


async def _start_progress(store: Store, verify: bool,
                          progress: ProgressFactory | None) -> Callable[[int], None]:
    if progress is None:
        return lambda n: None
    row = await store.db.fetchone("SELECT count(*) AS n, coalesce(sum(size), 0) AS bytes"
                                  " FROM blobs")
    assert row is not None
    if verify:
        return progress("verifying", row["bytes"], "B")
    return progress("checking", row["n"], "blob")

"""``fsck --repair`` for what the disk comparison found. Runs only while
fsck holds the data-dir lock (no server), and never deletes a file: what
cannot be right is moved to ``quarantine/``.

* a misplaced blob file whose content is an indexed blob without its file
  is moved into place; any other misplaced file is moved aside;
* orphan and stray files are moved aside;
* a file of the wrong size or content is moved aside, so a later PUT of the
  same bytes heals the blob (a damaged file under the right name would
  block that, and would be served); the blob is then missing;
* a wrong SHA-256 in the index is replaced by the content's;
* an indexed blob without its file is dropped from the index when nobody
  references it (nothing is lost); otherwise it stays a problem: only its
  bytes can fix it (re-upload, or the mirror);
* what cannot be read stays a problem: its owner or mode is for a person
  to fix.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from .. import files, index, reaper
from ..store import Store
from . import tree
from .report import Problem

LOST = ("cannot repair here: a PUT of the same bytes heals it,"
        " or restore it from the mirror")
UNREADABLE = ("not repaired: make it readable and writable by the user blobd runs as"
              " (chown, chmod), then run fsck again")


async def repair(store: Store, problems: list[Problem]) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    by_kind = {kind: [p for p in problems if p.kind == kind]
               for kind in ("misplaced", "size", "corrupt", "orphan", "stray",
                            "sha256", "missing")}
    for problem in by_kind["misplaced"]:
        await _misplaced(store, problem, stamp)
    for kind in ("size", "corrupt"):
        for problem in by_kind[kind]:
            where = await _aside(store, store.layout.blob_path(problem.subject), stamp)
            problem.action = f"moved aside to {where}"
            by_kind["missing"].append(problem)
    for kind in ("orphan", "stray"):
        for problem in by_kind[kind]:
            path = problem.evidence.path or store.layout.blob_path(problem.subject)
            problem.action = f"moved aside to {await _aside(store, path, stamp)}"
            problem.repaired = True
    for problem in by_kind["sha256"]:
        async with store.write() as tx:
            await tx.conn.execute("UPDATE blobs SET sha256 = ? WHERE hash = ?",
                                  (problem.evidence.digests.sha256, problem.subject))
        problem.repaired, problem.action = True, "index updated from the content"
    for problem in by_kind["missing"]:
        await _missing(store, problem)
    for problem in problems:
        if problem.kind == "unreadable":
            problem.action = UNREADABLE


async def _aside(store: Store, path: Path, stamp: str) -> Path:
    target = await asyncio.to_thread(tree.move_aside, path, store.layout.quarantine_dir,
                                     stamp)
    return target.relative_to(store.layout.root)


async def _misplaced(store: Store, problem: Problem, stamp: str) -> None:
    path: Path = problem.evidence.path
    digest = path.name
    blob = await index.get_blob(store.db.reader, digest)
    final = store.layout.blob_path(digest)
    if blob is not None and await asyncio.to_thread(tree.stat_file, final) is None:
        digests = await asyncio.to_thread(files.hash_file, path)
        if digests.blake3 == digest and digests.size == blob.size:
            await asyncio.to_thread(tree.put_in_place, path, final)
            problem.repaired, problem.action = True, f"verified and moved to {final.name}"
            return
    problem.action = f"moved aside to {await _aside(store, path, stamp)}"
    problem.repaired = True


async def _missing(store: Store, problem: Problem) -> None:
    """Settle a blob left without its file (found so, or just moved aside)."""
    if await asyncio.to_thread(tree.stat_file, store.layout.blob_path(problem.subject)):
        problem.repaired = True
        problem.action = problem.action or "its file was put back in place"
        return
    async with store.write() as tx:
        dropped = await reaper.delete_now(store, tx, problem.subject)
    if dropped:
        problem.repaired = True
        note = "unreferenced, removed from the index"
        problem.action = f"{problem.action}; {note}" if problem.action else note
    else:
        problem.action = f"{problem.action}; {LOST}" if problem.action else LOST


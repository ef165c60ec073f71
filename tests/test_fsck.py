"""fsck finds damage injected by hand, and --repair fixes what it claims to.

The store is filled through the real API; the damage is done to the real
files and SQLite rows; fsck runs on the same open store (the test process
holds the data-dir lock, as ``blobd fsck`` would with no server running).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import pytest

from blobd import fsck, index_sessions, sessionfiles
from blobd.fsck.report import NOTICES
from blobd.sessions import sweep_sessions as sessions_sweep
from blobd.sessionroom import Ahead
from conftest import b3, blob_files, tmp_files

BODIES = [os.urandom(3000 + i) for i in range(12)]


def blob_path(data_dir: Path, digest: str) -> Path:
    return data_dir / "blobs" / digest[:2] / digest[2:4] / digest


async def filled(server, **sections):
    login = await server(**sections)
    alice, bob = await login("alice"), await login("bob")
    for i, body in enumerate(BODIES):
        assert (await alice.put(body, headers={"Blob-Ref": f"take:{i}"})).status == 201
        if i % 3 == 0:
            assert (await bob.put(body)).status == 200
    return alice, bob


def sql(api, statement: str, *params) -> None:
    """Damage the index behind the server's back, as a stray tool would."""
    with sqlite3.connect(api.data_dir / "index.sqlite3") as conn:
        conn.execute(statement, params)


def found(report) -> set[tuple[str, str]]:
    """What fsck found wrong; the notices of what quarantine/ holds aside."""
    return {(p.kind, p.subject) for p in report.problems if p.kind not in NOTICES}


async def check_and_repair(api, expected: set[tuple[str, str]], *, verify: bool = False,
                           seen_by_repair: set[tuple[str, str]] | None = None):
    """fsck finds exactly ``expected``; --repair (which sees ``seen_by_repair``
    when undoing one problem first clears another); a second fsck agrees with
    every claim the repair made. Returns both reports."""
    first = await fsck.check(api.store, verify=verify)
    assert found(first) == expected, [p.line() for p in first.problems]
    assert not first.ok and not any(p.repaired for p in first.problems)
    repaired = await fsck.check(api.store, verify=verify, repair=True)
    assert found(repaired) == (expected if seen_by_repair is None else seen_by_repair)
    after = await fsck.check(api.store, verify=verify)
    claimed = {(p.kind, p.subject) for p in repaired.problems if p.repaired}
    assert not claimed & found(after), [p.line() for p in after.problems]
    unrepaired = {p.subject for p in repaired.problems if not p.repaired}
    assert {subject for _, subject in found(after)} <= unrepaired
    return repaired, after


async def test_a_sound_store_is_ok(server):
    alice, _ = await filled(server)
    for verify in (False, True):
        report = await fsck.check(alice.store, verify=verify)
        assert report.ok and report.problems == []
        assert report.blobs == report.files == len(BODIES)
    assert (await fsck.check(alice.store, verify=True)).bytes_verified == sum(map(len, BODIES))


async def test_deleted_file_is_missing_and_a_put_heals_it(server):
    alice, _ = await filled(server)
    digest = b3(BODIES[1])
    blob_path(alice.data_dir, digest).unlink()
    repaired, after = await check_and_repair(alice, {("missing", digest)})
    assert "PUT of the same bytes" in repaired.problems[0].action
    assert found(after) == {("missing", digest)}
    assert (await alice.put(BODIES[1])).status == 200
    assert (await fsck.check(alice.store, verify=True)).ok
    assert await (await alice.request("GET", f"/blobs/{digest}")).read() == BODIES[1]


async def test_missing_file_of_an_unreferenced_blob_is_dropped(server):
    alice, _ = await filled(server, gc={"grace_seconds": 3600})
    digest = b3(BODIES[2])
    assert (await alice.request("DELETE", f"/blobs/{digest}")).status == 204
    blob_path(alice.data_dir, digest).unlink()
    _, after = await check_and_repair(alice, {("missing", digest)})
    assert after.ok
    assert await alice.store.db.fetchone("SELECT 1 FROM blobs WHERE hash = ?",
                                         (digest,)) is None


@pytest.mark.parametrize("damage, kind, verify", [
    ("truncate", "size", False), ("flip", "corrupt", True),
])
async def test_damaged_file_is_moved_aside_and_healable(server, damage, kind, verify):
    alice, _ = await filled(server)
    digest = b3(BODIES[3])
    path = blob_path(alice.data_dir, digest)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[:1000])
    else:
        data[1234] ^= 0x01
        path.write_bytes(data)
        assert (await fsck.check(alice.store)).ok  # only --verify reads content
    repaired, after = await check_and_repair(alice, {(kind, digest)}, verify=verify)
    assert "moved aside to quarantine/" in repaired.problems[0].action
    quarantined = list((alice.data_dir / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(digest)
    assert found(after) == {("missing", digest)}
    # The damaged file no longer blocks healing, nor is it ever served.
    assert (await alice.request("GET", f"/blobs/{digest}")).status == 500
    assert (await alice.put(BODIES[3])).status == 200
    assert (await fsck.check(alice.store, verify=True)).ok


async def test_stray_and_orphan_files_are_moved_aside(server):
    alice, _ = await filled(server)
    digest = b3(BODIES[0])
    strays = [alice.data_dir / "blobs" / "README", alice.data_dir / "blobs" / digest[:2] / "zz",
              blob_path(alice.data_dir, digest).with_name("notes.txt")]
    strays[0].write_text("hello")
    strays[1].mkdir()
    strays[2].write_text("notes")
    orphan_body = b"written by something else"
    orphan = blob_path(alice.data_dir, b3(orphan_body))
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(orphan_body)
    expected = {("stray", str(p)) for p in strays} | {("orphan", b3(orphan_body))}
    _, after = await check_and_repair(alice, expected)
    assert after.ok
    assert not any(p.exists() for p in strays + [orphan])
    assert len(list((alice.data_dir / "quarantine").iterdir())) == 4
    assert len(blob_files(alice.data_dir)) == len(BODIES)


async def test_misplaced_file_is_verified_and_put_back(server):
    alice, _ = await filled(server)
    digest = b3(BODIES[4])
    wrong_dir = alice.data_dir / "blobs" / "00" / "00"
    wrong_dir.mkdir(parents=True, exist_ok=True)
    wrong = wrong_dir / digest
    blob_path(alice.data_dir, digest).rename(wrong)
    _, after = await check_and_repair(alice, {("misplaced", str(wrong)), ("missing", digest)})
    assert after.ok and not wrong.exists()
    assert blob_path(alice.data_dir, digest).read_bytes() == BODIES[4]


async def test_corrupt_refcount_is_recounted(server):
    alice, bob = await filled(server)
    digest, lonely = b3(BODIES[0]), b3(BODIES[1])
    sql(alice, "UPDATE blobs SET refcount = 7 WHERE hash = ?", digest)
    sql(alice, "UPDATE blobs SET refcount = 0, zero_at = 1 WHERE hash = ?", lonely)
    _, after = await check_and_repair(alice, {("refcount", digest), ("refcount", lonely)})
    assert after.ok
    for d, count in ((digest, 2), (lonely, 1)):
        meta = await (await alice.request("GET", f"/blobs/{d}/meta")).json()
        assert meta["refcount"] == count
    # The recount is the one deletions go by: both owners let go, it goes.
    await alice.request("DELETE", f"/blobs/{digest}")
    await bob.request("DELETE", f"/blobs/{digest}")
    assert not blob_path(alice.data_dir, digest).exists()


async def test_holdings_and_usage_drift_are_recounted(server):
    alice, bob = await filled(server)
    digest = b3(BODIES[5])
    sql(alice, "DELETE FROM holdings WHERE owner = 'alice' AND hash = ?", digest)
    sql(alice, "UPDATE owners SET used_bytes = 1, used_blobs = 99 WHERE owner = 'bob'")
    expected = {("holdings", f"alice/{digest}"), ("usage", "bob")}
    first = await fsck.check(alice.store)
    assert found(first) == expected
    _, after = await check_and_repair(alice, expected)
    assert after.ok
    bob_quota = await (await bob.request("GET", "/quota")).json()
    assert bob_quota["used_blobs"] == 4
    assert bob_quota["used_bytes"] == sum(len(b) for b in BODIES[::3])
    listing = await (await alice.request("GET", "/blobs?limit=100")).json()
    assert digest in {b["hash"] for b in listing["blobs"]}


async def test_used_refs_drift_is_recounted(server):
    alice, bob = await filled(server, quotas={"default": {"max_refs": 13}})
    sql(alice, "UPDATE owners SET used_refs = 13 WHERE owner = 'alice'")
    sql(alice, "UPDATE owners SET used_refs = 0 WHERE owner = 'bob'")
    refused = await alice.put(b"one more")
    assert refused.status == 507 and "max_refs" in (await refused.json())["message"]
    _, after = await check_and_repair(alice, {("usage", "alice"), ("usage", "bob")})
    assert after.ok
    assert (await (await alice.request("GET", "/quota")).json())["used_refs"] == 12
    assert (await (await bob.request("GET", "/quota")).json())["used_refs"] == 4
    assert (await alice.put(b"one more")).status == 201


async def test_reserved_bytes_drift_is_recounted_from_open_sessions(server):
    alice, _ = await filled(server)
    created = await alice.request("POST", "/uploads", json={"size": 4096})
    assert created.status == 201
    sql(alice, "UPDATE owners SET reserved_bytes = reserved_bytes + 1000 WHERE owner = 'alice'")
    _, after = await check_and_repair(alice, {("reserved", "alice")})
    assert after.ok
    quota = await (await alice.request("GET", "/quota")).json()
    assert quota["reserved_bytes"] == 4096


async def test_reserved_blobs_drift_is_recounted_from_open_sessions(server):
    alice, _ = await filled(server)
    for _ in range(2):
        assert (await alice.request("POST", "/uploads", json={"size": 10})).status == 201
    sql(alice, "UPDATE owners SET reserved_blobs = 7 WHERE owner = 'alice'")
    _, after = await check_and_repair(alice, {("reserved", "alice")})
    assert after.ok
    quota = await (await alice.request("GET", "/quota")).json()
    assert quota["reserved_blobs"] == 2


async def test_wrong_sha256_in_the_index_is_rewritten(server):
    alice, _ = await filled(server)
    digest = b3(BODIES[6])
    sql(alice, "UPDATE blobs SET sha256 = ? WHERE hash = ?", "0" * 64, digest)
    assert (await fsck.check(alice.store)).ok
    _, after = await check_and_repair(alice, {("sha256", digest)}, verify=True)
    assert after.ok


async def test_leftover_temp_files_are_undone_as_at_start_up(server):
    alice, _ = await filled(server)
    digest = b3(BODIES[7])
    # A crash in the middle of a delete that never committed, and a body
    # whose upload died.
    trash = alice.data_dir / "tmp" / f"del-{digest}-0123456789abcdef"
    blob_path(alice.data_dir, digest).rename(trash)
    (alice.data_dir / "tmp" / "put-new-fedcba9876543210").write_bytes(b"half a body")
    leftovers = {("tmp", trash.name), ("tmp", "put-new-fedcba9876543210")}
    # Undoing the temp files first puts the blob back before the tree is read.
    _, after = await check_and_repair(alice, leftovers | {("missing", digest)},
                                      seen_by_repair=leftovers)
    assert after.ok and tmp_files(alice.data_dir) == []
    assert blob_path(alice.data_dir, digest).read_bytes() == BODIES[7]


async def test_progress_is_reported(server):
    alice, _ = await filled(server)
    seen: list[tuple[str, int, str]] = []
    steps: list[int] = []

    def progress(desc: str, total: int, unit: str):
        seen.append((desc, total, unit))
        return steps.append

    await fsck.check(alice.store, progress=progress)
    assert seen == [("checking", len(BODIES), "blob")] and sum(steps) == len(BODIES)
    seen.clear(), steps.clear()
    await fsck.check(alice.store, verify=True, progress=progress)
    total = sum(map(len, BODIES))
    assert seen == [("verifying", total, "B")] and sum(steps) == total


async def test_empty_store_is_ok(server):
    login = await server()
    api = await login("alice")
    report = await fsck.check(api.store, verify=True)
    assert report.ok and report.blobs == 0
    assert "no problems found" in "\n".join(report.summary())


async def test_live_check_ignores_commits_in_flight(server):
    """Uploads and deletions committing while fsck reads the tree and the
    index must never be reported as damage."""
    alice, _ = await filled(server)
    stop = asyncio.Event()

    async def traffic(seed: int) -> None:
        n = 0
        while not stop.is_set():
            data = f"{seed}-{n}".encode() * 100
            n += 1
            assert (await alice.put(data)).status == 201
            assert (await alice.request("DELETE", f"/blobs/{b3(data)}")).status == 204

    workers = [asyncio.create_task(traffic(i)) for i in range(8)]
    try:
        reports = [await fsck.check(alice.store, live=True, verify=i % 2 == 1)
                   for i in range(12)]
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert [p.line() for r in reports for p in r.problems] == []
    assert all(r.live for r in reports)


async def test_repair_reports_upload_leftovers_beside_tmp_ones(server) -> None:
    """Found by review: undoing tmp/ as start-up does cleared uploads/ too,
    so the repair never reported what it removed there."""
    alice = await (await server())("alice")
    (alice.data_dir / "tmp" / "put-new-fedcba9876543210").write_bytes(b"half a body")
    (alice.data_dir / "uploads" / ("ab" * 16)).write_bytes(b"orphan session file")
    plain = await fsck.check(alice.store)
    kinds = {(p.kind, p.subject) for p in plain.problems}
    assert ("upload", "uploads/" + "ab" * 16) in kinds, kinds
    repaired = await fsck.check(alice.store, repair=True)
    kinds = {(p.kind, p.subject) for p in repaired.problems}
    # Expected: the repair run reports (and claims) what it removed.
    assert ("upload", "uploads/" + "ab" * 16) in kinds, kinds


async def test_a_store_without_uploads_dir_is_checked(server):
    """Found by review: a read-only fsck makes no directory, and one missing
    uploads/ stopped it with 'No such file or directory'."""
    alice, _ = await filled(server)
    (alice.data_dir / "uploads").rmdir()
    report = await fsck.check(alice.store)
    assert report.ok, [p.line() for p in report.problems]


async def test_a_session_file_left_short_is_reported_and_allocated(server):
    """Found by review: --repair allocated a session file a crash left
    shorter than its length (as start-up does) without a word, and plain
    fsck did not see it at all. The file is cut as a kill -9 between the
    session's row and its allocation leaves it."""
    alice, _ = await filled(server)
    created = await alice.request("POST", "/uploads", json={"size": 300_000})
    assert created.status == 201
    session = (await created.json())["id"]
    path = alice.data_dir / "uploads" / session
    os.truncate(path, 1000)
    repaired, after = await check_and_repair(alice, {("short", f"uploads/{session}")})
    assert after.ok
    [problem] = repaired.problems
    assert problem.repaired and "allocated" in problem.action, problem.line()
    assert "1000 bytes" in problem.detail and "300000" in problem.detail, problem.line()
    assert any(line.startswith("  upload session file shorter") and line.endswith(
        ": 1, 1 repaired") for line in repaired.summary()), repaired.summary()
    st = path.stat()
    assert st.st_size == 300_000 and st.st_blocks * 512 >= 300_000


async def test_an_expired_session_left_short_is_not_allocated(server):
    """--repair filled out the file of an expired session, which the
    sweeper deletes anyway: room taken on the disk for nothing (the disk
    may be full: that is often why the server crashed). It must leave it
    short and say the sweeper removes it, also when another upload repair
    runs start-up's recovery, which allocated it too."""
    alice, _ = await filled(server, gc={"sweep_interval_seconds": 3600})
    sessions = []
    for _ in range(2):
        created = await alice.request("POST", "/uploads", json={"size": 300_000})
        assert created.status == 201
        sessions.append((await created.json())["id"])
        os.truncate(alice.data_dir / "uploads" / sessions[-1], 1000)
    expired, live = sessions
    sql(alice, "UPDATE uploads SET expires_at = ? WHERE id = ?", time.time() - 1, expired)
    stray = alice.data_dir / "uploads" / ("ab" * 16)
    stray.write_bytes(b"orphan session file")
    repaired = await fsck.check(alice.store, repair=True)
    lines = {p.subject: p for p in repaired.problems}
    assert found(repaired) == {("short", f"uploads/{expired}"), ("short", f"uploads/{live}"),
                               ("upload", f"uploads/{'ab' * 16}")}
    assert lines[f"uploads/{live}"].repaired
    problem = lines[f"uploads/{expired}"]
    assert not problem.repaired, problem.line()
    assert problem.action == ("not allocated: its session has expired, and the sweeper"
                              " deletes it (blobd gc does it now)"), problem.line()
    st = (alice.data_dir / "uploads" / expired).stat()
    assert st.st_size == 1000 and st.st_blocks * 512 < 300_000
    assert (alice.data_dir / "uploads" / live).stat().st_size == 300_000
    # What the repair leaves is the sweeper's to remove.
    assert found(await fsck.check(alice.store)) == {("short", f"uploads/{expired}")}
    assert await sessions_sweep(alice.store, None) == 1
    assert (await fsck.check(alice.store)).ok
    assert not (alice.data_dir / "uploads" / expired).exists()


async def test_room_held_ahead_of_a_deferred_upload_is_reported_and_given_back(server):
    """Found by review: the room a deferred-length PATCH reserved (and
    allocated) before reading its bytes, left held by a crash, was given
    back by --repair only as a side effect of other upload repairs, without
    a word, and plain fsck did not see it. The state is made by the PATCH's
    own reservation (sessionroom.Ahead) never settled, as a kill -9 leaves
    it; the owner's reservation agrees with the upload's, so it is no drift."""
    alice, _ = await filled(server)
    tus = {"Tus-Resumable": "1.0.0"}
    created = await alice.request("POST", "/tus/", headers={**tus, "Upload-Defer-Length": "1"})
    assert created.status == 201, await created.text()
    url = created.headers["Location"]
    session_id = url.rstrip("/").rsplit("/", 1)[1]
    first = os.urandom(1000)
    patched = await alice.request("PATCH", url, data=first, headers={
        **tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    assert patched.status == 204, await patched.text()
    path = alice.data_dir / "uploads" / session_id
    session = await index_sessions.get(alice.store.db.reader, session_id, "alice", time.time())
    fd = sessionfiles.open_locked(path, True)
    try:
        assert await Ahead(alice.store, session, fd).grow(300_000, declared=True) == 300_000
    finally:
        sessionfiles.close(fd)    # the crash: never settled
    quota = await (await alice.request("GET", "/quota")).json()
    assert quota["reserved_bytes"] == 301_000 and path.stat().st_size == 301_000

    repaired, after = await check_and_repair(alice, {("ahead", f"uploads/{session_id}")})
    assert after.ok, [p.line() for p in after.problems]
    [problem] = repaired.problems
    assert "300000 bytes reserved past its offset 1000" in problem.detail, problem.line()
    assert "301000 bytes" in problem.detail, problem.line()
    assert problem.repaired and "given back" in problem.action, problem.line()
    assert any(line.startswith("  deferred-length upload holding room") and line.endswith(
        ": 1, 1 repaired") for line in repaired.summary()), repaired.summary()
    # It holds its offset again, in its file and in the owner's figures.
    quota = await (await alice.request("GET", "/quota")).json()
    assert quota["reserved_bytes"] == 1000 and quota["reserved_blobs"] == 1, quota
    with sqlite3.connect(alice.data_dir / "index.sqlite3") as conn:
        assert conn.execute("SELECT reserved_bytes FROM owners WHERE owner = 'alice'"
                            ).fetchone() == (1000,)
        assert conn.execute("SELECT reserved_bytes FROM uploads WHERE id = ?",
                            (session_id,)).fetchone() == (1000,)
    assert path.read_bytes() == first
    # And the upload goes on from its offset.
    rest = os.urandom(2000)
    done = await alice.request("PATCH", url, data=rest, headers={
        **tus, "Upload-Offset": "1000", "Upload-Length": "3000",
        "Content-Type": "application/offset+octet-stream"})
    assert done.status == 204 and done.headers["Blob-Hash"] == b3(first + rest)

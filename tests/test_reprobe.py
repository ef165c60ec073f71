"""``blobd reprobe``, run as a real process on a real store beside a real
server: rows written "by an older version" (changed with sqlite3 behind
blobd's back) are brought to what today's probe says."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import blake3
import pytest

from audiofixtures import FIXTURES
from serverproc import BlobdServer, blobd_env, http

# Fixture -> how an older blobd stored it: (content_type, audio JSON or None).
OLD_ROWS = {
    # WebM was not read: no facts, and no type from the bytes.
    "tone.webm": ("application/octet-stream", None),
    # MP3 encoder delay was not trimmed: a duration a little long.
    "tone.mp3": ("audio/mpeg", {"duration": 2.1, "bitrate": 32000, "sample_rate": 22050,
                                "channels": 1, "codec": "mp3"}),
    # A type the client named stays; only the facts change.
    "video_sound.webm": ("video/webm", None),
    # 3GP was not read; its type then was the fallback.
    "tone.3gp": ("application/octet-stream", None),
}
UNTOUCHED = ("tone.flac", "not_audio.txt", "not_audio.png")
# Straight to the server, whatever *_proxy variables the environment has.
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def digest_of(name: str) -> str:
    return blake3.blake3((FIXTURES / name).read_bytes()).hexdigest()


def meta(server: BlobdServer, token: str, digest: str) -> tuple[int, dict]:
    status, body = http("GET", f"{server.url}/blobs/{digest}/meta", token)
    return status, json.loads(body)


def put(server: BlobdServer, token: str, data: bytes) -> str:
    digest = blake3.blake3(data).hexdigest()
    status, body = http("PUT", f"{server.url}/blobs/{digest}", token, data)
    assert status in (200, 201), body
    return digest


def rows(server: BlobdServer) -> dict[str, tuple]:
    with sqlite3.connect(server.data_dir / "index.sqlite3") as conn:
        return {r[0]: r[1:] for r in conn.execute("SELECT * FROM blobs")}


def age(server: BlobdServer, olds: dict[str, tuple[str, dict | None]]) -> None:
    """Write rows as an older blobd would have left them."""
    with sqlite3.connect(server.data_dir / "index.sqlite3", timeout=30) as conn:
        for name, (content_type, audio) in olds.items():
            conn.execute("UPDATE blobs SET content_type = ?, audio = ? WHERE hash = ?",
                         (content_type, json.dumps(audio) if audio else None,
                          digest_of(name)))


@pytest.fixture
def stored(tmp_path: Path):
    """A running server holding the fixtures; (server, token, today's /meta
    of each)."""
    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        token = server.token("alice", "read,write")
        today = {}
        for name in (*OLD_ROWS, *UNTOUCHED):
            digest = put(server, token, (FIXTURES / name).read_bytes())
            today[name] = meta(server, token, digest)[1]
        yield server, token, today


def test_reprobe_brings_rows_stored_by_an_older_version_up_to_date(stored) -> None:
    server, token, today = stored
    assert today["tone.webm"]["content_type"] == "audio/webm"
    assert today["tone.webm"]["audio"]["codec"] == "opus"
    age(server, OLD_ROWS)
    before = rows(server)

    # Under today's strictest rules the blobs stay: reprobe never deletes.
    server.config["audio"] = {"require_audio": True, "allowed_types": ["audio/flac"]}
    server._write_config()
    result = server.cli("reprobe", "--no-progress")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(line.split()[1].rstrip(":") for line in lines[:-1]) == \
        sorted(digest_of(name) for name in OLD_ROWS)
    assert all(line.startswith("updated ") for line in lines[:-1])
    assert lines[-1] == (
        "reprobe: 7 blobs examined: 4 updated, 1 unchanged, 2 not audio by their first"
        " bytes (not probed), 0 with their file missing, 0 unreadable")

    for name in (*OLD_ROWS, *UNTOUCHED):
        status, body = meta(server, token, digest_of(name))
        assert status == 200
        if name == "video_sound.webm":
            assert body["content_type"] == "video/webm"
            assert body["audio"] == today[name]["audio"] is not None
        else:
            assert body == today[name], name
    # Nothing but the type and the facts changed: hash, size, references,
    # mirror state (and no row came or went).
    after = rows(server)
    assert after.keys() == before.keys()
    for digest, row in after.items():
        old = before[digest]
        assert row[:2] + row[3:6] + row[7:] == old[:2] + old[3:6] + old[7:], digest
    # Run again: nothing left to do.
    again = server.cli("reprobe", "--no-progress")
    assert again.returncode == 0 and again.stdout.startswith(
        "reprobe: 7 blobs examined: 0 updated, 5 unchanged"), again.stdout


def test_films_without_sound_stored_as_audio_become_the_fallback(tmp_path: Path) -> None:
    """An older blobd typed a WebM or MP4 film with no sound track, sent
    without a type, by its magic: audio/webm, audio/mp4. Today it is no
    audio: application/octet-stream, as an upload would decide. One the
    client called video/webm keeps that type."""
    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        token = server.token("alice", "read,write")
        for name in ("video_only.webm", "video_only.mp4"):
            put(server, token, (FIXTURES / name).read_bytes())
        age(server, {"video_only.webm": ("audio/webm", None),
                     "video_only.mp4": ("audio/mp4", None)})
        result = server.cli("reprobe", "--no-progress")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1].startswith(
            "reprobe: 2 blobs examined: 2 updated, 0 unchanged")
        for name in ("video_only.webm", "video_only.mp4"):
            status, body = meta(server, token, digest_of(name))
            assert (status, body["content_type"], body["audio"]) == \
                (200, "application/octet-stream", None), name
        age(server, {"video_only.webm": ("video/webm", None)})
        result = server.cli("reprobe", "--no-progress", digest_of("video_only.webm"))
        assert result.returncode == 0, result.stderr
        assert meta(server, token, digest_of("video_only.webm"))[1]["content_type"] == \
            "video/webm"


def test_rf64_and_w64_stored_before_they_were_read_become_audio(tmp_path: Path) -> None:
    """An older blobd sniffed neither: an RF64 recording (even one sent as
    audio/wav) and a W64 were stored as application/octet-stream, with no
    facts. Today's first-bytes check lets them be probed."""
    names = ("tone_rf64.wav", "tone.w64")
    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        token = server.token("alice", "read,write")
        today = {name: meta(server, token, put(server, token, (FIXTURES / name).read_bytes()))[1]
                 for name in names}
        assert today["tone_rf64.wav"]["content_type"] == "audio/wav"
        assert today["tone.w64"]["content_type"] == "audio/x-w64"
        age(server, {name: ("application/octet-stream", None) for name in names})
        result = server.cli("reprobe", "--no-progress")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1].startswith(
            "reprobe: 2 blobs examined: 2 updated, 0 unchanged")
        for name in names:
            status, body = meta(server, token, digest_of(name))
            assert status == 200 and body == today[name], name
            assert body["audio"]["codec"] == "pcm" and body["audio"]["duration"] == 0.3


def test_ac3_stored_before_it_was_read_becomes_audio(tmp_path: Path) -> None:
    """An older blobd read no AC-3 or E-AC-3: a rip's soundtrack was
    application/octet-stream with no facts (served so too). After reprobe
    it is audio/ac3 (audio/eac3), served as such, with the facts an
    upload gets today."""
    names = ("tone_51.ac3", "tone_51.eac3")
    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        token = server.token("alice", "read,write")
        today = {name: meta(server, token, put(server, token, (FIXTURES / name).read_bytes()))[1]
                 for name in names}
        age(server, {name: ("application/octet-stream", None) for name in names})
        assert meta(server, token, digest_of("tone_51.ac3"))[1]["audio"] is None
        result = server.cli("reprobe", "--no-progress")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1].startswith(
            "reprobe: 2 blobs examined: 2 updated, 0 unchanged")
        for name, served, codec in (("tone_51.ac3", "audio/ac3", "ac3"),
                                    ("tone_51.eac3", "audio/eac3", "eac3")):
            status, body = meta(server, token, digest_of(name))
            assert status == 200 and body == today[name], name
            assert body["content_type"] == served
            assert body["audio"] == {"duration": 0.32, "bitrate": 192_000, "sample_rate": 48000,
                                     "channels": 6, "codec": codec, "bits_per_sample": None}
            request = urllib.request.Request(f"{server.url}/blobs/{digest_of(name)}",
                                             headers={"Authorization": f"Bearer {token}"})
            with NO_PROXY.open(request, timeout=10) as resp:
                assert resp.headers["Content-Type"] == served
                assert resp.read() == (FIXTURES / name).read_bytes()


def test_dry_run_lists_and_changes_nothing(stored) -> None:
    server, _, _ = stored
    age(server, OLD_ROWS)
    before = rows(server)
    result = server.cli("reprobe", "--dry-run")
    assert result.returncode == 0, result.stderr
    webm = digest_of("tone.webm")
    assert (f"would update {webm}: content_type application/octet-stream -> audio/webm;"
            " audio null -> {") in result.stdout
    assert "4 would be updated" in result.stdout.splitlines()[-1]
    assert rows(server) == before


def test_named_blobs_only_and_an_unknown_one_is_an_error(stored) -> None:
    server, token, today = stored
    age(server, OLD_ROWS)
    webm, mp3 = digest_of("tone.webm"), digest_of("tone.mp3")
    unknown = "ab" * 32
    before = rows(server)
    bad = server.cli("reprobe", webm, unknown)
    assert bad.returncode == 1
    assert bad.stderr.strip() == f"blobd: error: no such blob: {unknown}"
    assert rows(server) == before
    # Among many arguments, the malformed one is named (found by review).
    bad = server.cli("reprobe", webm, "ab" * 31, mp3)
    assert bad.returncode == 1
    assert bad.stderr.startswith(f"blobd: error: {'ab' * 31!r}: address must be 64 hex")
    assert rows(server) == before

    sha = "sha256:" + before[mp3][0]
    result = server.cli("reprobe", webm, sha, webm)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith(
        "reprobe: 2 blobs examined: 2 updated, 0 unchanged")
    assert meta(server, token, webm)[1] == today["tone.webm"]
    assert meta(server, token, mp3)[1] == today["tone.mp3"]
    assert meta(server, token, digest_of("tone.3gp"))[1]["audio"] is None


def test_a_missing_file_is_reported_and_fails_the_run(stored) -> None:
    server, token, today = stored
    age(server, OLD_ROWS)
    gone = digest_of("tone.mp3")
    path = server.data_dir / "blobs" / gone[:2] / gone[2:4] / gone
    path.unlink()
    result = server.cli("reprobe", "--no-progress")
    assert result.returncode == 1
    assert f"missing file: {gone}: {path}" in result.stderr
    assert "3 updated" in result.stdout and "1 with their file missing" in result.stdout
    # The others were still brought up to date; the missing one's row stays.
    assert meta(server, token, digest_of("tone.webm"))[1] == today["tone.webm"]
    assert meta(server, token, gone)[1]["audio"]["duration"] == 2.1


def test_beside_a_live_server_with_uploads_and_deletions_nothing_is_lost(
        tmp_path: Path) -> None:
    config = {"storage": {"fsync": False}, "server": {"workers": 2}}
    with BlobdServer(tmp_path, config) as server:
        token = server.token("alice", "read,write")
        wav = (FIXTURES / "tone.wav").read_bytes()
        # Distinct WAVs (a byte of trailing junk each) with their facts erased.
        olds = [put(server, token, wav + i.to_bytes(2, "big")) for i in range(150)]
        today = meta(server, token, olds[0])[1]
        with sqlite3.connect(server.data_dir / "index.sqlite3", timeout=30) as conn:
            conn.execute("UPDATE blobs SET audio = NULL,"
                         " content_type = 'application/octet-stream'")
        doomed, kept = olds[:50], olds[50:]
        new: list[str] = []
        done = threading.Event()

        def traffic() -> None:
            for i in range(400):
                new.append(put(server, token, wav + b"new" + i.to_bytes(2, "big")))
                if i % 8 == 7:
                    # Spread out, so that deletions fall within the scans.
                    status, _ = http("DELETE", f"{server.url}/blobs/{doomed[i // 8]}",
                                     token)
                    assert status == 204
            done.set()

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            runs = [server.cli("reprobe", "--no-progress", timeout=120)]
            overlapped = not done.is_set()
            while not done.is_set() and len(runs) < 20:   # a few more, while it lasts
                runs.append(server.cli("reprobe", "--no-progress", timeout=120))
        finally:
            worker.join(timeout=120)
        assert not worker.is_alive() and done.is_set() and len(new) == 400
        assert overlapped, "the uploads ended before the first run did"
        assert all(run.returncode == 0 for run in runs), [r.stderr for r in runs]
        for digest in new + kept:
            status, body = meta(server, token, digest)
            assert status == 200 and body["audio"]["codec"] == "pcm", digest
        for digest in kept:
            assert meta(server, token, digest)[1]["audio"] == today["audio"]
        # Deleted blobs were not brought back by an update.
        for digest in doomed:
            assert meta(server, token, digest)[0] == 404
        present = rows(server)
        assert not set(doomed) & present.keys()
        assert len(present) == len(new) + len(kept)
        fsck = server.cli("fsck")
        assert fsck.returncode == 0, fsck.stdout


def test_kill_9_mid_run_leaves_every_row_old_or_new(tmp_path: Path) -> None:
    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        token = server.token("alice", "read,write")
        wav = (FIXTURES / "tone.wav").read_bytes()
        digests = [put(server, token, wav + i.to_bytes(2, "big")) for i in range(200)]
        today = meta(server, token, digests[0])[1]
        old = ("application/octet-stream", None)
        new = (today["content_type"], json.dumps(today["audio"]))
        with sqlite3.connect(server.data_dir / "index.sqlite3", timeout=30) as conn:
            conn.execute("UPDATE blobs SET content_type = ?, audio = ?", old)
        proc = subprocess.Popen(
            [sys.executable, "-m", "blobd", "reprobe", "--no-progress",
             "-c", str(server.config_path)], cwd=tmp_path, env=blobd_env(),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("updated ")   # one has committed
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        with sqlite3.connect(server.data_dir / "index.sqlite3") as conn:
            states = [tuple(r) for r in conn.execute("SELECT content_type, audio FROM blobs")]
        assert len(states) == 200 and set(states) <= {old, new} and new in states
        assert server.cli("fsck").returncode == 0
        again = server.cli("reprobe", "--no-progress")
        assert again.returncode == 0, again.stderr
        for digest in digests:
            body = meta(server, token, digest)[1]
            assert (body["content_type"], body["audio"]) == \
                (today["content_type"], today["audio"]), digest


def test_a_read_that_never_ends_gives_up_at_the_timeout_and_fails_the_run(stored) -> None:
    """A FIFO where the blob file should be: opening it waits for a writer
    that never comes, as a read from a hung mount does."""
    server, token, today = stored
    age(server, OLD_ROWS)
    stuck = digest_of("tone.webm")
    path = server.data_dir / "blobs" / stuck[:2] / stuck[2:4] / stuck
    path.unlink()
    os.mkfifo(path)
    before = rows(server)
    server.config["audio"] = {"probe_timeout_seconds": 0.5}
    server._write_config()
    result = server.cli("reprobe", "--no-progress", timeout=30)
    assert result.returncode == 1
    assert (f"cannot read {stuck}: the probe gave up after 0.5 s"
            " ([audio] probe_timeout_seconds); its row is left as it was") in result.stderr
    assert "3 updated" in result.stdout and result.stdout.strip().endswith(", 1 unreadable")
    assert rows(server)[stuck] == before[stuck]
    assert meta(server, token, digest_of("tone.mp3"))[1] == today["tone.mp3"]


def test_a_named_blob_is_probed_even_when_nothing_says_audio(stored) -> None:
    # An MP3 behind padding: neither its row (stored before the probe read
    # it) nor its first bytes say audio. --all would probe it; naming it
    # must too, as the README and --help promise.
    server, token, _ = stored
    data = (FIXTURES / "tone.mp3").read_bytes()
    size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
    padded = bytes(1000) + data[10 + size:]
    digest = put(server, token, padded)
    today = meta(server, token, digest)[1]
    assert today["content_type"] == "audio/mpeg" and today["audio"]["codec"] == "mp3"
    with sqlite3.connect(server.data_dir / "index.sqlite3", timeout=30) as conn:
        conn.execute("UPDATE blobs SET content_type = 'application/octet-stream',"
                     " audio = NULL WHERE hash = ?", (digest,))
    result = server.cli("reprobe", "--no-progress", digest)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith(
        "reprobe: 1 blobs examined: 1 updated"), result.stdout
    assert meta(server, token, digest)[1] == today


def test_a_file_of_the_wrong_size_is_not_described_and_fails_the_run(stored) -> None:
    # A blob file cut short (a disk's damage, a bad copy) would probe as a
    # shorter sound: its row must keep what the whole blob holds, and the
    # run must say the file is damaged (fsck's "size"), not "updated".
    server, token, today = stored
    age(server, OLD_ROWS)
    cut = digest_of("tone.mp3")
    path = server.data_dir / "blobs" / cut[:2] / cut[2:4] / cut
    size = path.stat().st_size
    os.truncate(path, size // 2)
    result = server.cli("reprobe", "--no-progress")
    assert result.returncode == 1, result.stdout
    assert (f"cannot read {cut}: the file is {size // 2} bytes, its blob {size}"
            in result.stderr), result.stderr
    assert f"updated {cut}" not in result.stdout
    assert "3 updated" in result.stdout and "1 unreadable" in result.stdout
    assert meta(server, token, cut)[1]["audio"]["duration"] == 2.1
    assert meta(server, token, digest_of("tone.webm"))[1] == today["tone.webm"]


def test_a_file_whose_deletion_is_under_way_is_skipped_not_missing(stored) -> None:
    # A deletion moves the blob's file into tmp/ inside its transaction,
    # so until it commits the row is still there and the file is not where
    # it was (GET /blobs serves it from tmp/ then). That is the state frozen
    # here: reprobe must take it for a deletion, as it takes a row already
    # gone, not report a missing file and fail.
    server, _, _ = stored
    age(server, OLD_ROWS)
    leaving = digest_of("tone.mp3")
    path = server.data_dir / "blobs" / leaving[:2] / leaving[2:4] / leaving
    path.rename(server.data_dir / "tmp" / f"del-{leaving}-{os.getpid()}-1")
    result = server.cli("reprobe", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "missing" not in result.stderr
    assert result.stdout.splitlines()[-1].endswith(
        "0 with their file missing, 0 unreadable; 1 skipped (deleted or changed"
        " while reprobe ran)"), result.stdout


def test_rows_of_the_audio_polish_are_brought_up_to_date(tmp_path: Path) -> None:
    """What an older blobd stored: a damaged FLAC behind a long ID3 tag as
    audio/mpeg (the tag's type), a chained Ogg with its first link's
    length, an E-AC-3 in MP4 with 2 channels, a WAV of one sample frame as
    no audio. Reprobe gives each what an upload gets today."""
    olds = {
        "id3_long_cut.flac": ("audio/mpeg", None),
        "chained.opus": ("audio/opus", {"duration": 0.5, "bitrate": 36560, "sample_rate": 48000,
                                        "channels": 1, "codec": "opus",
                                        "bits_per_sample": None}),
        "tone_51_eac3.mp4": ("audio/mp4", {"duration": 0.315, "bitrate": 212597,
                                           "sample_rate": 48000, "channels": 2,
                                           "codec": "eac3", "bits_per_sample": None}),
        "one_sample.wav": ("audio/wav", None),
    }
    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        token = server.token("alice", "read,write")
        today = {name: meta(server, token, put(server, token, (FIXTURES / name).read_bytes()))[1]
                 for name in olds}
        assert today["id3_long_cut.flac"]["content_type"] == "audio/flac"
        assert today["chained.opus"]["audio"]["duration"] == 0.8
        assert today["tone_51_eac3.mp4"]["audio"]["channels"] == 6
        assert today["one_sample.wav"]["audio"]["duration"] == 0.000125
        age(server, olds)
        result = server.cli("reprobe", "--no-progress")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1].startswith(
            "reprobe: 4 blobs examined: 4 updated, 0 unchanged")
        for name in olds:
            assert meta(server, token, digest_of(name)) == (200, today[name]), name

"""The one module that builds paths and keys."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from blobd.address import parse_address
from blobd.errors import BlobdError
from blobd.layout import (Layout, backup_time_from_key, digest_from_mirror_key,
                          mirror_backup_key, mirror_blobs_prefix, mirror_key,
                          parse_backup_key, parse_tmp_name)
from serverproc import MAKE_STORE

DIGEST = "ab" + "cd" + "0" * 60


def test_blob_path_is_sharded(tmp_path):
    layout = Layout(tmp_path)
    assert layout.blob_path(DIGEST) == tmp_path / "blobs" / "ab" / "cd" / DIGEST


@pytest.mark.parametrize("bad", ["../x", "AB" + "0" * 62, "0" * 63, "", "/etc/passwd"])
def test_no_unvalidated_string_becomes_a_path(tmp_path, bad):
    layout = Layout(tmp_path)
    with pytest.raises(ValueError):
        layout.blob_path(bad)
    with pytest.raises(ValueError):
        layout.trash_path(bad)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "A"])
def test_session_ids_are_checked(tmp_path, bad):
    with pytest.raises(ValueError):
        Layout(tmp_path).upload_path(bad)


def test_temp_names_round_trip(tmp_path):
    layout = Layout(tmp_path)
    assert parse_tmp_name(layout.new_temp_path(DIGEST).name) == ("put", DIGEST)
    assert parse_tmp_name(layout.new_temp_path().name) == ("put", None)
    assert parse_tmp_name(layout.trash_path(DIGEST).name) == ("del", DIGEST)
    assert parse_tmp_name("junk") is None


@pytest.mark.parametrize("prefix", ["blobs", "a/b/", "", "/x"])
def test_mirror_keys_round_trip(prefix):
    key = mirror_key(prefix, DIGEST)
    assert key.endswith(f"ab/cd/{DIGEST}")
    assert digest_from_mirror_key(prefix, key) == DIGEST
    assert digest_from_mirror_key(prefix, key + "x") is None


@pytest.mark.parametrize("prefix", ["blobs", "a/b/", ""])
def test_backup_keys_sort_by_time_and_are_never_blob_keys(prefix):
    times = [1_700_000_000.25, 1_700_000_000.5, 1_800_000_000.0]
    stores = ["f" * 32, "0" * 32, "e" * 32]  # the stamp decides the order, not the id
    keys = [mirror_backup_key(prefix, at, store) for at, store in zip(times, stores)]
    assert sorted(keys) == keys
    assert all(key.startswith(mirror_blobs_prefix(prefix)) for key in keys)
    assert [parse_backup_key(prefix, key) for key in keys] == list(zip(times, stores))
    assert [backup_time_from_key(prefix, key) for key in keys] == times
    assert [digest_from_mirror_key(prefix, key) for key in keys] == [None] * 3
    assert backup_time_from_key(prefix, mirror_key(prefix, DIGEST)) is None


def test_backup_keys_from_before_store_ids_are_still_read():
    key = "blobs/_index/index-20231114T221320.250000Z.sqlite3"
    assert parse_backup_key("blobs", key) == (1_700_000_000.25, None)
    assert parse_backup_key("blobs", key.replace(".sqlite3", "-XYZ.sqlite3")) is None
    with pytest.raises(ValueError):
        mirror_backup_key("blobs", 0.0, "not-an-id")


@pytest.mark.parametrize("text,algorithm,digest", [
    ("A" * 64, "blake3", "a" * 64),
    ("a" * 64 + ".mp3", "blake3", "a" * 64),
    ("sha256:" + "B" * 64 + ".flac", "sha256", "b" * 64),
])
def test_addresses(text, algorithm, digest):
    address = parse_address(text)
    assert (address.algorithm, address.digest) == (algorithm, digest)


@pytest.mark.parametrize("text", ["a" * 63, "a" * 65, "x" * 64, "a" * 64 + ".", "sha256:",
                                  "a" * 64 + ".mp3.gz", "a" * 64 + "/x", " " + "a" * 64])
def test_bad_addresses(text):
    with pytest.raises(BlobdError) as info:
        parse_address(text)
    assert info.value.code == "invalid_hash" and info.value.status == 400


def test_the_data_dir_is_private_whatever_the_umask(tmp_path):
    """Found by review: under umask 022 the index (every owner's reference
    names, token labels) and the blob directories were readable by every
    local user; outside systemd's UMask=0077 blobd now keeps them private."""
    data = tmp_path / "data"
    config = tmp_path / "blobd.toml"
    config.write_text(f'[server]\ndata_dir = "{data}"\n')
    # The store a first `blobd serve` makes, opened as it opens it.
    subprocess.run(["sh", "-c", 'umask 022 && exec "$0" -c "$1" "$2"', sys.executable,
                    MAKE_STORE, str(config)], check=True, capture_output=True, timeout=60,
                   cwd=Path(__file__).resolve().parent.parent)
    modes = {path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode)
             for path in [data, *data.iterdir()]}
    assert modes["data"] == modes["data/blobs"] == modes["data/uploads"] == 0o750, modes
    assert modes["data/index.sqlite3"] == 0o640, modes
    assert all(mode & 0o007 == 0 for mode in modes.values()), modes

"""Real rot on the mirror's disk: a bit flipped inside a SeaweedFS volume
file, and what ``blobd mirror sync --verify-content`` does about it.

SeaweedFS keeps a CRC per needle (one needle per 4 MiB chunk of an object)
and will not serve a needle that fails it: a GET of an object whose first
chunk rotted answers 500 InternalError; one whose later chunk rotted answers
200 and its body stops where that chunk begins. HEAD answers as before. It
retries the bad read itself for about 13 s before either, so the tests that
read rotten objects take that long (several objects are read at once).
Nothing shortens it for a test: the loop (RetriedFetchChunkData in weed's
util/http) sleeps 1, 1.5, 2.25, 3.4 and 5.1 s up to util.RetryWaitTime,
which only ``weed mount -readRetryTime`` sets; ``weed mini`` has no option
or variable for it. The first test waits it out twice, no fewer: a body cut
short is read again before it counts as damage (", twice").

These tests run a SeaweedFS of their own: the shared one's volume files are
never damaged."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from blobd.config import load_config
from blobd.layout import Layout
from blobd.mirror.common import make_target, no_bar
from blobd.mirror.restore import restore
from blobd.mirror.sync import sync
from conftest import b3
from mirrorhelp import Bucket, GateProxy, in_thread, mirror_section, unique_prefix
from s3server import SeaweedS3
from test_mirror_cli import Setup, mirrored, start

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def rotting(tmp_path_factory):
    """A SeaweedFS whose volume files the tests damage."""
    server = SeaweedS3(tmp_path_factory.mktemp("rotting-seaweedfs"))
    server.start()
    yield server
    server.stop()


def rot(server: SeaweedS3, body: bytes, at: int) -> None:
    """Flip one bit of byte ``at`` of ``body`` where SeaweedFS keeps it, in
    a volume file of its data dir: found by the 64 bytes from there on,
    unique since every body is random."""
    needle = body[at:at + 64]
    for volume in sorted(server.data_dir.glob("*.dat")):
        offset = volume.read_bytes().find(needle)
        if offset >= 0:
            with open(volume, "r+b") as f:
                f.seek(offset)
                byte = f.read(1)[0]
                f.seek(offset)
                f.write(bytes([byte ^ 1]))
            return
    raise AssertionError(f"byte {at} of the body is in no volume file of {server.data_dir}")


def rot_setup(tmp_path: Path, server: SeaweedS3, prefix: str, **mirror) -> Setup:
    section = mirror_section(server, prefix, backup_interval_seconds=0)
    return Setup(tmp_path, "data", {**section, **mirror})


async def test_verify_content_uploads_again_what_the_mirror_cannot_read(
        server, rotting, tmp_path):
    prefix = unique_prefix()
    setup = rot_setup(tmp_path, rotting, prefix)
    bucket = Bucket(rotting, prefix)
    _, alice = await start(server, setup, tmp_path)
    sound, small, big = os.urandom(3000), os.urandom(20_000), os.urandom(9 * MiB)
    for data in (sound, small, big):
        await alice.put(data)
    await mirrored(alice, bucket, {b3(sound), b3(small), b3(big)})
    rot(rotting, small, 5000)  # its only chunk: GET answers 500
    rot(rotting, big, 5 * MiB)  # its second chunk: the body stops at 4 MiB
    for data in (small, big):
        head = await in_thread(bucket.head, bucket.key(b3(data)))
        assert head["ContentLength"] == len(data)  # HEAD sees nothing wrong

    # A restore from the rotten mirror, beside the repair (SeaweedFS takes
    # ~13 s over each bad read, so the two wait together): it used to stop
    # at the first rotten object, every run alike, and never finish.
    assert (await setup.cli("backup")).returncode == 0
    mirror = load_config(setup.config_path).mirror
    rotten = Setup(tmp_path, "rotten", setup.sections["mirror"])

    async def restore_rotten():
        async with make_target(mirror) as target:
            return await restore(load_config(rotten.config_path), target)

    repaired, partial = await asyncio.gather(setup.cli("sync", "--verify-content"),
                                             restore_rotten())
    assert partial.restored == 1 and not partial.corrupt and not partial.dropped_refs
    assert set(partial.unreadable) == {b3(small), b3(big)}
    assert all("the mirror could not read its copy" in why
               for why in partial.unreadable.values())
    assert Layout(rotten.data_dir).blob_path(b3(sound)).read_bytes() == sound
    assert repaired.returncode == 0, repaired.stderr
    assert "read back 1 objects (3000 bytes), 2 damaged, 2 uploaded again" in repaired.stdout
    damage = {line.split(": ")[1]: line for line in repaired.stdout.splitlines()
              if line.startswith("damaged in the bucket: ")}
    assert set(damage) == {b3(small), b3(big)}
    assert "the mirror could not read its copy: GET" in damage[b3(small)]
    assert "InternalError" in damage[b3(small)]
    assert f"the body ended after {4 * MiB} of {9 * MiB} bytes" in damage[b3(big)]
    assert damage[b3(big)].endswith(", twice")
    for data in (small, big):
        assert await in_thread(bucket.get, bucket.key(b3(data))) == data
    # What the restore kept without a file comes back once the mirror serves it.
    healed = await rotten.cli("heal")
    assert healed.returncode == 0, healed.stdout + healed.stderr
    for data in (sound, small, big):
        assert Layout(rotten.data_dir).blob_path(b3(data)).read_bytes() == data

    elsewhere = Setup(tmp_path, "restored", setup.sections["mirror"])
    async with make_target(mirror) as target:
        again = await sync(alice.store, target, mirror, verify_content=True)
        assert again.read == again.in_sync == 3
        assert not again.damaged and not again.failed and not again.to_upload
        restored = await restore(load_config(elsewhere.config_path), target)
    assert restored.restored == 3 and not restored.corrupt
    for data in (sound, small, big):
        assert Layout(elsewhere.data_dir).blob_path(b3(data)).read_bytes() == data


async def test_verify_content_with_the_mirror_down_fails_without_claiming_damage(
        server, rotting, tmp_path):
    port = int(rotting.endpoint.rsplit(":", 1)[1])
    async with GateProxy(port) as proxy:
        prefix = unique_prefix()
        setup = rot_setup(tmp_path, rotting, prefix, endpoint=proxy.url)
        _, alice = await start(server, setup, tmp_path)
        blobs = [os.urandom(5000), os.urandom(6 * MiB)]
        for data in blobs:
            await alice.put(data)
        await mirrored(alice, Bucket(rotting, prefix), {b3(data) for data in blobs})

        def mirror_goes_down_before_reading(description: str, total: int, unit: str):
            if description == "read back":  # after the listing and the HEADs
                proxy.mode = "drop"
            return no_bar(description, total, unit)

        mirror = load_config(setup.config_path).mirror
        async with make_target(mirror) as target:
            report = await sync(alice.store, target, mirror, verify_content=True,
                                bar=mirror_goes_down_before_reading)
        assert not report.damaged and not report.to_upload and report.uploaded == 0
        for data in blobs:
            assert report.failed[b3(data)].startswith("read back: GET ")

        down = await setup.cli("sync", "--verify-content")
        assert down.returncode == 1
        assert "damaged" not in down.stdout + down.stderr

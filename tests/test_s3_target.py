"""S3Target against a real SeaweedFS server (the session `s3server` fixture)."""

import asyncio
import base64
import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiobotocore.session import get_session
from botocore.config import Config

from blobd.storage.s3 import MiB, ObjectTooLarge, S3Error, S3Target

ROOT = Path(__file__).resolve().parent.parent


def make_target(server, **options) -> S3Target:
    return S3Target(
        server.endpoint, server.bucket, server.access_key, server.secret_key,
        server.region, prefix="blobs", **options,
    )


@pytest.fixture
async def target(s3server):
    async with make_target(s3server) as opened:
        yield opened


@pytest.fixture
async def raw(s3server):
    """A plain aiobotocore client, to look at what the server stored."""
    async with get_session().create_client(
        "s3", endpoint_url=s3server.endpoint, region_name=s3server.region,
        aws_access_key_id=s3server.access_key,
        aws_secret_access_key=s3server.secret_key,
        config=Config(s3={"addressing_style": "path"}),
    ) as client:
        yield client


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own in the shared bucket."""
    return f"t-{uuid.uuid4().hex[:12]}/"


def write_random(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


@pytest.mark.parametrize("size", [0, 1, 300_000])
async def test_put_head_download_round_trip(target, raw, s3server, prefix, tmp_path, size):
    source = tmp_path / "source"
    digest = write_random(source, size)
    key = prefix + "blob"

    await target.put_file(key, source, size, digest, "audio/flac", {"blake3": "ab" * 32})

    assert await target.head(key) == {
        "size": size, "sha256": digest, "content_type": "audio/flac",
        "metadata": {"sha256": digest, "blake3": "ab" * 32},
    }
    stored = await raw.head_object(Bucket=s3server.bucket, Key=key, ChecksumMode="ENABLED")
    assert stored["ChecksumSHA256"] == b64(digest)
    copy = tmp_path / "copy"
    assert await target.download_to(key, copy) == size
    assert copy.read_bytes() == source.read_bytes()


async def test_multipart_upload_with_part_checksums(s3server, raw, prefix, tmp_path):
    size = 12 * MiB + 123
    source = tmp_path / "big"
    digest = write_random(source, size)
    key = prefix + "big"

    async with make_target(s3server, multipart_threshold=5 * MiB, part_size=5 * MiB) as small:
        await small.put_file(key, source, size, digest, "audio/wav", {})
        assert await small.head(key) == {
            "size": size, "sha256": digest, "content_type": "audio/wav",
            "metadata": {"sha256": digest},
        }
        copy = tmp_path / "copy"
        assert await small.download_to(key, copy) == size
    assert copy.read_bytes() == source.read_bytes()

    stored = await raw.head_object(Bucket=s3server.bucket, Key=key, ChecksumMode="ENABLED")
    assert stored["ETag"].endswith('-3"')  # 5 + 5 + 2 MiB
    assert stored["ChecksumType"] == "COMPOSITE"
    assert stored["ChecksumSHA256"].endswith("-3")


@pytest.mark.parametrize("multipart", [False, True], ids=["single", "multipart"])
async def test_put_file_refuses_a_file_that_does_not_match_its_sha256(
    s3server, raw, prefix, tmp_path, multipart
):
    size = 6 * MiB
    source = tmp_path / "blob"
    write_random(source, size)
    wrong = hashlib.sha256(b"something else").hexdigest()
    key = prefix + "blob"
    threshold = 5 * MiB if multipart else 64 * MiB

    async with make_target(s3server, multipart_threshold=threshold, part_size=5 * MiB) as t:
        with pytest.raises(S3Error) as caught:
            await t.put_file(key, source, size, wrong, "audio/flac", {})
        assert caught.value.code == "BadDigest"
        assert not caught.value.retryable
        assert await t.head(key) is None

    pending = await raw.list_multipart_uploads(Bucket=s3server.bucket, Prefix=prefix)
    assert pending.get("Uploads", []) == []


async def test_put_file_refuses_a_file_of_another_size(target, prefix, tmp_path):
    source = tmp_path / "blob"
    digest = write_random(source, 1000)
    with pytest.raises(S3Error) as caught:
        await target.put_file(prefix + "blob", source, 999, digest, "audio/flac", {})
    assert caught.value.code == "BadDigest"
    assert await target.head(prefix + "blob") is None


async def test_put_replaces_an_existing_object(target, prefix):
    await target.put_bytes(prefix + "x", b"first", "text/plain")
    await target.put_bytes(prefix + "x", b"second!", "text/plain")
    assert await target.get_bytes(prefix + "x") == b"second!"
    assert (await target.head(prefix + "x"))["size"] == 7


async def test_delete(target, prefix):
    await target.put_bytes(prefix + "gone", b"bytes", "application/octet-stream")
    await target.delete(prefix + "gone")
    assert await target.head(prefix + "gone") is None
    await target.delete(prefix + "gone")  # already gone: not an error
    await target.delete(prefix + "never-existed")


async def test_list_pages_through_every_key_under_the_prefix(target, raw, s3server, prefix):
    expected = [(f"{prefix}{n:03d}", n) for n in range(25)]
    for key, size in expected:
        await target.put_bytes(key, b"x" * size, "application/octet-stream")
    await target.put_bytes(prefix.rstrip("/") + "-outside", b"no", "text/plain")

    listed = [item async for item in target.list(prefix, page_size=10)]

    assert [(item.key, item.size) for item in listed] == expected
    # Last-Modified by the S3 server's clock, which runs on this machine.
    assert all(abs(item.modified - time.time()) < 60 for item in listed)
    # The server honours the page size, so three requests were needed.
    first = await raw.list_objects_v2(Bucket=s3server.bucket, Prefix=prefix, MaxKeys=10)
    assert first["IsTruncated"] and len(first["Contents"]) == 10


async def test_list_of_an_empty_prefix_yields_nothing(target, prefix):
    assert [item async for item in target.list(prefix)] == []


async def test_put_and_get_bytes(target, raw, s3server, prefix):
    data = os.urandom(10_000)
    await target.put_bytes(prefix + "index.db", data, "application/vnd.sqlite3")

    assert await target.get_bytes(prefix + "index.db") == data
    info = await target.head(prefix + "index.db")
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["content_type"] == "application/vnd.sqlite3"
    stored = await raw.head_object(
        Bucket=s3server.bucket, Key=prefix + "index.db", ChecksumMode="ENABLED"
    )
    assert stored["ChecksumSHA256"] == b64(info["sha256"])


async def test_missing_objects(target, prefix, tmp_path):
    assert await target.head(prefix + "missing") is None
    for read in (target.get_bytes(prefix + "missing"),
                 target.download_to(prefix + "missing", tmp_path / "out")):
        with pytest.raises(S3Error) as caught:
            await read
        assert caught.value.not_found
        assert not caught.value.retryable


async def test_read_through_streams_an_object_in_bounded_pieces(target, prefix):
    data = os.urandom(2 * MiB + 300_000)
    await target.put_bytes(prefix + "big", data, "audio/flac")
    pieces: list[bytes] = []
    assert await target.read_through(prefix + "big", lambda piece: pieces.append(bytes(piece)),
                                     limit=len(data)) == len(data)
    assert b"".join(pieces) == data
    assert len(pieces) >= 2 and max(map(len, pieces)) < 2 * MiB  # never the whole object

    with pytest.raises(ObjectTooLarge):
        await target.read_through(prefix + "big", lambda piece: None, limit=len(data) - 1)
    with pytest.raises(S3Error) as caught:
        await target.read_through(prefix + "missing", lambda piece: None)
    assert caught.value.not_found


async def test_wrong_credentials_are_not_retryable(s3server, prefix):
    async with S3Target(s3server.endpoint, s3server.bucket, s3server.access_key,
                        "not-the-secret") as wrong:
        with pytest.raises(S3Error) as caught:
            await wrong.put_bytes(prefix + "x", b"x", "text/plain")
    assert not caught.value.retryable
    assert caught.value.code == "SignatureDoesNotMatch"


async def test_stopped_server_is_retryable_and_restart_recovers(s3server, prefix, tmp_path):
    source = tmp_path / "blob"
    digest = write_random(source, 50_000)
    async with make_target(s3server, max_attempts=1) as t:
        await t.put_bytes(prefix + "before", b"kept", "text/plain")
        await s3server.astop()
        try:
            calls = [
                lambda: t.head(prefix + "before"),
                lambda: t.put_file(prefix + "during", source, 50_000, digest, "audio/flac", {}),
                lambda: t.put_bytes(prefix + "during", b"x", "text/plain"),
                lambda: t.download_to(prefix + "before", tmp_path / "out"),
                lambda: t.get_bytes(prefix + "before"),
                lambda: t.delete(prefix + "before"),
                lambda: anext(t.list(prefix)),
            ]
            for call in calls:
                with pytest.raises(S3Error) as caught:
                    await call()
                assert caught.value.retryable, caught.value
        finally:
            await s3server.astart()

        # The same open target carries on: data from before the stop survived.
        assert await t.get_bytes(prefix + "before") == b"kept"
        await t.put_file(prefix + "during", source, 50_000, digest, "audio/flac", {})
        assert (await t.head(prefix + "during"))["sha256"] == digest


async def test_default_retries_still_end_in_a_retryable_error(tmp_path):
    from s3server import _free_ports

    (port,) = _free_ports(1)  # nothing listens there
    async with S3Target(f"http://127.0.0.1:{port}", "bucket", "k", "s",
                        connect_timeout=1) as t:
        with pytest.raises(S3Error) as caught:
            await t.head("any")
    assert caught.value.retryable


async def test_closed_target_refuses_work(s3server):
    t = make_target(s3server)
    with pytest.raises(RuntimeError):
        await t.head("x")


def test_blobd_imports_without_aiobotocore():
    """Without the s3 extra, blobd imports; using the mirror names the fix."""
    script = (
        "import sys\n"
        "sys.modules['aiobotocore'] = None  # as if not installed\n"
        "from blobd.storage.s3 import S3Target, S3Error\n"
        "try:\n"
        "    S3Target('http://127.0.0.1:1', 'b', 'k', 's')\n"
        "except S3Error as e:\n"
        "    print(e, e.retryable)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "pip install '.[s3]'" in result.stdout
    assert result.stdout.strip().endswith("False")


@pytest.mark.parametrize("jobs", [4, 16])
async def test_the_pool_holds_every_transfer_run_at_once(jobs):
    """`[mirror] concurrency` (or `-j`) transfers are on the wire together:
    with botocore's default pool of 10, the 11th and later queued unseen.
    Counted at an endpoint that accepts connections and never answers."""
    from blobd.config import MirrorConfig
    from blobd.mirror.common import make_target as target_for

    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = MirrorConfig(endpoint=f"http://127.0.0.1:{port}", bucket="b",
                          access_key="k", secret_key="s", concurrency=jobs)
    # Opened, not entered: entering checks the bucket first, which this
    # endpoint never answers (ten seconds of the suite per case).
    t = target_for(config)
    await t.open()
    try:
        heads = [asyncio.create_task(t.head(f"key-{i}")) for i in range(jobs + 8)]
        for _ in range(100):
            if len(held) >= jobs:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # let any extra connection show up too
        assert jobs <= len(held) <= jobs + 8
        for head in heads:
            head.cancel()
        await asyncio.gather(*heads, return_exceptions=True)
    finally:
        await t.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()

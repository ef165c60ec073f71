"""Helpers for mirror tests: a [mirror] section for the shared SeaweedFS
server, a blocking view of the bucket, and polling for what happens in the
background."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
import uuid
from typing import Any, Awaitable, Callable

from blobd.address import is_blake3_hex
from blobd.layout import mirror_key


def unique_prefix() -> str:
    """A key prefix of the test's own in the shared bucket."""
    return f"t-{uuid.uuid4().hex[:12]}"


def mirror_section(s3server, prefix: str, **extra: Any) -> dict[str, Any]:
    section = {"endpoint": s3server.endpoint, "bucket": s3server.bucket,
               "prefix": prefix, "access_key": s3server.access_key,
               "secret_key": s3server.secret_key, "region": s3server.region,
               "retry_max_seconds": 1}
    section.update(extra)
    return section


def b64sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class Bucket:
    """What the S3 server holds under one prefix, read with plain botocore
    (blocking; the async helpers run it in a thread)."""

    def __init__(self, s3server, prefix: str) -> None:
        self.server = s3server
        self.prefix = prefix
        self.name = s3server.bucket
        self.client = s3server.client()

    def key(self, digest: str) -> str:
        return mirror_key(self.prefix, digest)

    def keys(self, under: str = "") -> list[str]:
        keys, token = [], None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self.client.list_objects_v2(Bucket=self.name,
                                               Prefix=f"{self.prefix}/{under}", **extra)
            keys += [item["Key"] for item in page.get("Contents", ())]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]

    def digests(self) -> set[str]:
        names = (key.rsplit("/", 1)[1] for key in self.keys())
        return {name for name in names if is_blake3_hex(name)}

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def head(self, key: str) -> dict[str, Any]:
        return self.client.head_object(Bucket=self.name, Key=key, ChecksumMode="ENABLED")

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)

    def rot(self, key: str, data: bytes) -> None:
        """Give the object other bytes and keep what a HEAD shows of it (its
        metadata, as the mirror wrote it, and content type), as bytes that
        rot on the mirror's disk do."""
        head = self.head(key)
        self.client.put_object(Bucket=self.name, Key=key, Body=data,
                               Metadata=head["Metadata"], ContentType=head["ContentType"])

    def start_upload(self, key: str, part: bytes = b"part") -> str:
        """Begin a multipart upload of ``key`` with one part, as a process
        killed mid-upload leaves it; returns its upload id."""
        upload_id = self.client.create_multipart_upload(Bucket=self.name, Key=key)["UploadId"]
        self.client.upload_part(Bucket=self.name, Key=key, UploadId=upload_id,
                                PartNumber=1, Body=part)
        return upload_id

    def abandoned(self, hours: float) -> bool:
        """Whether every unfinished multipart upload under the prefix began
        more than ``hours`` ago by the server's Initiated and this machine's
        clock, as blobd measures abandoned uploads."""
        page = self.client.list_multipart_uploads(Bucket=self.name, Prefix=f"{self.prefix}/")
        uploads, cutoff = page.get("Uploads", ()), time.time() - hours * 3600
        return bool(uploads) and all(u["Initiated"].timestamp() < cutoff for u in uploads)

    def unfinished(self) -> set[str]:
        """Keys of the multipart uploads under the prefix still unfinished."""
        page = self.client.list_multipart_uploads(Bucket=self.name, Prefix=f"{self.prefix}/")
        return {item["Key"] for item in page.get("Uploads", ())}

    def empty(self) -> int:
        keys = self.keys()
        for key in keys:
            self.delete(key)
        return len(keys)


async def eventually(check: Callable[[], Any], timeout: float = 30.0,
                     interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``check`` until it returns (or its awaitable gives) a truthy
    value; fail the test after ``timeout`` seconds. Blocking checks go
    through ``asyncio.to_thread`` so the server under test keeps running."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        result = check()
        if isinstance(result, Awaitable):
            last = await result
        else:
            last = result
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")


async def in_thread(func: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(func, *args)


class GateProxy:
    """A TCP proxy on 127.0.0.1 in the test's event loop, in front of the
    S3 server, whose ``mode`` a test switches at any time:

    * ``"pass"``: bytes go through both ways;
    * ``"stall"``: connections are accepted (new and open ones alike) and
      nothing goes through, so requests get no answer: a hung gateway, a
      NAS asleep. What was held back goes on once the mode is "pass" again;
    * ``"drop"``: every connection is closed at once (a mirror that is down).

    ``async with GateProxy(port) as proxy: proxy.url``."""

    def __init__(self, target_port: int, mode: str = "pass") -> None:
        self.target_port = target_port
        self._open = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        assert mode in ("pass", "stall", "drop")
        self._mode = mode
        if mode == "pass":
            self._open.set()
        else:
            self._open.clear()
        if mode == "drop":
            for writer in list(self._writers):
                writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> "GateProxy":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "drop":
            writer.close()
            return
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            for each in (writer, up_writer):
                each.close()
                self._writers.discard(each)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._open.wait()
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.close()

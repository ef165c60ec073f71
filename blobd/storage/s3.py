"""The S3 mirror target: one bucket of an S3-compatible server, through aiobotocore.

aiobotocore is the optional `s3` extra, so it is imported when an S3Target is
built, never at module import: blobd runs without it until a mirror is
configured, and then fails with an S3Error naming `pip install '.[s3]'`.

Keys are complete object keys. Only blobd/layout.py builds them; `prefix` is
carried here for it and is never prepended by this module.

Integrity. Every upload carries the blob's SHA-256 in two forms:
- `x-amz-meta-sha256`: the hex digest of the whole object, on single and
  multipart uploads alike; head() returns it. This is what restore and verify
  compare against, since a multipart object has no whole-object SHA-256.
- the S3 checksum the server verifies on receipt. A single PUT sends
  ChecksumSHA256 (base64 of the raw digest). A multipart upload is created
  with ChecksumAlgorithm=SHA256 and each part sends its own ChecksumSHA256;
  the object's checksum is then COMPOSITE ("<base64>-<parts>"), which S3
  defines as the SHA-256 of the concatenated part digests, not of the data.
  The whole-file digest is also recomputed from the parts as they are read
  and compared to the expected one before the upload is completed.
Found with SeaweedFS 4.48 (`weed mini`): it verifies ChecksumSHA256 on
PutObject and UploadPart and answers BadDigest on a mismatch, stores and
returns the checksums (HeadObject with ChecksumMode), answers
ChecksumType=COMPOSITE for multipart, keeps user metadata given at
CreateMultipartUpload, and accepts UNSIGNED-PAYLOAD over plain HTTP.

Payload signing is off (UNSIGNED-PAYLOAD) on purpose: over plain HTTP botocore
would otherwise hash every request body for the signature, reading the file
on the event loop. The signed ChecksumSHA256 header covers the body instead.
File bodies are read by aiohttp in its executor; multipart parts are read and
hashed in a thread, one part at a time, so memory stays near one part.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NamedTuple

import aiohttp

from .s3errors import S3Error, client_error, status_of
from .s3files import (MiB, ObjectTooLarge, b64_digest, open_sized, part_size_for,
                      read_part, stream_through, stream_to_file)

__all__ = ["Listed", "MiB", "ObjectTooLarge", "S3Error", "S3Target", "Unfinished"]

DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
SHA256_METADATA = "sha256"  # sent as x-amz-meta-sha256
ABORT_TIMEOUT = 10.0  # seconds a failed multipart upload may spend aborting


class Listed(NamedTuple):
    """One object of a listing."""
    key: str
    size: int
    modified: float  # its Last-Modified, by the S3 server's clock (Unix time)


class Unfinished(NamedTuple):
    """A multipart upload begun and neither completed nor aborted."""
    key: str
    upload_id: str
    initiated: float  # by the S3 server's clock (Unix time)


class _Counted:
    """A response body that counts the bytes it gave."""

    def __init__(self, body: Any) -> None:
        self._body = body
        self.received = 0

    async def read(self, amount: int) -> bytes:
        data = await self._body.read(amount)
        self.received += len(data)
        return data

    def close(self) -> None:
        self._body.close()


def _import_aiobotocore() -> tuple[Any, Any, Any]:
    try:
        import botocore.exceptions
        from aiobotocore.session import get_session
        from botocore.config import Config
    except ImportError as exc:
        raise S3Error(
            "the S3 mirror needs aiobotocore, blobd's s3 extra: pip install '.[s3]'"
            " in blobd's checkout, into its venv", retryable=False
        ) from exc
    return get_session, Config, botocore.exceptions


class S3Target:
    """One bucket on an S3-compatible server. Use as `async with S3Target(...)`
    or call open()/close(); every method needs the target open."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        prefix: str = "",
        *,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
        max_attempts: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_connections: int = 10,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes")
        self._get_session, self._config_class, self._exc = _import_aiobotocore()
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        self.prefix = prefix.strip("/")
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._credentials = (access_key, secret_key)
        self._attempts = max_attempts
        self._timeouts = (connect_timeout, read_timeout)
        self.max_connections = max_connections
        self._stack: contextlib.AsyncExitStack | None = None
        self._s3: Any = None

    async def open(self) -> None:
        """Create the client. Opens no connection, so it succeeds while the
        server is down; requests then fail with a retryable S3Error."""
        if self._s3 is not None:
            return
        access_key, secret_key = self._credentials
        connect_timeout, read_timeout = self._timeouts
        config = self._config_class(
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            signature_version="s3v4",
            retries={"mode": "standard", "total_max_attempts": self._attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Requests beyond the pool queue for a connection without a word:
            # the pool must fit every transfer the caller runs at once.
            max_pool_connections=self.max_connections,
            # botocore must not compute checksums itself: it would read file
            # bodies on the event loop. Every upload sends its own SHA-256.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        stack = contextlib.AsyncExitStack()
        self._s3 = await stack.enter_async_context(
            self._get_session().create_client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=self.region,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                config=config,
            )
        )
        self._stack = stack

    async def close(self) -> None:
        stack, self._stack, self._s3 = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> S3Target:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def _client(self) -> Any:
        if self._s3 is None:
            raise RuntimeError("S3Target is not open")
        return self._s3

    def url(self, key: str) -> str:
        """`s3://bucket/key`, for messages and logs."""
        return f"s3://{self.bucket}/{key}"

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn botocore's and aiohttp's exceptions into S3Error."""
        exc = self._exc
        try:
            yield
        except exc.ClientError as error:
            raise client_error(action, error) from error
        except (
            exc.ConnectionError,  # refused, connect timeout, DNS, proxy
            exc.HTTPClientError,  # closed mid-request, read timeout, body stream
            exc.IncompleteReadError,  # body shorter than Content-Length
            aiohttp.ClientError,
            TimeoutError,
        ) as error:
            raise S3Error(f"{action}: {error}", retryable=True, code=None) from error
        except exc.BotoCoreError as error:
            raise S3Error(f"{action}: {error}", retryable=False) from error

    async def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        size: int,
        sha256_hex: str,
        content_type: str,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Upload the file at `path` (`size` bytes, SHA-256 `sha256_hex`) to `key`.

        Streams: a single PUT below multipart_threshold, else a multipart
        upload holding about one part in memory. The file must match `size`
        and `sha256_hex`; if it does not, nothing is stored and S3Error with
        code BadDigest (not retryable) is raised. An existing object is
        replaced."""
        meta = {**(metadata or {}), SHA256_METADATA: sha256_hex}
        if size < self.multipart_threshold:
            await self._put_single(key, path, size, sha256_hex, content_type, meta)
        else:
            await self._put_multipart(key, path, size, sha256_hex, content_type, meta)

    async def _put_single(
        self, key: str, path: str | os.PathLike[str], size: int, sha256_hex: str,
        content_type: str, metadata: dict[str, str],
    ) -> None:
        source = await asyncio.to_thread(open_sized, path, size)
        try:
            with self._errors(f"PUT {self.url(key)}"):
                await self._client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=source,
                    ContentLength=size,
                    ContentType=content_type,
                    Metadata=metadata,
                    ChecksumSHA256=b64_digest(sha256_hex),
                )
        finally:
            await asyncio.to_thread(source.close)

    async def _put_multipart(
        self, key: str, path: str | os.PathLike[str], size: int, sha256_hex: str,
        content_type: str, metadata: dict[str, str],
    ) -> None:
        with self._errors(f"create multipart upload {self.url(key)}"):
            upload = await self._client.create_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                ContentType=content_type,
                Metadata=metadata,
                ChecksumAlgorithm="SHA256",
            )
        upload_id = upload["UploadId"]
        try:
            parts = await self._upload_parts(key, upload_id, path, size, sha256_hex)
            with self._errors(f"complete multipart upload {self.url(key)}"):
                await self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            # Best effort: if the server is unreachable the upload stays
            # behind, for blobd.mirror.abandoned (or a bucket lifecycle rule).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    ),
                    ABORT_TIMEOUT,
                )
            raise

    async def _upload_parts(
        self, key: str, upload_id: str, path: str | os.PathLike[str], size: int,
        sha256_hex: str,
    ) -> list[dict[str, Any]]:
        part_size = part_size_for(size, self.part_size)
        whole = hashlib.sha256()
        parts: list[dict[str, Any]] = []
        source = await asyncio.to_thread(open_sized, path, size)
        try:
            sent = 0
            while sent < size:
                data, checksum = await asyncio.to_thread(
                    read_part, source, min(part_size, size - sent), whole
                )
                if not data:
                    break  # the file shrank; caught by the digest check below
                number = len(parts) + 1
                with self._errors(f"upload part {number} of {self.url(key)}"):
                    answer = await self._client.upload_part(
                        Bucket=self.bucket, Key=key, UploadId=upload_id,
                        PartNumber=number, Body=data, ContentLength=len(data),
                        ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum,
                    )
                parts.append({"PartNumber": number, "ETag": answer["ETag"],
                              "ChecksumSHA256": checksum})
                sent += len(data)
        finally:
            await asyncio.to_thread(source.close)
        if sent != size or whole.hexdigest() != sha256_hex.lower():
            raise S3Error(f"{path} does not match sha256 {sha256_hex}; upload aborted",
                          retryable=False, code="BadDigest")
        return parts

    async def head(self, key: str) -> dict[str, Any] | None:
        """{"size", "sha256", "content_type", "metadata"} of `key`, or None
        when there is no such object. "sha256" is None for objects not
        written by put_file/put_bytes."""
        with self._errors(f"HEAD {self.url(key)}"):
            try:
                answer = await self._client.head_object(Bucket=self.bucket, Key=key)
            except self._exc.ClientError as error:
                if status_of(error) == 404:
                    return None
                raise
        metadata = answer.get("Metadata", {})
        return {
            "size": answer["ContentLength"],
            "sha256": metadata.get(SHA256_METADATA),
            "content_type": answer.get("ContentType"),
            "metadata": metadata,
        }

    async def check_access(self) -> None:
        """List at most one key under the prefix: the cheapest request that
        needs the bucket to exist and the credentials to be accepted (a key
        limited to the prefix may list there). Raises S3Error: code
        NoSuchBucket, AccessDenied or 403, ..., or retryable when the
        server is not reachable."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        with self._errors(f"LIST {self.url(prefix)}*"):
            await self._client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)

    async def download_to(self, key: str, path: str | os.PathLike[str],
                          limit: int | None = None) -> int:
        """Stream `key` into the file at `path` (created or truncated), fsync
        it, and return the bytes written; `ObjectTooLarge` past `limit`
        bytes. On failure the file may hold part of the body: give a
        temporary path and rename after verifying."""
        return await self._get_streamed(key, limit,
                                        lambda body: stream_to_file(body, path, limit))

    async def read_through(self, key: str, consume: Callable[[bytearray], object],
                           limit: int | None = None) -> int:
        """Stream `key` through `consume`, called in a thread with one piece
        of about 1 MiB at a time (a buffer reused once it returns: copy what
        is kept), and return the object's length; `ObjectTooLarge` past
        `limit` bytes. Memory stays near one piece whatever the object's
        size. On failure `consume` may have had part of the body."""
        return await self._get_streamed(key, limit,
                                        lambda body: stream_through(body, consume, limit))

    async def _get_streamed(self, key: str, limit: int | None,
                            read: Callable[[Any], Awaitable[int]]) -> int:
        action = f"GET {self.url(key)}"
        with self._errors(action):
            answer = await self._client.get_object(Bucket=self.bucket, Key=key)
            body = _Counted(answer["Body"])
            try:
                if limit is not None and answer.get("ContentLength", 0) > limit:
                    raise ObjectTooLarge(limit)
                return await read(body)
            except self._cut_short as error:
                # Where it broke is all that tells a store refusing a
                # damaged piece (SeaweedFS answers 200 and stops at the
                # chunk whose CRC fails) from a connection lost midway.
                raise S3Error(f"{action}: the body ended after {body.received} of"
                              f" {answer.get('ContentLength')} bytes ({error})",
                              retryable=True, cut_at=body.received) from error
            finally:
                body.close()

    @property
    def _cut_short(self) -> tuple[type[BaseException], ...]:
        """What reading a body that ends before its Content-Length raises:
        aiohttp's ClientPayloadError for a connection closed early (which
        aiobotocore lets through), botocore's for the rest."""
        return (aiohttp.ClientPayloadError, self._exc.IncompleteReadError,
                self._exc.ResponseStreamingError)

    async def delete(self, key: str) -> None:
        """Remove `key`. Removing a missing key is not an error."""
        with self._errors(f"DELETE {self.url(key)}"):
            try:
                await self._client.delete_object(Bucket=self.bucket, Key=key)
            except self._exc.ClientError as error:
                if status_of(error) != 404:
                    raise

    async def list(self, prefix: str, page_size: int = 1000) -> AsyncIterator[Listed]:
        """Yield every object whose key starts with `prefix`, in key order,
        fetching `page_size` keys per request."""
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        )
        with self._errors(f"LIST {self.url(prefix)}*"):
            async for page in pages:
                for entry in page.get("Contents", ()):
                    yield Listed(entry["Key"], entry["Size"], entry["LastModified"].timestamp())

    async def list_unfinished(self, prefix: str) -> AsyncIterator[Unfinished]:
        """Yield every unfinished multipart upload of a key starting with
        `prefix` (their parts take room, and are billed, until aborted)."""
        paginator = self._client.get_paginator("list_multipart_uploads")
        with self._errors(f"LIST multipart uploads {self.url(prefix)}*"):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for entry in page.get("Uploads", ()):
                    yield Unfinished(entry["Key"], entry["UploadId"],
                                     entry["Initiated"].timestamp())

    async def abort_unfinished(self, upload: Unfinished) -> None:
        """Abort `upload` and drop its parts. One already gone (completed or
        aborted meanwhile) is not an error."""
        with self._errors(f"abort multipart upload {self.url(upload.key)}"):
            try:
                await self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id)
            except self._exc.ClientError as error:
                if status_of(error) != 404:
                    raise

    async def put_bytes(
        self, key: str, data: bytes, content_type: str,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Store a small object held in memory, with the same checksum and
        x-amz-meta-sha256 as put_file."""
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).digest())
        with self._errors(f"PUT {self.url(key)}"):
            await self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                Metadata={**(metadata or {}), SHA256_METADATA: digest.hex()},
                ChecksumSHA256=base64.b64encode(digest).decode("ascii"),
            )

    async def get_bytes(self, key: str) -> bytes:
        """The whole body of a small object. A missing key raises S3Error
        with `not_found` true."""
        with self._errors(f"GET {self.url(key)}"):
            answer = await self._client.get_object(Bucket=self.bucket, Key=key)
            body = answer["Body"]
            try:
                return await body.read()
            finally:
                body.close()

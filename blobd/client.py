"""An async HTTP client for blobd, used by the command line and the tests.

:meth:`BlobdClient.upload_file` is the whole "put a file" story: hash it
locally, skip the transfer when the server already has the hash, send small
files with one ``PUT``, big ones through a resumable session (several
chunks at once), and, when an earlier run was cut off, find that run's open
session on the server and send only the chunks it is missing. The client
keeps no state of its own: the server's session list is the state.

Failures raise :class:`BlobdError` with the server's error code and message
(or ``unavailable`` when the server cannot be reached).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, BinaryIO, Callable, TypeVar

import aiohttp

from . import daemonthread, files
from .address import Address, parse_address
from .bodywriter import BodyWriter
from .errors import STATUS, BlobdError

Progress = Callable[[int], None]
T = TypeVar("T")
READ_SIZE = 1 << 20
DEFAULT_URL = "http://127.0.0.1:8420"
# How long a chunk or a completion keeps being retried while the server
# answers that another request still holds it: past the server's default
# [uploads] idle_timeout_seconds (60), after which a stalled one lets go.
BUSY_PATIENCE = 90.0

# How blobd.sessions.check_sessions_on's refusal begins (tests/test_transfer_cli.py
# holds the two together).
SESSIONS_OFF = "upload sessions are turned off on this server"


@dataclass(frozen=True)
class UploadResult:
    blob: dict[str, Any]   # the server's answer: hash, sha256, size, ..., ref
    mode: str              # "put", "session", "resumed" or "skipped"
    sent_bytes: int        # bytes of the file that went over the network
    session_id: str | None = None


def _no_progress(_: int) -> None:
    return None


class BlobdClient:
    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *,
                 timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout))

    async def __aenter__(self) -> "BlobdClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(extra or {})
        return headers

    async def _call(self, method: str, path: str, ok: tuple[int, ...] = (200,),
                    **kwargs: Any) -> tuple[int, Any]:
        """One request; the JSON body (or None) of an expected status."""
        kwargs["headers"] = self._headers(kwargs.get("headers"))
        try:
            async with self._http.request(method, self.url + path, **kwargs) as resp:
                raw = await resp.read()
                if resp.status not in ok:
                    raise _error_from(resp, raw)
                is_json = resp.content_type == "application/json" and raw
                return resp.status, (await resp.json() if is_json else None)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise BlobdError("unavailable", f"cannot reach {self.url}: {exc}") from None

    # -- blobs ---------------------------------------------------------------

    async def put_file(self, path: Path, digest: str, *, ref: str | None = None,
                       content_type: str | None = None,
                       progress: Progress = _no_progress) -> tuple[dict[str, Any], bool]:
        """PUT a whole file by hash with ``Expect: 100-continue``; returns the
        answer and whether the body was sent (not when the server had it)."""
        size = os.path.getsize(path)
        sent = [0]

        async def body() -> AsyncIterator[bytes]:
            async for piece in read_pieces(path, 0, size):
                sent[0] += len(piece)
                progress(len(piece))
                yield piece

        headers = {"Content-Length": str(size)}
        if ref:
            headers["Blob-Ref"] = ref
        if content_type:
            headers["Content-Type"] = content_type
        _, answer = await self._call("PUT", f"/blobs/{digest}", (200, 201), data=body(),
                                     headers=headers, expect100=True)
        return answer, sent[0] > 0

    async def download(self, address: str, dest: Path | BinaryIO, *,
                       progress: Progress = _no_progress,
                       total: Callable[[int], None] = _no_progress) -> files.Digests:
        """Download a blob and verify its hash before any of it reaches
        ``dest``; a mismatch leaves nothing behind and raises.

        ``dest`` is a path or an open binary file (standard output). A path
        to a regular file, or to nothing yet, is replaced whole by a temp
        file written beside it. Anything else there (a symlink, a FIFO, a
        device such as ``/dev/null``) and an open file are written into once
        the blob is verified: until then it waits in a private temp
        directory under the user's ($TMPDIR), since they cannot take back
        bytes once written. A symlink is opened as any program opens it, so
        the kernel's protections apply (``fs.protected_symlinks``: not
        followed in a sticky directory such as /tmp when another user owns
        it); resolving it here and replacing its target would bypass them."""
        parsed = parse_address(address)
        target = (await asyncio.to_thread(_file_to_replace, dest)
                  if isinstance(dest, Path) else None)
        if target is not None:
            temp = target.with_name(f".{target.name}.part-{secrets.token_hex(4)}")
            digests = await self._fetch(parsed, temp, progress, total, durable=True)
            try:
                await asyncio.to_thread(os.replace, temp, target)
            except BaseException:
                await asyncio.to_thread(files.remove_quietly, temp)
                raise
            return digests
        spool = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="blobd-get-"))
        try:
            try:
                # A throwaway copy: no fsync (on a busy disk it held up the
                # output, and Ctrl-C, for seconds).
                digests = await self._fetch(parsed, spool / "blob", progress, total,
                                            durable=False)
            except BlobdError as exc:
                if exc.code != "insufficient_storage":
                    raise
                # Why $TMPDIR: standard output gets the blob only once a
                # copy there is verified, so it needs the blob's size free.
                raise BlobdError(exc.code, f"{spool.parent}: the disk is full; nothing was"
                                 " written (the blob is checked in $TMPDIR before it"
                                 " goes to standard output)") from None
            try:
                await _write_out(spool / "blob", dest)
            except OSError as exc:
                if exc.filename is not None:
                    raise
                # A write into standard output or /dev/full names no file.
                name = str(dest) if isinstance(dest, Path) else "standard output"
                raise OSError(exc.errno, exc.strerror, name) from None
        finally:
            await asyncio.to_thread(shutil.rmtree, spool, True)
        return digests

    async def _fetch(self, parsed: Address, temp: Path, progress: Progress,
                     total: Callable[[int], None], *, durable: bool) -> files.Digests:
        """GET the blob into the new file ``temp`` (fsynced if ``durable``);
        its digests once they match the address (else ``temp`` is removed
        and this raises)."""
        try:
            async with self._http.get(f"{self.url}/blobs/{parsed}",
                                      headers=self._headers()) as resp:
                if resp.status != 200:
                    raise _error_from(resp, await resp.read())
                total(resp.content_length or 0)
                digests = await _save(resp.content.iter_chunked(READ_SIZE), temp, progress,
                                      durable)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            await asyncio.to_thread(files.remove_quietly, temp)
            raise BlobdError("unavailable", f"cannot reach {self.url}: {exc}") from None
        except BaseException:
            await asyncio.to_thread(files.remove_quietly, temp)
            raise
        actual = digests.blake3 if parsed.is_blake3 else digests.sha256
        if actual != parsed.digest:
            await asyncio.to_thread(files.remove_quietly, temp)
            raise BlobdError("digest_mismatch", f"the server sent bytes that hash to"
                             f" {actual}, not {parsed.digest}; nothing was saved")
        return digests

    # -- upload sessions -----------------------------------------------------

    async def create_upload(self, size: int, *, digest: str | None = None,
                            ref: str | None = None, content_type: str | None = None,
                            chunk_size: int | None = None) -> tuple[int, dict[str, Any]]:
        """201 and the new session (complete at once, ``blob_hash`` set, when
        the server has the content already), or 200 and the blob from a
        server of before that (it answered known content like a PUT)."""
        body: dict[str, Any] = {"size": size}
        for key, value in (("hash", digest), ("ref", ref), ("content_type", content_type),
                           ("chunk_size", chunk_size)):
            if value is not None:
                body[key] = value
        return await self._call("POST", "/uploads", (200, 201), json=body)

    async def list_uploads(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/uploads"))[1]["uploads"]

    async def upload_status(self, session_id: str) -> dict[str, Any]:
        return (await self._call("GET", f"/uploads/{session_id}"))[1]

    async def put_chunk(self, session_id: str, idx: int, data: bytes) -> None:
        digest = base64.b64encode(await asyncio.to_thread(_sha256, data)).decode()
        # No Expect: aiohttp's client leaves the body writer's error
        # unretrieved when the connection drops while it waits for 100
        # Continue ("Task exception was never retrieved" on stderr); a busy
        # chunk is rare now that a resumed one takes the chunk over.
        await self._while_busy(lambda: self._call(
            "PUT", f"/uploads/{session_id}/{idx}", (204,), data=data,
            headers={"Content-Digest": f"sha-256=:{digest}:"}))

    async def complete_upload(self, session_id: str) -> dict[str, Any]:
        return (await self._while_busy(lambda: self._call(
            "POST", f"/uploads/{session_id}/complete", (200, 201))))[1]

    async def _while_busy(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, again after the server's Retry-After for as long as it
        answers that another request still holds this part of the upload
        (a resumed upload whose earlier try is still stalled there: the
        server lets go of it after its idle timeout), up to BUSY_PATIENCE."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_PATIENCE
        while True:
            try:
                return await call()
            except BlobdError as exc:
                wait = _busy_wait(exc)
                if wait is None or loop.time() + wait > deadline:
                    raise
            await asyncio.sleep(wait)

    async def abort_upload(self, session_id: str) -> None:
        await self._call("DELETE", f"/uploads/{session_id}", (204,))

    # -- the whole story -----------------------------------------------------

    async def upload_file(self, path: Path, *, ref: str | None = None,
                          content_type: str | None = None, session_threshold: int = 16 << 20,
                          chunk_size: int | None = None, parallel: int = 4,
                          digests: files.Digests | None = None,
                          progress: Progress = _no_progress,
                          already: Progress = _no_progress) -> UploadResult:
        """Upload a file, resuming this owner's open session for the same
        content if there is one. ``already`` is told how many bytes the
        server had before this call sent any."""
        if digests is None:
            digests = await asyncio.to_thread(files.hash_file, path)
        if digests.size < session_threshold:
            return await self._put_whole(path, digests, ref, content_type, progress)
        try:
            session, mode = await self._open_session(digests, ref, content_type, chunk_size)
        except BlobdError as exc:
            if exc.code != "quota_exceeded" or not exc.message.startswith(SESSIONS_OFF):
                raise
            # A server on an older config's max_sessions_per_owner = 0 takes
            # no session and says to send the blob in one PUT: that (not
            # resumable), rather than no upload, and a file it has already
            # is still not sent.
            return await self._put_whole(path, digests, ref, content_type, progress)
        if mode == "skipped" and "id" not in session:
            return UploadResult(session, mode, 0)   # the blob itself
        already(session["bytes_received"])
        sent = await self._send_chunks(path, session, parallel, progress)
        blob = await self.complete_upload(session["id"])
        return UploadResult(blob, mode, sent, None if mode == "skipped" else session["id"])

    async def _put_whole(self, path: Path, digests: files.Digests, ref: str | None,
                         content_type: str | None, progress: Progress) -> UploadResult:
        blob, sent = await self.put_file(path, digests.blake3, ref=ref,
                                         content_type=content_type, progress=progress)
        # An empty file sends no byte and is still new when created.
        stored = sent or blob.get("created", False)
        return UploadResult(blob, "put" if stored else "skipped", digests.size if sent else 0)

    async def _open_session(self, digests: files.Digests, ref: str | None,
                            content_type: str | None,
                            chunk_size: int | None) -> tuple[dict[str, Any], str]:
        # Only a session of this file under this ref is resumed. One under
        # another ref may be another run's, still going: it is left alone.
        stale = [s for s in await self.list_uploads()
                 if s["hash"] == digests.blake3 and s["size"] == digests.size
                 and s["ref"] == ref]
        # (A token without the read scope cannot look: 403, then resume.)
        status, _ = await self._call("HEAD", f"/blobs/{digests.blake3}", (200, 403, 404))
        if stale and status != 200:
            return stale[0], "resumed"
        # The server has the content (stored since, by anyone): answered at
        # once with the reference, and an old session's bytes are not needed.
        status, answer = await self.create_upload(
            digests.size, digest=digests.blake3, ref=ref, content_type=content_type,
            chunk_size=chunk_size)
        known = status == 200 or answer.get("blob_hash") is not None
        if known:
            for session in stale:
                await self.abort_upload(session["id"])
        return answer, "skipped" if known else "session"

    async def _send_chunks(self, path: Path, session: dict[str, Any], parallel: int,
                           progress: Progress) -> int:
        queue = list(session["missing"])
        chunk_size, size = session["chunk_size"], session["size"]
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while queue:
                idx = queue.pop(0)
                start = idx * chunk_size
                length = min(chunk_size, size - start)
                data = await asyncio.to_thread(_read_at, path, start, length)
                await self.put_chunk(session["id"], idx, data)
                sent += length
                progress(length)

        await asyncio.gather(*(worker() for _ in range(max(1, parallel))))
        return sent


async def read_pieces(path: Path, start: int, length: int) -> AsyncIterator[bytes]:
    offset, end = start, start + length
    while offset < end:
        piece = await asyncio.to_thread(_read_at, path, offset, min(READ_SIZE, end - offset))
        if not piece:
            raise BlobdError("bad_request", f"{path} shrank while it was being sent")
        offset += len(piece)
        yield piece


def _read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb", buffering=0) as fh:
        return os.pread(fh.fileno(), length, offset)


def _file_to_replace(dest: Path) -> Path | None:
    """``dest`` if a download replaces it (a regular file, or nothing yet),
    or None for something to write into (see BlobdClient.download).
    Checked before anything is downloaded, naming the path given."""
    try:
        mode = os.stat(dest).st_mode
    except FileNotFoundError:
        mode = None  # nothing there yet, or a dangling symlink
    if mode is not None and stat.S_ISDIR(mode):
        raise BlobdError("bad_request", f"{dest} is a directory; name the file to write")
    if dest.is_symlink() or (mode is not None and not stat.S_ISREG(mode)):
        return None
    if not dest.parent.is_dir():
        raise BlobdError("bad_request", f"{dest.parent} is no directory to write into")
    return dest


async def _write_out(source: Path, dest: Path | BinaryIO) -> None:
    """Copy the verified blob into ``dest``, on a daemon thread: a FIFO
    whose reader stops reading (or a pipe's) would otherwise keep Ctrl-C
    from ending the command, the interpreter waiting for the thread."""
    fd = await _open_to_write(dest) if isinstance(dest, Path) else None

    def copy() -> None:
        with open(source, "rb") as src:
            if fd is not None:
                with open(fd, "wb") as out:
                    shutil.copyfileobj(src, out, READ_SIZE)
            else:
                shutil.copyfileobj(src, dest, READ_SIZE)
                dest.flush()

    await daemonthread.run(copy, name="blobd-get-out")


async def _open_to_write(dest: Path) -> int:
    """``dest`` opened for writing, as a shell's ``>`` opens it; a FIFO no
    one reads yet is waited for here, where Ctrl-C still works."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_CLOEXEC
    while True:
        try:
            fd = await asyncio.to_thread(os.open, dest, flags, 0o666)
        except OSError as exc:
            if exc.errno != errno.ENXIO:   # ENXIO: a FIFO without a reader
                raise
            await asyncio.sleep(0.2)
            continue
        os.set_blocking(fd, True)
        return fd


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def _save(pieces: AsyncIterator[bytes], temp: Path, progress: Progress,
                durable: bool) -> files.Digests:
    writer = await asyncio.to_thread(BodyWriter, temp)
    try:
        async for piece in pieces:
            await asyncio.to_thread(writer.write, piece)
            progress(len(piece))
        return await asyncio.to_thread(writer.finish, durable)
    except BlobdError as exc:
        await asyncio.to_thread(writer.discard)
        if exc.code != "insufficient_storage":
            raise
        # The server's 507 reads "the disk is full" too: say it is this one.
        raise BlobdError(exc.code, f"{temp.parent}: the disk is full; nothing was"
                         " saved") from None
    except BaseException:
        await asyncio.to_thread(writer.discard)
        raise


def _error_from(resp: aiohttp.ClientResponse, raw: bytes) -> BlobdError:
    status = resp.status
    retry_after = resp.headers.get("Retry-After")
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        code = body["error"] if body["error"] in STATUS else "internal"
        extra = {k: v for k, v in body.items() if k not in ("error", "message")}
        return BlobdError(code, str(body.get("message", "")), extra=extra, status=status,
                          headers=headers)
    # Not blobd's JSON: a reverse proxy's error page (nginx's 502 while
    # blobd is down) or another server on that port. The error is one line,
    # so the page's HTML is left out and the answer said in its place.
    text = " ".join(raw.decode(errors="replace").split())
    if text.startswith("<"):
        text = ""
    answer = f"{resp.url.origin()} answered {status} {resp.reason or ''}".rstrip()
    message = (f"{answer}: {text[:200]}" if text else
               f"{answer}, not with an error of blobd's (a proxy whose blobd is down,"
               " or no blobd at this URL?)")
    return BlobdError("internal", message, status=status, headers=headers)


def _busy_wait(exc: BlobdError) -> float | None:
    """Seconds to wait before trying again, for a 409 the server marks as
    transient (another request still holds that part of the upload)."""
    value = exc.headers.get("Retry-After", "")
    if exc.status != 409 or not value.isdigit():
        return None
    return min(max(float(value), 0.2), 10.0)

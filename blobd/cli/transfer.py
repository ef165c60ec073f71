"""``blobd put`` and ``blobd get``: move files to and from a running server.

``put`` prints ``<hash>  <file>`` per file on standard output (like b3sum),
and what it did on standard error; progress bars go to standard error too.
Run it again after an interruption and it resumes where the server stands.
"""

from __future__ import annotations

import argparse
import asyncio
import mimetypes
import os
import stat
import sys
from pathlib import Path

from tqdm import tqdm

from .. import files
from ..address import parse_ref_name
from ..client import DEFAULT_URL, BlobdClient, UploadResult
from ..config import parse_size
from ..errors import BlobdError
from .common import argument_address, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    put = sub.add_parser("put", help="upload files to a server",
                         description="Upload files. Files over the session threshold go"
                         " through a resumable session: run the same command again after"
                         " an interruption and only the missing chunks are sent. A file"
                         " the server already has is not sent at all.")
    put.add_argument("files", nargs="+", metavar="FILE", help="files to upload")
    put.add_argument("--ref", help="also name the blob NAME (one file only)")
    put.add_argument("--content-type", help="the files' type (default: from the name;"
                     " the server recognises audio by its bytes anyway)")
    put.add_argument("--session-threshold", type=_size, default=16 << 20, metavar="SIZE",
                     help="use a resumable session from this size on (default 16MiB)")
    put.add_argument("--chunk-size", type=_size, metavar="SIZE",
                     help="chunk size of new sessions (default: the server's choice)")
    put.add_argument("--parallel", type=positive_int, default=4, metavar="N",
                     help="chunks in flight at once (default 4)")
    _connection_options(put)
    put.set_defaults(run=run_put)

    get = sub.add_parser("get", help="download a blob and verify it",
                         description="Download a blob by its address, verifying its hash"
                         " before the file appears under its name. A FIFO, a device or"
                         " standard output (-o -) is written once the whole blob is"
                         " verified; until then it waits in $TMPDIR.")
    get.add_argument("address", metavar="HASH", help="BLAKE3 hex, or sha256:<hex>")
    get.add_argument("-o", "--output", metavar="FILE",
                     help="where to write it; - for standard output (default: ./<HASH>)")
    _connection_options(get)
    get.set_defaults(run=run_get)


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=os.environ.get("BLOBD_URL", DEFAULT_URL),
                        metavar="URL", help="the server (default: $BLOBD_URL or"
                        f" {DEFAULT_URL})")
    parser.add_argument("--token", default=os.environ.get("BLOBD_TOKEN"), metavar="T",
                        help="bearer token (default: $BLOBD_TOKEN)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars (there are none when standard error is not a terminal)")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bar(args: argparse.Namespace, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=True if args.quiet else None, file=sys.stderr, leave=False, dynamic_ncols=True)


def say(message: str) -> None:
    print(f"blobd: {message}", file=sys.stderr, flush=True)


async def run_put(args: argparse.Namespace) -> int:
    if not args.token:
        raise BlobdError("unauthorized", "a token is needed: --token or $BLOBD_TOKEN")
    if args.ref is not None:
        parse_ref_name(args.ref)
        if len(args.files) > 1:
            raise BlobdError("bad_request", "--ref names one file; give one FILE")
    paths = [Path(p) for p in args.files]
    for path in paths:
        _check_uploadable(path)
    async with BlobdClient(args.server, args.token) as client:
        for path in paths:
            result = await _put_one(client, args, path)
            print(f"{result.blob['hash']}  {path}", flush=True)
    return 0


async def _put_one(client: BlobdClient, args: argparse.Namespace,
                   path: Path) -> UploadResult:
    size = path.stat().st_size
    with _bar(args, size, f"hashing {path.name}") as bar:
        digests = await asyncio.to_thread(files.hash_file, path, bar.update)
    content_type = args.content_type or mimetypes.guess_type(path.name)[0]
    try:
        with _bar(args, size, path.name) as bar:
            result = await client.upload_file(
                path, ref=args.ref, content_type=content_type, digests=digests,
                session_threshold=args.session_threshold, chunk_size=args.chunk_size,
                parallel=args.parallel, progress=bar.update, already=bar.update)
    except BlobdError as exc:
        if exc.code != "unavailable" or size < args.session_threshold:
            raise
        raise BlobdError("unavailable", f"{path}: {exc.message}; run the same command"
                         " again to resume the upload") from None
    say(_describe(path, result, size))
    return result


def _check_uploadable(path: Path) -> None:
    """Only a regular file has the size and the stable bytes an upload
    hashes first and sends after; say what else ``path`` is."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise BlobdError("not_found", f"{path}: no such file") from None
    if stat.S_ISDIR(mode):
        raise BlobdError("bad_request", f"{path}: is a directory; name the files in it")
    if not stat.S_ISREG(mode):
        raise BlobdError("bad_request", f"{path}: is not a regular file")


def _is_stdout(path: str | None) -> bool:
    """Whether ``path`` is this process's standard output (/dev/stdout,
    /dev/fd/1): written as ``-`` is, so the path printed at the end does
    not follow the blob into it, and a file it was redirected to is
    written as the shell opened it (appended to, with >>)."""
    try:
        return path is not None and os.path.samestat(os.stat(path), os.fstat(1))
    except OSError:
        return False


def _describe(path: Path, result: UploadResult, size: int) -> str:
    if result.mode == "skipped":
        return f"{path}: the server has it already; nothing was sent"
    if result.mode == "resumed":
        return (f"{path}: resumed upload session {result.session_id}; sent the"
                f" {result.sent_bytes} of {size} bytes it was missing")
    via = f"upload session {result.session_id}" if result.session_id else "one request"
    return f"{path}: uploaded {result.sent_bytes} bytes in {via}"


async def run_get(args: argparse.Namespace) -> int:
    address = argument_address(args.address)
    to_stdout = args.output == "-" or _is_stdout(args.output)
    dest = Path(args.output or address.digest)
    name = "standard output" if to_stdout else str(dest)
    async with BlobdClient(args.server, args.token) as client:
        with _bar(args, 0, "-" if to_stdout else dest.name) as bar:
            def total(size: int) -> None:
                bar.total = size
                bar.refresh()
            try:
                await client.download(str(address), sys.stdout.buffer if to_stdout else dest,
                                      progress=bar.update, total=total)
            except BlobdError as exc:
                # No token is fine for a server with anonymous_read; for the
                # others, say where one goes.
                if exc.code != "unauthorized" or args.token:
                    raise
                raise BlobdError(exc.code, f"{exc.message}: --token or $BLOBD_TOKEN") from None
    say(f"{name}: verified {address}")
    if not to_stdout:
        print(dest, flush=True)
    return 0

"""``blobd mirror sync --verify-content``: read every object back and hash it.

The metadata check (``--verify``) HEADs each object and compares the
SHA-256 recorded with it. Bytes that rot on the mirror's disk keep their
metadata, so only reading them tells: each object is downloaded, streamed
through BLAKE3 and SHA-256 in a thread (memory stays near one piece of
:meth:`S3Target.read_through` per job, the event loop never hashes), and
checked against the index's size, BLAKE3 (the address) and SHA-256.

Real rot mostly does not come back as wrong bytes: the store refuses to
serve them (see :func:`.common.read_refused`; SeaweedFS retries such a read
itself for about 13 s first, after a restart alike). Such an object is
damaged too ("the mirror could not read its copy"). A mirror that is down
or does not answer is a failure, not damage, so it never sends every blob
to be uploaded again.

What is found damaged is only reported here: :mod:`.sync` uploads it again
from the local file, through the checks of its upload phase (a damaged
local file is refused; a blob deleted meanwhile is not put back). A read
that fails is reported for that blob and the rest go on; one that fails
because the blob was deleted meanwhile (its object removed by the server's
delete job) is no failure, and the blob is left alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .. import index
from ..config import MirrorConfig
from ..files import Hasher
from ..index import BlobRecord
from ..storage.s3 import ObjectTooLarge, S3Error, S3Target
from ..store import Store
from .common import (BarFactory, CopyMismatch, Silence, Unreadable, blob_key, check_copy,
                     read_refused, run_pool)


@dataclass
class ReadBack:
    read: int = 0  # objects read whole (sound or damaged)
    read_bytes: int = 0  # their bytes
    damaged: dict[str, str] = field(default_factory=dict)  # digest -> what is wrong
    gone: list[str] = field(default_factory=list)  # deleted from the index meanwhile
    failed: dict[str, str] = field(default_factory=dict)  # digest -> error


async def read_back(store: Store, target: S3Target, config: MirrorConfig,
                    blobs: list[BlobRecord], jobs: int, bar: BarFactory,
                    silence: Silence | None = None, found: ReadBack | None = None
                    ) -> ReadBack:
    """Download and hash the object of every blob in ``blobs``, into
    ``found`` (a new one by default), which holds what was done if the
    mirror stops answering (:class:`.common.MirrorSilent`)."""
    found = ReadBack() if found is None else found
    silence = Silence(jobs) if silence is None else silence
    progress = bar("read back", sum(b.size for b in blobs), "B")

    async def check(blob: BlobRecord) -> None:
        silence.saw(await _check(store, target, config, blob, found))
        progress.update(blob.size)

    try:
        await run_pool(blobs, jobs, check, silence)
    finally:
        progress.close()
    return found


async def _check(store: Store, target: S3Target, config: MirrorConfig,
                 blob: BlobRecord, found: ReadBack) -> S3Error | None:
    """Read one object back; returns the failure that may be the mirror's
    silence, None when it answered."""
    try:
        hasher = await _read(target, blob_key(config, blob.hash), blob.size)
        check_copy(hasher.digests(), blob.hash, blob.sha256, blob.size)
    except CopyMismatch as exc:
        found.damaged[blob.hash] = str(exc)
    except ObjectTooLarge:
        found.damaged[blob.hash] = f"the mirror's copy of {blob.hash} is longer than" \
                                   f" the blob's {blob.size} bytes"
        return None
    except (S3Error, Unreadable) as exc:
        if await index.get_blob(store.db.reader, blob.hash) is None:
            found.gone.append(blob.hash)  # deleted, its object with it
        elif isinstance(exc, Unreadable):
            found.damaged[blob.hash] = f"the mirror could not read its copy: {exc}"
        elif exc.not_found:
            found.damaged[blob.hash] = "no longer in the bucket"
        else:
            found.failed[blob.hash] = f"read back: {exc}"
        return exc if isinstance(exc, S3Error) else None
    found.read += 1
    found.read_bytes += hasher.size
    return None


async def _read(target: S3Target, key: str, size: int) -> Hasher:
    return await read_refused(functools.partial(_hash_object, target, key, size))


async def _hash_object(target: S3Target, key: str, size: int) -> Hasher:
    hasher = Hasher()
    # The limit: an object grown past the blob is damaged, and is not read
    # to its end.
    await target.read_through(key, hasher.update, limit=size)
    return hasher

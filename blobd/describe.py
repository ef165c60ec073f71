"""What a blob is: its content type and audio facts, decided once at commit.

A new blob is probed with mutagen (`blobd.audio.probe_async`: a worker
thread, bounded by ``[audio] probe_timeout_seconds``, never raising), so the
index knows its duration, bitrate, sample rate, channels and codec. A blob
already in the index is not probed again: its row is the answer, whoever
uploads the same bytes and whatever they call them.

The content type comes from the bytes whenever they identify an audio
format: the probe's type, else the magic-number sniff (a damaged file whose
header still says what it is; but for AC-3, whose header alone says too
little, see PROBED_ONLY). One exception: an MP4 whose brand does not
say audio, a WebM or a Matroska file may be a video, and a specific type the
client gives it stands. Otherwise the client's type is kept when it
is specific; a generic or absent one, or a claim of an audio type that the
bytes do not bear out, becomes ``application/octet-stream``.

``[audio] require_audio`` turns the facts into a gate (:func:`admit`): only
blobs that probe as audio of an allowed type may be stored or referenced by
upload.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import index
from .audio import (AUDIO_MIME_TYPES, AudioInfo, probe_async, sniff_file_async, sniff_mime,
                    without_sound_async)
from .sniff import mp4_brands_say_audio, starts_with_id3v2
from .config import AudioConfig
from .errors import BlobdError
from .files import Digests
from .index import BlobRecord
from .store import Store

# RFC 6838 section 4.2: a type or subtype name has at most 127 characters.
_TOKEN = r"[!#$%&'*+.^_`|~0-9a-z-]{1,127}"
_MEDIA_TYPE = re.compile(f"{_TOKEN}/{_TOKEN}")
WEAK_MAGIC = frozenset({"audio/mpeg", "audio/aac"})
# Types whose first bytes alone name nothing: an AC-3 frame header is
# sixteen bits of sync and a few fields, which text passes now and then (a
# vertical tab, a "w", then "ho@@"), and the next frame, where this one
# ends, lies beyond the bytes sniffed. Only the probe, which reads the
# frames, makes bytes AC-3.
PROBED_ONLY = frozenset({"audio/ac3", "audio/eac3"})
# Containers whose magic says as much of a film as of a song.
MAY_BE_VIDEO = frozenset({"audio/webm", "audio/matroska", "audio/3gpp", "audio/3gpp2"})
GENERIC_TYPES = frozenset({
    "", "application/octet-stream", "application/x-www-form-urlencoded",
    "binary/octet-stream",
})
FALLBACK_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class Description:
    """A blob's content type and, when it probed as audio, the `audio`
    object of ``/meta`` (`AudioInfo.to_json()`); None means not audio."""

    content_type: str
    audio: dict[str, Any] | None = None

    @classmethod
    def of_record(cls, blob: BlobRecord) -> Description:
        return cls(blob.content_type, blob.audio)


def normalise_type(value: str | None) -> str:
    """The media type without parameters, lower case; '' when absent or
    not a media type at all (RFC 9110 ``type/subtype``, ASCII tokens), which
    is then treated as no claim."""
    claimed = (value or "").split(";", 1)[0].strip().lower()
    return claimed if _MEDIA_TYPE.fullmatch(claimed) else ""


async def describe(store: Store, path: Path, digests: Digests,
                   client_type: str | None, *, may_be_audio: bool = True) -> Description:
    """The description of the received file at ``path``: the index row's
    when the blob is already stored (a cheap read), else a fresh probe.
    Bytes that cannot be audio (``may_be_audio`` False) need neither: the
    type comes from the bytes and the client, and for a blob already
    stored the commit keeps its row's, as it does for every upload."""
    if not may_be_audio:
        return Description(content_type(None, digests.head, client_type))
    known = await index.get_blob(store.db.reader, digests.blake3)
    if known is not None:
        return Description.of_record(known)
    timeout = store.config.audio.probe_timeout_seconds
    info = await probe_async(path, timeout)
    silent = info is None and await without_sound_async(path, timeout)
    # Behind ID3v2 tags longer than the head, only the file tells.
    read_type = (await sniff_file_async(path, timeout)
                 if info is None and starts_with_id3v2(digests.head) else None)
    return Description(content_type(info, digests.head, client_type, without_sound=silent,
                                    read_type=read_type),
                       info.to_json() if info is not None else None)


def content_type(info: AudioInfo | None, head: bytes, client_type: str | None, *,
                 without_sound: bool = False, read_type: str | None = None) -> str:
    """Bytes first (probe, then magic), then a specific client claim.
    ``without_sound``: the file's track list holds no sound track
    (`blobd.audio.without_sound`), so its magic's audio type is wrong.
    ``read_type``: what `blobd.audio.sniff_file` read in the file, where
    the head cannot tell (past ID3v2 tags that end beyond it); None: the
    head's magic decides."""
    claimed = normalise_type(client_type)
    specific = claimed not in GENERIC_TYPES and claimed not in AUDIO_MIME_TYPES
    if info is not None:
        # A film with its sound (an MP4 of a generic brand, a WebM or a
        # Matroska file, with a video track) that the client calls a video
        # stays one (found by review: it was served as audio/mp4); its
        # sound's facts remain. Sound alone is audio whatever it is called:
        # phones record voice into such files and pickers name them
        # video/mp4 (or video/webm) by extension.
        if (info.with_video and claimed.startswith("video/")
                and not mp4_brands_say_audio(head)):
            return claimed
        return info.mime
    # A film without sound is no audio, and blobd names no video type
    # itself: a type it decides from the bytes is audio or the fallback,
    # which `decided_by_bytes` (and so reprobe) can tell from a client's.
    # A client that names it (video/webm) keeps that, as for any film.
    sniffed = None if without_sound else read_type or sniff_mime(head)
    if sniffed in PROBED_ONLY:
        sniffed = None
    # A bare MPEG or ADTS frame header is a dozen bits of sync that text
    # starts with by chance (a UTF-16 byte-order mark, FF FE, is one), and
    # an MP4 of a generic brand, a WebM or a Matroska file may be a video:
    # when the probe found no audio behind them, a specific claim weighs more.
    weak = (sniffed in WEAK_MAGIC or sniffed in MAY_BE_VIDEO
            or (sniffed == "audio/mp4" and not mp4_brands_say_audio(head)))
    if sniffed is not None and not (specific and weak):
        return sniffed
    # blobd recognises every type in AUDIO_MIME_TYPES; bytes it did not
    # recognise are not that type, whatever the client says.
    if claimed in GENERIC_TYPES or claimed in AUDIO_MIME_TYPES:
        return FALLBACK_TYPE
    return claimed


def decided_by_bytes(stored_type: str) -> bool:
    """Whether a content type in the index was decided by the bytes, not
    named by the client, so that a better reading of the same bytes may
    change it (``blobd reprobe``). The client's claim is not stored, but
    :func:`content_type` keeps a claim only when it is specific and not an
    audio type: an audio type, or the fallback, came from the probe or the
    magic (the claim was then generic, absent or an audio type, all of
    which count for nothing against the bytes). Any other type is the
    client's own word, and stays."""
    return stored_type in AUDIO_MIME_TYPES or stored_type == FALLBACK_TYPE


def admit(config: AudioConfig, description: Description) -> None:
    """Raise 415 ``unsupported_media_type`` if ``[audio] require_audio`` is
    on and the blob is not audio of one of ``allowed_types``. "Audio" means
    the probe read a plausible stream, not merely that the first bytes look
    like a header."""
    if not config.require_audio:
        return
    allowed = ", ".join(config.allowed_types)
    if description.audio is None:
        raise BlobdError("unsupported_media_type",
                         "this server stores audio only, and the body is not audio"
                         f" it can read (allowed: {allowed})")
    if description.content_type not in config.allowed_types:
        raise BlobdError("unsupported_media_type",
                         f"{description.content_type} is not an allowed type"
                         f" (allowed: {allowed})")

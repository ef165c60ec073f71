"""What a stored blob sounds like: a mutagen probe, run in a thread.

* `sniff_mime(head)` (from blobd.sniff) looks at the first bytes only; it is
  for choosing a Content-Type when the client gave none. `sniff_file(f)`
  also looks past ID3v2 tags longer than those bytes (a bounded read where
  their headers say they end).
* `probe(path)` parses the stream headers with mutagen for duration,
  bitrate, sample rate and channels. It blocks; async code calls
  `probe_async`, which runs it in a worker thread under a time limit.

The probe trusts the bytes, never a file name: the sniffed magic picks the
parser, so FLAC bytes named `.mp3` are reported as FLAC. Anything blobd does
not recognise, or that does not parse into a plausible stream, is "not
audio" (None) rather than an error: a blob is valid whatever it holds, and
its audio facts are a bonus.

Uploads are untrusted, so readers bound their work before mutagen sees the
file. mutagen is a tag editor: it loads every FLAC metadata block and builds
an object per MP4 box and per RIFF chunk, so a file of millions of empty
boxes would take gigabytes. The MP3 and FLAC readers ask mutagen for
stream info only, skipping tags; ID3 tags, FLAC blocks, RIFF and W64
chunks and MP4 boxes are counted first and implausibly many refused (WAVE
in any container is read without mutagen). An Ogg stream's
length is looked for in the file's last OGG_TAIL bytes only, a Matroska
file's without a Duration in its last MATROSKA_TAIL bytes, and
`probe_async`'s timeout bounds the caller's wait whatever the file.

This module owns the dispatch (past any ID3v2 tags, the sniffed type picks
the reader), the plausibility check every reader's result must pass, and
the probe threads. Each format family has a module of its own with its
reader and what it knows of the format: `mp3` (MPEG audio and ADTS AAC),
`flac`, `mp4`, `ogg` (Vorbis, Opus, FLAC in Ogg), `wav` (WAVE, and RIFF's
chunks), `wave64` (the chunks of RF64, BW64 and Sony Wave64), `aiff`
(AIFF and AIFF-C), `ac3` (AC-3 and E-AC-3, read from their frame
headers: mutagen miscounts their channels) and `matroska` (WebM and
Matroska, read by its own bounded EBML reader: mutagen has none); `info`
holds `AudioInfo` and the helpers the readers share.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, TypeVar

from ..sniff import (AUDIO_MIME_TYPES, MAX_ID3_TAGS, MAX_MP3_JUNK, SNIFF_BYTES,
                     could_be_audio, id3v2_size, is_rf64_header, sniff_behind_id3,
                     sniff_mime, starts_with_id3v2)
from .ac3 import read_ac3
from .aiff import read_aiff
from .flac import read_flac
from .info import AudioInfo
from . import matroska, mp4
from .matroska import read_matroska
from .mp3 import read_aac, read_mp3
from .mp4 import read_mp4
from .ogg import OGG_TAIL, read_ogg, read_opus
from .wav import read_wav
from .wave64 import read_rf64, read_w64

__all__ = ["AUDIO_MIME_TYPES", "MAX_MP3_JUNK", "OGG_TAIL", "AudioInfo",
           "could_be_audio", "probe", "probe_async", "probe_file", "sniff_file",
           "sniff_file_async", "sniff_mime", "without_sound", "without_sound_async"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bounds of a believable stream. mutagen's MP3 and ADTS readers hunt for
# frame syncs and can "find" them in noise; a real stream passes these.
_MAX_DURATION = 31 * 24 * 3600.0   # 2 GiB at 8 kb/s is ~25 days
_MIN_SAMPLE_RATE = 1_000
_MAX_SAMPLE_RATE = 768_000
_MAX_CHANNELS = 255

def probe(path: str | os.PathLike[str]) -> AudioInfo | None:
    """Stream facts of the audio file at `path`, or None if it is not audio
    blobd recognises (see AUDIO_MIME_TYPES), is damaged beyond reading, or
    cannot be opened.

    Blocking: it reads headers, and for Ogg the last page. It never raises
    for the file's content: mutagen can throw nearly any exception on
    crafted or broken input, and a blob's audio facts are optional, so
    every failure means "not audio".
    """
    try:
        with open(path, "rb") as f:
            return probe_file(f)
    except OSError as e:
        log.debug("audio probe of %s failed: %r", path, e)
        return None


def probe_file(f: IO[bytes]) -> AudioInfo | None:
    """`probe` of a file its caller opened (binary, buffered; read from the
    start): one that must tell a file it cannot read from one that is not
    audio opens it itself and watches its reads (see blobd.reprobe)."""
    try:
        return _probe_file(f)
    except Exception as e:  # noqa: BLE001 - see probe's docstring
        log.debug("audio probe of %s failed: %r", getattr(f, "name", f), e)
        return None


def _probe_file(f: IO[bytes]) -> AudioInfo | None:
    start = _skip_id3v2(f)
    if start is None:
        return None
    f.seek(start)
    head = f.read(SNIFF_BYTES)
    mime = sniff_mime(head)
    if mime is None and start == 0:
        info = read_mp3(f, 0, head, max_junk=MAX_MP3_JUNK)
    elif mime is None:
        # A tag, then padding beyond its declared size: still MP3 territory.
        info = read_mp3(f, start, head)
    else:
        info = _READERS[mime](f, start, head)
    return info if info is not None and _plausible(info) else None


# The containers that hold films as well as sound, by the type their
# magic announces: their track lists tell a film with no sound.
_FILM_CONTAINERS: dict[str, Callable[[IO[bytes]], bool]] = {
    "audio/mp4": mp4.without_sound, "audio/3gpp": mp4.without_sound,
    "audio/3gpp2": mp4.without_sound, "audio/webm": matroska.without_sound,
    "audio/matroska": matroska.without_sound,
}


def without_sound(f: IO[bytes]) -> bool:
    """Whether the file (binary, buffered) is an MP4, 3GP, WebM or
    Matroska file whose track list is read and holds tracks, none of them
    sound: a film without sound, whose magic announces an audio type. The
    probe finds no audio in it either way; this tells such a file from a
    damaged one whose track list cannot be read. Bounded as the probe's
    readers are, and never raises for the file's content (False)."""
    try:
        f.seek(0)
        check = _FILM_CONTAINERS.get(sniff_mime(f.read(SNIFF_BYTES)) or "")
        return check is not None and check(f)
    except Exception as e:  # noqa: BLE001 - see probe's docstring
        log.debug("track list of %s unreadable: %r", getattr(f, "name", f), e)
        return False


def sniff_file(f: IO[bytes]) -> str | None:
    """`sniff_mime` of the file's first bytes; of a file that opens with
    ID3v2 tags, the format behind them wherever they end. The first bytes
    alone see past a tag only if it ends within them, and a tag of cover
    art runs for megabytes: a damaged FLAC behind one was typed
    audio/mpeg (found by review). Bounded whatever the tags' size: their
    10-byte headers (MAX_ID3_TAGS at most) and SNIFF_BYTES where they end.
    Raises OSError."""
    f.seek(0)
    head = f.read(SNIFF_BYTES)
    start = _skip_id3v2(f) if starts_with_id3v2(head) else None
    if not start:
        # No tag, one cut off (the head tells), or implausibly many.
        return sniff_mime(head)
    f.seek(start)
    return sniff_behind_id3(f.read(SNIFF_BYTES))


def _at_path(read: Callable[[IO[bytes]], T], unreadable: T
             ) -> Callable[[str | os.PathLike[str]], T]:
    """``read`` of the file at a path, ``unreadable`` when it cannot be opened."""
    def at(path: str | os.PathLike[str]) -> T:
        try:
            with open(path, "rb") as f:
                return read(f)
        except OSError:
            return unreadable
    return at


def _skip_id3v2(f: IO[bytes]) -> int | None:
    """Offset just past the ID3v2 tags at the start of the file (0 if none),
    or None if there are implausibly many. ID3 can front MP3, ADTS AAC,
    FLAC, and as some taggers write them WAV, AIFF and W64: each of their
    readers starts where the tags end."""
    offset = 0
    for _ in range(MAX_ID3_TAGS):
        f.seek(offset)
        size = id3v2_size(f.read(10))
        if size is None:
            return offset
        offset += size
    return None


# Formats whose valid files may not say how long they are: FLAC written to a
# pipe (STREAMINFO's total_samples 0), fragmented MP4 (the moov's duration
# 0, the samples in the fragments), and Ogg whose audio stream has no page
# in the file's last OGG_TAIL bytes (another stream muxed with it runs on).
# Elsewhere a missing duration means the header is not what it seems.
_DURATION_MAY_BE_UNKNOWN = frozenset({"audio/flac", "audio/mp4", "audio/3gpp", "audio/3gpp2",
                                      "audio/ogg", "audio/opus", "audio/webm",
                                      "audio/matroska"})


def _plausible(info: AudioInfo) -> bool:
    if info.duration is None:
        known = info.mime in _DURATION_MAY_BE_UNKNOWN
    else:
        known = math.isfinite(info.duration) and 0 < info.duration <= _MAX_DURATION
    return (
        known
        and info.sample_rate is not None
        and _MIN_SAMPLE_RATE <= info.sample_rate <= _MAX_SAMPLE_RATE
        and info.channels is not None and 1 <= info.channels <= _MAX_CHANNELS
    )


def _read_wave(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    """RIFF WAVE, or RF64 and BW64: WAVE with 64-bit sizes, audio/wav too."""
    reader = read_rf64 if is_rf64_header(head) else read_wav
    return reader(f, start, head)


# Each reader takes the file, the offset just past any ID3v2 tags, and the
# SNIFF_BYTES read there.
_READERS: dict[str, Callable[[IO[bytes], int, bytes], AudioInfo | None]] = {
    "audio/mpeg": read_mp3,
    "audio/aac": read_aac,
    "audio/flac": read_flac,
    "audio/mp4": read_mp4,
    "audio/3gpp": read_mp4,
    "audio/3gpp2": read_mp4,
    "audio/ogg": read_ogg,
    "audio/opus": read_opus,
    "audio/wav": _read_wave,
    "audio/x-w64": read_w64,
    "audio/aiff": read_aiff,
    "audio/webm": read_matroska,
    "audio/matroska": read_matroska,
    "audio/ac3": read_ac3,
    "audio/eac3": read_ac3,
}


# --- async ------------------------------------------------------------------

# Probes get their own few threads rather than the loop's default executor.
# A probe stuck in a read that never returns (a hung network mount, a FIFO)
# cannot be killed from Python; here it occupies one probe thread, while the
# rest of the server's file work, on the default executor, goes on. If every
# probe thread is stuck, new probes wait in the queue and time out: blobs
# are still stored and served, only without audio facts.
PROBE_THREADS = 4
_probe_pool = ThreadPoolExecutor(max_workers=PROBE_THREADS,
                                 thread_name_prefix="blobd-probe")


async def probe_async(path: str | os.PathLike[str],
                      timeout: float) -> AudioInfo | None:
    """`probe(path)` in a worker thread, giving up after `timeout` seconds.

    On timeout it returns None, as for a file that is not audio. A probe
    that has not started yet is cancelled; one that is running cannot be
    stopped and finishes in the background. That is acceptable because a
    probe only reads (one open file, nothing changed), its late result is
    dropped, and a stuck probe ties up only the probe pool (see above),
    never the event loop or the default executor.
    """
    return await _in_probe_pool(probe, path, timeout, "audio probe", None)


async def without_sound_async(path: str | os.PathLike[str], timeout: float) -> bool:
    """`without_sound` of the file at ``path`` in a probe thread, False
    after ``timeout`` seconds (as `probe_async`)."""
    return await _in_probe_pool(_at_path(without_sound, False), path, timeout, "track list",
                                False)


async def sniff_file_async(path: str | os.PathLike[str], timeout: float) -> str | None:
    """`sniff_file` of the file at ``path`` in a probe thread; None when it
    cannot be read, or after ``timeout`` seconds."""
    return await _in_probe_pool(_at_path(sniff_file, None), path, timeout, "sniff", None)



async def _in_probe_pool(read: Callable[[Any], T], path: str | os.PathLike[str],
                         timeout: float, what: str, gave_up: T) -> T:
    """``read(path)`` in the probe pool; ``gave_up`` after ``timeout`` s."""
    work = asyncio.get_running_loop().run_in_executor(_probe_pool, read, path)
    try:
        return await asyncio.wait_for(work, timeout)
    except TimeoutError:
        log.warning("%s of %s gave up after %.3g s", what, path, timeout)
        return gave_up

"""What a stored blob sounds like: format sniffing and a mutagen probe.

Two levels of effort:

* `sniff_mime(head)` looks at the first bytes only (magic numbers). It is
  cheap and pure, for choosing a Content-Type when the client gave none.
* `probe(path)` opens the file and parses its stream headers with mutagen to
  get duration, bitrate, sample rate and channels. It is blocking; async code
  calls `probe_async`, which runs it in a thread under a time limit.

The probe trusts the bytes, never a file name: the sniffed magic picks the
mutagen parser, so FLAC bytes named `.mp3` are reported as FLAC. Anything
blobd does not recognise, or that does not parse into a plausible stream,
is "not audio" (None) rather than an error: a blob is valid whatever it
contains, and its audio facts are only a bonus.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

from mutagen.aac import AAC
from mutagen.flac import FLAC
from mutagen.mp3 import MP3
from mutagen.mp4 import MP4
from mutagen.oggopus import OggOpus
from mutagen.oggvorbis import OggVorbis
from mutagen.wave import WAVE

log = logging.getLogger(__name__)

#: The audio Content-Types blobd recognises, as `sniff_mime` and `probe`
#: spell them (one canonical name per format).
AUDIO_MIME_TYPES: frozenset[str] = frozenset({
    "audio/mpeg", "audio/mp4", "audio/aac", "audio/ogg",
    "audio/opus", "audio/flac", "audio/wav",
})

#: How many leading bytes `sniff_mime` needs to decide.
SNIFF_BYTES = 64

# Bounds of a believable stream. mutagen's MP3 and ADTS readers hunt for
# frame syncs and can "find" them in noise; a real stream passes these.
_MAX_DURATION = 31 * 24 * 3600.0   # 2 GiB at 8 kb/s is ~25 days
_MIN_SAMPLE_RATE = 1_000
_MAX_SAMPLE_RATE = 768_000
_MAX_CHANNELS = 255

# With no magic at the start, an MP3 is still accepted when its first frame
# sits within this many bytes: zero padding or a damaged tag before the
# audio. A sync found deeper is more likely MP3 data inside some other file.
_MAX_MP3_JUNK = 8 * 1024


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """Stream facts of one audio file. `duration` is in seconds (rounded to
    milliseconds), `bitrate` in bits per second; `mime` is one of
    AUDIO_MIME_TYPES and is not part of the JSON shape (the blob's
    content_type carries it)."""

    duration: float
    bitrate: int | None
    sample_rate: int | None
    channels: int | None
    codec: str
    mime: str

    def to_json(self) -> dict[str, Any]:
        """The `audio` object of `GET /blobs/<hash>/meta` (API.md)."""
        return {
            "duration": self.duration,
            "bitrate": self.bitrate,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "codec": self.codec,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], mime: str) -> AudioInfo:
        """Rebuild from `to_json()` output plus the blob's content type.
        Raises ValueError on a malformed mapping: stored data that does not
        round-trip is corruption, and should be loud."""
        try:
            info = cls(
                duration=float(data["duration"]),
                bitrate=_optional_int(data["bitrate"]),
                sample_rate=_optional_int(data["sample_rate"]),
                channels=_optional_int(data["channels"]),
                codec=data["codec"],
                mime=mime,
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not an audio info mapping: {e!r}") from e
        if not isinstance(info.codec, str) or mime not in AUDIO_MIME_TYPES:
            raise ValueError(f"bad codec {info.codec!r} or mime {mime!r}")
        return info


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer or null, got {value!r}")
    return value


# --- sniffing ---------------------------------------------------------------

# ftyp major brands of MP4 files that hold audio, or that ffmpeg and other
# muxers write for audio-only MP4. Video-only (M4V, qt), image (heic, avif)
# and 3GPP brands are deliberately absent.
_MP4_AUDIO_BRANDS = frozenset({b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "})
_MP4_GENERIC_BRANDS = frozenset({
    b"isom", b"iso2", b"iso3", b"iso4", b"iso5", b"iso6",
    b"mp41", b"mp42", b"dash",
})


def sniff_mime(head: bytes) -> str | None:
    """The audio MIME type that the leading bytes of a file announce, or None.

    Pass at least SNIFF_BYTES bytes (fewer only for a shorter file). Looks at
    magic numbers only, so it is fast and never touches the disk; it does
    not prove the rest of the file is valid (that is `probe`'s job). An ID3v2
    tag is reported as audio/mpeg although it may front other formats.
    """
    if head.startswith(b"ID3"):
        return "audio/mpeg"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"OggS\x00"):
        return _sniff_ogg(head)
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[4:8] == b"ftyp":
        return _sniff_ftyp(head)
    if head.startswith(b"ADIF") or _is_adts_header(head):
        return "audio/aac"
    if _is_mpeg_audio_header(head):
        return "audio/mpeg"
    return None


def _sniff_ogg(head: bytes) -> str | None:
    # The first page's segment table (length at byte 26) is followed by the
    # first packet, whose opening bytes name the codec of the stream.
    if len(head) < 27:
        return "audio/ogg"
    start = 27 + head[26]
    packet = head[start:start + 8]
    if packet.startswith(b"OpusHead"):
        return "audio/opus"
    if packet.startswith(b"\x80theora"):
        return None
    return "audio/ogg"


def _sniff_ftyp(head: bytes) -> str | None:
    major = head[8:12]
    if major in _MP4_AUDIO_BRANDS or major in _MP4_GENERIC_BRANDS:
        return "audio/mp4"
    # An unfamiliar major brand is still audio if it lists an M4A brand as
    # compatible; those follow the minor version, to the end of the box.
    box_end = min(int.from_bytes(head[:4], "big"), len(head))
    compatible = {head[i:i + 4] for i in range(16, box_end - 3, 4)}
    return "audio/mp4" if compatible & _MP4_AUDIO_BRANDS else None


def _is_adts_header(head: bytes) -> bool:
    # ISO/IEC 13818-7 ADTS: 12-bit sync, layer 00, a defined sampling rate
    # index and a frame length that at least covers its own header.
    if len(head) < 7 or head[0] != 0xFF or head[1] & 0xF6 != 0xF0:
        return False
    if (head[2] >> 2) & 0x0F > 12:
        return False
    frame_length = ((head[3] & 0x03) << 11) | (head[4] << 3) | (head[5] >> 5)
    return frame_length >= 7


def _is_mpeg_audio_header(head: bytes) -> bool:
    return _mpeg_frame_length(head) is not None


# MPEG audio frame header tables (ISO/IEC 11172-3 and 13818-3), in kb/s and
# Hz. Version bits: 3 = MPEG-1, 2 = MPEG-2, 0 = MPEG-2.5 (1 is reserved).
# Layer bits: 3 = Layer I, 2 = Layer II, 1 = Layer III (0 is reserved).
_MPEG_BITRATES = {
    (3, 3): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (3, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (3, 1): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (2, 3): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (2, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000),
                      0: (11025, 12000, 8000)}


def _mpeg_frame_length(head: bytes) -> int | None:
    """Byte length of the MPEG audio frame whose header starts `head`, or
    None if it is not a valid header: 11-bit sync, then no reserved value in
    version, layer, bitrate index (free format is refused too), sampling
    rate index or emphasis."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return None
    version, layer = (head[1] >> 3) & 0x03, (head[1] >> 1) & 0x03
    bitrate_index, rate_index = head[2] >> 4, (head[2] >> 2) & 0x03
    if (version == 1 or layer == 0 or bitrate_index in (0, 15)
            or rate_index == 3 or head[3] & 0x03 == 2):
        return None
    # MPEG-2 and 2.5 share one table for Layers II and III.
    table = (3, layer) if version == 3 else (2, 3 if layer == 3 else 2)
    bitrate = _MPEG_BITRATES[table][bitrate_index - 1] * 1000
    sample_rate = _MPEG_SAMPLE_RATES[version][rate_index]
    padding = (head[2] >> 1) & 0x01
    if layer == 3:
        return (12 * bitrate // sample_rate + padding) * 4
    per_frame = 72 if layer == 1 and version != 3 else 144
    return per_frame * bitrate // sample_rate + padding


# --- probing ----------------------------------------------------------------

def probe(path: str | os.PathLike[str]) -> AudioInfo | None:
    """Stream facts of the audio file at `path`, or None if it is not audio
    blobd recognises (see AUDIO_MIME_TYPES), is damaged beyond reading, or
    cannot be opened.

    Blocking: it reads the file's headers (and, for Ogg, its last page).
    It never raises for the file's content: mutagen can throw nearly any
    exception on crafted or broken input, and a blob's audio facts are
    optional, so every failure means "not audio".
    """
    try:
        with open(path, "rb") as f:
            return _probe_file(f)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.debug("audio probe of %s failed: %r", path, e)
        return None


def _probe_file(f: IO[bytes]) -> AudioInfo | None:
    head = f.read(SNIFF_BYTES)
    mime = sniff_mime(head)
    if head.startswith(b"ID3"):
        mime = _sniff_after_id3(f) or "audio/mpeg"
    elif mime is None:
        return _read_mp3(f, max_junk=_MAX_MP3_JUNK)
    reader = _READERS.get(mime)
    if reader is None:
        return None
    f.seek(0)
    info = reader(f)
    return info if info is not None and _plausible(info) else None


def _sniff_after_id3(f: IO[bytes]) -> str | None:
    # An ID3v2 tag can front ADTS AAC or FLAC as well as MP3: look past the
    # tag (or a stack of them) for the real magic.
    offset = 0
    for _ in range(8):
        f.seek(offset)
        header = f.read(10)
        if not header.startswith(b"ID3") or len(header) < 10:
            break
        size = (header[6] << 21) | (header[7] << 14) | (header[8] << 7) | header[9]
        has_footer = bool(header[5] & 0x10)
        offset += 10 + size + (10 if has_footer else 0)
    f.seek(offset)
    return sniff_mime(f.read(SNIFF_BYTES))


def _plausible(info: AudioInfo) -> bool:
    return (
        math.isfinite(info.duration) and 0 < info.duration <= _MAX_DURATION
        and info.sample_rate is not None
        and _MIN_SAMPLE_RATE <= info.sample_rate <= _MAX_SAMPLE_RATE
        and info.channels is not None and 1 <= info.channels <= _MAX_CHANNELS
    )


def _make_info(stream: Any, codec: str, mime: str, *,
               duration: float | None = None,
               sample_rate: int | None = None) -> AudioInfo:
    """AudioInfo from a mutagen StreamInfo; zero or missing numbers become
    None (mutagen uses 0 for "unknown")."""
    length = stream.length if duration is None else duration
    rate = sample_rate or getattr(stream, "sample_rate", 0)
    return AudioInfo(
        duration=round(float(length), 3),
        bitrate=_positive_int(getattr(stream, "bitrate", 0)),
        sample_rate=_positive_int(rate),
        channels=_positive_int(getattr(stream, "channels", 0)),
        codec=codec,
        mime=mime,
    )


def _positive_int(value: Any) -> int | None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    number = int(round(value))
    return number if number > 0 else None


def _file_size(f: IO[bytes]) -> int:
    return os.fstat(f.fileno()).st_size


def _clamp_to_size(length: float, bitrate: int, available_bytes: int) -> float:
    """The shorter of the length a header claims and what the bytes present
    can hold at `bitrate`: a truncated upload reports what it can play."""
    if bitrate <= 0:
        return length
    return min(length, max(available_bytes, 0) * 8 / bitrate)


_MPEG_LAYER_CODECS = {1: "mp1", 2: "mp2", 3: "mp3"}


def _read_mp3(f: IO[bytes], max_junk: int | None = None) -> AudioInfo | None:
    f.seek(0)
    stream = MP3(f).info
    # "sketchy" means mutagen found fewer than four chained frames and no
    # VBR header: what noise looks like.
    if stream.sketchy:
        return None
    if max_junk is not None and stream.frame_offset > max_junk:
        return None
    if not _has_frame_chain(f, stream.frame_offset):
        return None
    # The Xing/Info header states the full length even when the file was
    # cut short; the bytes actually present bound it.
    length = _clamp_to_size(stream.length, stream.bitrate,
                            _file_size(f) - stream.frame_offset)
    info = _make_info(stream, _MPEG_LAYER_CODECS.get(stream.layer, "mp3"),
                      "audio/mpeg", duration=length)
    return info if _plausible(info) else None


# mutagen accepts an MP3 after four chained frames, a test that runs of
# bytes in executables and data files pass now and then; a real stream goes
# on much longer. The largest frame (MPEG-2 Layer II at 160 kb/s, 8 kHz,
# padded) is 2881 bytes.
_MP3_CHAIN_FRAMES = 8
_MAX_MPEG_FRAME = 2881


def _has_frame_chain(f: IO[bytes], offset: int) -> bool:
    """Whether _MP3_CHAIN_FRAMES frames of one MPEG version, layer and
    sample rate follow each other from `offset`."""
    f.seek(offset)
    data = f.read(_MP3_CHAIN_FRAMES * _MAX_MPEG_FRAME + 4)
    first, pos = data[:4], 0
    for _ in range(_MP3_CHAIN_FRAMES):
        header = data[pos:pos + 4]
        length = _mpeg_frame_length(header)
        if (length is None or header[1] & 0xFE != first[1] & 0xFE
                or header[2] & 0x0C != first[2] & 0x0C):
            return False
        pos += length
    return True


def _mp4_codec(name: str) -> str:
    name = name.lower()
    if name.startswith("mp4a.40."):
        return "aac"
    return {"mp4a.69": "mp3", "mp4a.6b": "mp3", "ac-3": "ac3",
            "ec-3": "eac3"}.get(name, name or "unknown")


def _read_mp4(f: IO[bytes]) -> AudioInfo:
    stream = MP4(f).info
    return _make_info(stream, _mp4_codec(stream.codec), "audio/mp4")


def _read_aac(f: IO[bytes]) -> AudioInfo:
    return _make_info(AAC(f).info, "aac", "audio/aac")


def _read_vorbis(f: IO[bytes]) -> AudioInfo:
    return _make_info(OggVorbis(f).info, "vorbis", "audio/ogg")


def _read_opus(f: IO[bytes]) -> AudioInfo:
    # Opus always decodes at 48 kHz (RFC 7845 section 5.1); the input rate
    # in its header is informational only, so mutagen does not report it.
    return _make_info(OggOpus(f).info, "opus", "audio/opus", sample_rate=48_000)


def _read_flac(f: IO[bytes]) -> AudioInfo:
    return _make_info(FLAC(f).info, "flac", "audio/flac")


# WAVE format tags (RFC 2361 appendix A). WAVE_FORMAT_EXTENSIBLE hides the
# real format in a GUID mutagen does not read; it is nearly always PCM.
_WAVE_CODECS = {1: "pcm", 3: "pcm_float", 6: "alaw", 7: "mulaw",
                0x55: "mp3", 0xFFFE: "pcm"}


def _read_wav(f: IO[bytes]) -> AudioInfo:
    stream = WAVE(f).info
    codec = _WAVE_CODECS.get(stream.audio_format, "wav")
    # The data chunk's declared size survives truncation; the file does not.
    length = _clamp_to_size(stream.length, stream.bitrate, _file_size(f))
    return _make_info(stream, codec, "audio/wav", duration=length)


_READERS: dict[str, Callable[[IO[bytes]], AudioInfo | None]] = {
    "audio/mpeg": _read_mp3,
    "audio/mp4": _read_mp4,
    "audio/aac": _read_aac,
    "audio/ogg": _read_vorbis,
    "audio/opus": _read_opus,
    "audio/flac": _read_flac,
    "audio/wav": _read_wav,
}


# --- async ------------------------------------------------------------------

# Probes get their own few threads rather than the loop's default executor.
# A probe stuck in a read that never returns (a hung network mount, a FIFO)
# cannot be killed from Python; here it occupies one probe thread, and the
# file work of the rest of the server, which uses the default executor, goes
# on. If every probe thread is stuck, new probes wait in the queue and time
# out: blobs are still stored and served, only without audio facts.
_PROBE_THREADS = 4
_probe_pool = ThreadPoolExecutor(max_workers=_PROBE_THREADS,
                                 thread_name_prefix="blobd-probe")


async def probe_async(path: str | os.PathLike[str],
                      timeout: float) -> AudioInfo | None:
    """`probe(path)` in a worker thread, giving up after `timeout` seconds.

    On timeout it returns None, as for a file that is not audio. The thread
    itself cannot be stopped and finishes in the background; that is
    acceptable because the probe only reads (it holds one open file and
    changes nothing), its result is simply dropped, and a stuck probe ties
    up only the probe pool (see above), never the event loop or the
    default executor.
    """
    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(_probe_pool, probe, path)
    try:
        return await asyncio.wait_for(work, timeout)
    except TimeoutError:
        log.warning("audio probe of %s gave up after %.3g s", path, timeout)
        return None

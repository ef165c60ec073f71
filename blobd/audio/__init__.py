"""What a stored blob sounds like: a mutagen probe, run in a thread.

* `sniff_mime(head)` (from blobd.sniff) looks at the first bytes only; it is
  for choosing a Content-Type when the client gave none.
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
boxes would take gigabytes. The MP3, FLAC and WAV readers ask mutagen for
stream info only, skipping tags; ID3 tags, FLAC blocks, RIFF chunks and MP4
boxes are counted first and implausibly many refused. One cost remains
linear in the file: for an Ogg stream without an end-of-stream page (a
recording cut off), mutagen reads every page to find the last; that is
time, not memory, and `probe_async`'s timeout bounds the caller's wait.
A FLAC file's last 256 KiB at most are parsed for where its frames end
(blobd.audio.flacframes), in one pass.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from typing import IO, Any

from mutagen.aac import AAC
from mutagen.flac import StreamInfo as FLACStreamInfo
from mutagen.mp3 import BitrateMode, MPEGInfo
from mutagen.mp4 import Atoms, MP4Info
from mutagen.ogg import error as OggError
from mutagen.oggflac import OggFLACStreamInfo
from mutagen.oggopus import OggOpusInfo
from mutagen.oggvorbis import OggVorbisInfo
from mutagen.wave import WaveStreamInfo

from ..sniff import (AUDIO_MIME_TYPES, MAX_MP3_JUNK, MAX_MPEG_FRAME,
                     MP3_CHAIN_FRAMES, SNIFF_BYTES, could_be_audio,
                     find_mpeg_chain, id3v2_size, mpeg_chain_at,
                     mpeg_frame_length, mpeg_frame_samples, ogg_first_packet,
                     same_mpeg_stream, sniff_mime)
from .flacframes import samples_held

__all__ = ["AUDIO_MIME_TYPES", "MAX_MP3_JUNK", "AudioInfo", "could_be_audio",
           "probe", "probe_async", "sniff_mime"]

log = logging.getLogger(__name__)

# Bounds of a believable stream. mutagen's MP3 and ADTS readers hunt for
# frame syncs and can "find" them in noise; a real stream passes these.
_MAX_DURATION = 31 * 24 * 3600.0   # 2 GiB at 8 kb/s is ~25 days
_MIN_SAMPLE_RATE = 1_000
_MAX_SAMPLE_RATE = 768_000
_MAX_CHANNELS = 255

# Bounds on container structure. Real files have a handful of ID3 tags,
# FLAC blocks and RIFF chunks and a few hundred MP4 boxes; each bound is
# far above that and far below what costs real time or memory.
_MAX_ID3_TAGS = 8
_MAX_FLAC_BLOCKS = 1_024
_MAX_RIFF_CHUNKS = 1_024
_MAX_WAVE_FORMAT = 64 << 10  # a WAVEFORMATEXTENSIBLE is 40 bytes
_MAX_MP4_BOXES = 50_000
_MP4_CONTAINERS = frozenset({   # the boxes mutagen descends into
    b"moov", b"udta", b"trak", b"mdia", b"meta", b"ilst",
    b"stbl", b"minf", b"moof", b"traf",
})
# The boxes MP4Info reads whole into memory, and how large a real one gets
# (a 'stsd' holds a sample entry or two with their codec configuration;
# 'hdlr' a name string; 'mdhd', 'mvhd' and 'tkhd' are a few dozen bytes).
_MP4_READ_WHOLE = {b"stsd": 1 << 20, b"hdlr": 64 << 10, b"mdhd": 4 << 10,
                   b"mvhd": 4 << 10, b"tkhd": 64 << 10}


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """Stream facts of one audio file. `duration` is in seconds (rounded to
    milliseconds; None when the file does not say, see _plausible),
    `bitrate` in bits per second; `mime` is one of AUDIO_MIME_TYPES and is
    not part of the JSON shape (the blob's content_type carries it), nor is
    `with_video` (the file also holds a video track: an MP4 film with its
    sound), which only the choice of content type at upload needs."""

    duration: float | None
    bitrate: int | None
    sample_rate: int | None
    channels: int | None
    codec: str
    mime: str
    with_video: bool = False

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
                duration=None if data["duration"] is None else float(data["duration"]),
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
            return _probe_file(f)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.debug("audio probe of %s failed: %r", path, e)
        return None


def _probe_file(f: IO[bytes]) -> AudioInfo | None:
    start = _skip_id3v2(f)
    if start is None:
        return None
    f.seek(start)
    head = f.read(SNIFF_BYTES)
    mime = sniff_mime(head)
    if mime is None and start == 0:
        info = _read_mp3(f, 0, head, max_junk=MAX_MP3_JUNK)
    elif mime is None:
        # A tag, then padding beyond its declared size: still MP3 territory.
        info = _read_mp3(f, start, head)
    else:
        info = _READERS[mime](f, start, head)
    return info if info is not None and _plausible(info) else None


def _skip_id3v2(f: IO[bytes]) -> int | None:
    """Offset just past the ID3v2 tags at the start of the file (0 if none),
    or None if there are implausibly many. ID3 can front MP3, ADTS AAC and
    FLAC alike."""
    offset = 0
    for _ in range(_MAX_ID3_TAGS):
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
_DURATION_MAY_BE_UNKNOWN = frozenset({"audio/flac", "audio/mp4", "audio/ogg", "audio/opus"})


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


def _make_info(stream: Any, codec: str, mime: str, *,
               duration: float | None = None, bitrate: float | None = None,
               sample_rate: int | None = None, with_video: bool = False) -> AudioInfo:
    """AudioInfo from a mutagen StreamInfo, with overrides; zero or missing
    numbers become None (mutagen uses 0 for "unknown")."""
    length = float(stream.length if duration is None else duration)
    return AudioInfo(
        duration=round(length, 3) if length else None,
        bitrate=_positive_int(bitrate or getattr(stream, "bitrate", 0)),
        sample_rate=_positive_int(sample_rate or getattr(stream, "sample_rate", 0)),
        channels=_positive_int(getattr(stream, "channels", 0)),
        codec=codec,
        mime=mime,
        with_video=with_video,
    )


def _positive_int(value: Any) -> int | None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    number = int(round(value))
    return number if number > 0 else None


def _file_size(f: IO[bytes]) -> int:
    return os.fstat(f.fileno()).st_size


def _clamp_to_size(length: float, bitrate: float, available_bytes: int) -> float:
    """The shorter of the length a header claims and what the bytes present
    can hold at `bitrate`: a truncated upload reports what it can play."""
    if bitrate <= 0:
        return length
    return min(length, max(available_bytes, 0) * 8 / bitrate)


# --- one reader per format: (file, start after ID3, head at start) ---------

_MPEG_LAYER_CODECS = {1: "mp1", 2: "mp2", 3: "mp3"}


def _read_mp3(f: IO[bytes], start: int, head: bytes,
              max_junk: int | None = None) -> AudioInfo | None:
    # MPEGInfo, not MP3: the stream without loading the ID3 tag it skips.
    stream = MPEGInfo(f, start)
    if max_junk is not None and stream.frame_offset - start > max_junk:
        return None
    if not _has_frame_chain(f, stream.frame_offset):
        return None
    bitrate = None
    if stream.bitrate_mode == BitrateMode.UNKNOWN:
        # No Xing/Info or VBRI header: mutagen's length is the file's size
        # at the first frame's bitrate, wrong by any factor for VBR audio
        # (a quiet start is a low bitrate) or a tag appended at the end.
        length, bitrate = _count_mpeg_frames(f, stream.frame_offset, stream.sample_rate)
    else:
        # The Xing/Info header states the full length even when the file
        # was cut short; the bytes actually present bound it.
        gap = _lavc_gap_samples(f, stream.frame_offset) / stream.sample_rate
        # A gap as long as the frames is a bogus tag, not silence to cut.
        length = stream.length - gap if gap < stream.length else stream.length
        length = _clamp_to_size(length, stream.bitrate, _file_size(f) - stream.frame_offset)
    return _make_info(stream, _MPEG_LAYER_CODECS.get(stream.layer, "mp3"),
                      "audio/mpeg", duration=length, bitrate=bitrate)


# Where the Xing/Info tag starts in its frame: past the 4-byte header and
# the side information, by (MPEG-1, mono).
_XING_OFFSETS = {(True, False): 36, (True, True): 21, (False, False): 21, (False, True): 13}
_XING_FRAMES, _XING_BYTES, _XING_TOC, _XING_SCALE = 1, 2, 4, 8


def _lavc_gap_samples(f: IO[bytes], frame_offset: int) -> int:
    """The encoder delay and padding, in samples, that the LAME tag of an
    MP3 encoded by ffmpeg states (0 if it is not such a file).

    mutagen subtracts them from the length only when the tag's encoder
    string says LAME; ffmpeg writes "Lavc..." or "Lavf..." in the same
    tag, its own demuxer honours it, and its files are common. Without
    this, 5.0 s of 8 kHz audio encoded by ffmpeg was reported as 5.184 s,
    a clip of 0.01 s as 0.052 s; the same audio encoded by lame, 5.0 s.
    The tag's layout: LAME's VbrTag.c (PutLameVBR)."""
    f.seek(frame_offset)
    frame = f.read(200)
    if mpeg_frame_length(frame) is None:
        return 0
    pos = _XING_OFFSETS[(frame[1] >> 3) & 3 == 3, frame[3] >> 6 == 3]
    if frame[pos:pos + 4] not in (b"Xing", b"Info"):
        return 0
    flags = int.from_bytes(frame[pos + 4:pos + 8], "big")
    if not flags & _XING_FRAMES:
        return 0    # mutagen's length did not come from the tag
    pos += 8 + sum(size for flag, size in ((_XING_FRAMES, 4), (_XING_BYTES, 4),
                                           (_XING_TOC, 100), (_XING_SCALE, 4))
                   if flags & flag)
    if frame[pos:pos + 4] not in (b"Lavc", b"Lavf"):
        return 0
    # After the 9-byte encoder string: 12 bytes, then delay and padding,
    # 12 bits each.
    gap = int.from_bytes(frame[pos + 21:pos + 24], "big")
    return (gap >> 12) + (gap & 0xFFF)


# Counting an MP3's frames costs ~2 us each. Past this many (over an hour
# of audio) the rest of the file is taken at the average bitrate counted so
# far, so that the probe of a long recording stays well inside its timeout.
_MP3_COUNT_FRAMES = 200_000
_MP3_COUNT_BLOCK = 1 << 20
# Junk between frames is skipped this many times at most (a damaged frame,
# a tag between two tracks); after that the count ends where it is.
_MP3_MAX_RESYNCS = 64


def _count_mpeg_frames(f: IO[bytes], offset: int,
                       sample_rate: int) -> tuple[float, float | None]:
    """(duration, average bitrate if it varies) of the MPEG audio stream
    whose first frame, the start of a chain, is at ``offset``."""
    size = _file_size(f)
    first = b""
    frames = samples = audio_bytes = resyncs = 0
    bitrate_indexes = set()
    block, block_at, pos = b"", offset, offset
    while frames < _MP3_COUNT_FRAMES and pos + 4 <= size:
        at = pos - block_at
        if at + 10 > len(block):
            f.seek(pos)
            block, block_at, at = f.read(_MP3_COUNT_BLOCK), pos, 0
        header = block[at:at + 4]
        length = mpeg_frame_length(header)
        if length is None or (first and not same_mpeg_stream(first, header)):
            skip = _skip_between_frames(f, pos, block[at:at + 10])
            resyncs += 1
            if skip is None or resyncs > _MP3_MAX_RESYNCS:
                break
            pos += skip
            continue
        if pos + length > size:
            break   # a frame cut short plays nothing
        first = first or header
        frames += 1
        samples += mpeg_frame_samples(header)
        audio_bytes += length
        bitrate_indexes.add(header[2] >> 4)
        pos += length
    counted = samples / sample_rate
    duration = counted
    if frames >= _MP3_COUNT_FRAMES and pos < size:
        duration += counted * (size - pos) / audio_bytes
    varies = len(bitrate_indexes) > 1 and counted > 0
    return duration, audio_bytes * 8 / counted if varies else None


def _skip_between_frames(f: IO[bytes], pos: int, head: bytes) -> int | None:
    """How far past ``pos`` (not a frame of the stream) the stream's frames
    go on: past an ID3v2 tag, or at the next chain of frames within
    MAX_MP3_JUNK bytes; None if they do not."""
    tag = id3v2_size(head)
    if tag is not None:
        return tag
    wanted = MAX_MP3_JUNK + MP3_CHAIN_FRAMES * MAX_MPEG_FRAME + 4
    f.seek(pos)
    window = f.read(wanted)
    return find_mpeg_chain(window, 1, MAX_MP3_JUNK, at_end=len(window) < wanted)


def _has_frame_chain(f: IO[bytes], offset: int) -> bool:
    f.seek(offset)
    wanted = MP3_CHAIN_FRAMES * MAX_MPEG_FRAME + 4
    data = f.read(wanted)
    return mpeg_chain_at(data, 0, at_end=len(data) < wanted)


def _read_aac(f: IO[bytes], start: int, head: bytes) -> AudioInfo:
    # mutagen reads at most a hundred ADTS frames, then estimates.
    f.seek(0)
    return _make_info(AAC(f).info, "aac", "audio/aac")


def _read_flac(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    """STREAMINFO, which must be the first metadata block (RFC 9639), and
    the audio's start for the bitrate; the other blocks are skipped unread."""
    pos, stream = start + 4, None
    for _ in range(_MAX_FLAC_BLOCKS):
        f.seek(pos)
        header = f.read(4)
        if len(header) < 4:
            return None
        size = int.from_bytes(header[1:], "big")
        if stream is None:
            if header[0] & 0x7F != 0 or size != 34:
                return None
            stream = FLACStreamInfo(f.read(34))
        pos += 4 + size
        if header[0] & 0x80:   # the last metadata block
            break
    else:
        return None
    audio_bytes = _file_size(f) - pos
    if audio_bytes <= 0:
        return None   # the metadata claims to run past the end of the file
    if not stream.length:   # streamed: the length was not known when written
        return _make_info(stream, "flac", "audio/flac")
    length = stream.length
    held = _flac_samples_held(f, stream, pos)
    if held is not None and held < stream.total_samples:
        # STREAMINFO's length survives truncation; the frames do not.
        length = held / stream.sample_rate
    return _make_info(stream, "flac", "audio/flac", duration=length,
                      bitrate=audio_bytes * 8 / length)


# The bytes read from a FLAC file's end to find its last frames: two of the
# largest frames STREAMINFO states (or could hold uncompressed), capped.
_FLAC_MAX_TAIL = 256 << 10


def _flac_samples_held(f: IO[bytes], stream: Any, audio_at: int) -> int | None:
    """The samples the frames at the file's end reach (see blobd.audio.flacframes);
    None if they cannot be told."""
    largest = stream.max_framesize or (
        stream.max_blocksize * stream.channels * stream.bits_per_sample // 8 + 64)
    size = _file_size(f)
    start = max(audio_at, size - min(2 * largest + 256, _FLAC_MAX_TAIL))
    f.seek(start)
    return samples_held(f.read(size - start), stream.channels, stream.max_blocksize,
                        stream.total_samples)


def _mp4_codec(name: str) -> str:
    name = name.lower()
    if name.startswith("mp4a.40."):
        return "aac"
    return {"mp4a.69": "mp3", "mp4a.6b": "mp3", "ac-3": "ac3",
            "ec-3": "eac3"}.get(name, name or "unknown")


def _read_mp4(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    if not _mp4_boxes_bounded(f):
        return None
    f.seek(0)
    # The stream facts only: MP4(f) would also load every tag, cover art
    # and all, into memory (a 64 MB 'covr' cost ~190 MB).
    stream, atoms = MP4Info(), Atoms(f)
    stream.load(atoms, f)
    codec = _mp4_codec(stream.codec)
    if codec == "aac" and stream.channels == 2 and _aac_mono(atoms, f):
        # ffmpeg writes a channel count of 2 in every AAC sample entry; the
        # AAC configuration says mono, and mutagen believes it only when it
        # also rules out parametric stereo, which no mono-configured LC or
        # HE-AAC stream uses (HE-AAC v2 says so with object type 29).
        stream.channels = 1
    if codec == "mp3" and stream.channels == 2 and _mp4_first_mpeg_frame_mono(atoms, f):
        # The same sample entry as AAC's; here the frames say mono.
        stream.channels = 1
    with_video = _mp4_has_video(atoms, f)
    presented = _mp4_presented_length(atoms, f)
    if 0 < presented < stream.length:
        # An empty edit (a delay) or a repeat would make it longer: those
        # are not what a listener of the samples hears, so only a cut counts.
        stream.length = presented
    if stream.length and (codec == "alac" or (
            not stream.bitrate and len(list(atoms[b"moov"].findall(b"trak"))) == 1)):
        # mutagen reports ALAC's uncompressed rate (what the header holds),
        # and none where no esds states one (FLAC and Opus in MP4). The
        # file's rate, if the sound is all it holds.
        return _make_info(stream, codec, "audio/mp4", with_video=with_video,
                          bitrate=_file_size(f) * 8 / stream.length)
    return _make_info(stream, codec, "audio/mp4", with_video=with_video)


def _aac_mono(atoms: Any, f: IO[bytes]) -> bool:
    try:
        return _aac_channel_configuration(atoms, f) == 1
    except Exception:  # noqa: BLE001 - a refinement: mutagen's figure stands
        return False


def _mp4_sound_trak(atoms: Any, f: IO[bytes]) -> Any | None:
    """The first sound track's box, or None."""
    return _mp4_trak(atoms, f, b"soun")


def _mp4_has_video(atoms: Any, f: IO[bytes]) -> bool:
    return _mp4_trak(atoms, f, b"vide") is not None


def _mp4_trak(atoms: Any, f: IO[bytes], handler: bytes) -> Any | None:
    """The first track of a handler type ('soun', 'vide'), or None."""
    try:
        for trak in atoms[b"moov"].findall(b"trak"):
            ok, hdlr = trak[b"mdia", b"hdlr"].read(f)
            if ok and hdlr[8:12] == handler:
                return trak
    except KeyError:
        pass
    return None


def _mp4_sound_stbl(atoms: Any, f: IO[bytes]) -> Any | None:
    """The sample table box of the first sound track, or None."""
    trak = _mp4_sound_trak(atoms, f)
    try:
        return trak[b"mdia", b"minf", b"stbl"] if trak is not None else None
    except KeyError:
        return None


def _mp4_presented_length(atoms: Any, f: IO[bytes]) -> float:
    """The sound track's duration as presented, in seconds: its tkhd's,
    the sum of its edits (ISO/IEC 14496-12 8.3.2, 8.6.5), in the mvhd's
    timescale; 0 if unknown. mutagen reports the mdhd's, all the samples,
    encoder priming and padding included, which an edit list cuts off
    (2.5 % at 8 kHz: 5.128 s for 5.0 s)."""
    try:
        trak = _mp4_sound_trak(atoms, f)
        if trak is None:
            return 0.0
        ok_m, mvhd = atoms[b"moov", b"mvhd"].read(f)
        ok_t, tkhd = trak[(b"tkhd",)].read(f)
    except KeyError:
        return 0.0
    if not (ok_m and ok_t and mvhd and tkhd):
        return 0.0
    timescale = int.from_bytes(mvhd[20:24] if mvhd[0] == 1 else mvhd[12:16], "big")
    duration = int.from_bytes(tkhd[28:36] if tkhd[0] == 1 else tkhd[20:24], "big")
    # All ones: "duration cannot be determined".
    if not timescale or duration in (0, 0xFFFFFFFF, (1 << 64) - 1):
        return 0.0
    return duration / timescale


def _mp4_first_mpeg_frame_mono(atoms: Any, f: IO[bytes]) -> bool:
    """Whether the first sample of the sound track, at the first chunk
    offset of its stco or co64 box (ISO/IEC 14496-12 8.7.5), is an MPEG
    audio frame in single-channel mode. Reads a few bytes of each box."""
    try:
        stbl = _mp4_sound_stbl(atoms, f)
        boxes = {child.name: child for child in stbl.children} if stbl is not None else {}
        for name, width in ((b"stco", 4), (b"co64", 8)):
            if name in boxes:
                f.seek(boxes[name]._dataoffset)
                table = f.read(8 + width)      # version, flags, count, entry
                if len(table) < 8 + width or not int.from_bytes(table[4:8], "big"):
                    return False
                f.seek(int.from_bytes(table[8:], "big"))
                frame = f.read(4)
                return mpeg_frame_length(frame) is not None and frame[3] >> 6 == 3
    except Exception:  # noqa: BLE001 - a refinement: mutagen's figure stands
        pass
    return False


def _aac_channel_configuration(atoms: Any, f: IO[bytes]) -> int | None:
    """channelConfiguration of the first sound track's AudioSpecificConfig
    (ISO/IEC 14496-3 1.6.2.1), read from the esds box in its sample entry
    (ISO/IEC 14496-1 7.2.6); None if absent, unreadable or object type 29."""
    stbl = _mp4_sound_stbl(atoms, f)
    try:
        ok, stsd = stbl[(b"stsd",)].read(f) if stbl is not None else (False, b"")
    except KeyError:
        return None
    at = stsd.find(b"esds") if ok else -1
    if at < 0:
        return None
    data, pos = stsd[at + 8:], 0            # past the name, version and flags
    for tag, fixed in ((3, 3), (4, 13), (5, 0)):
        if pos >= len(data) or data[pos] != tag:
            return None
        pos += 1
        for _ in range(4):                  # the length: 7 bits a byte
            pos += 1
            if pos > len(data) or not data[pos - 1] & 0x80:
                break
        if tag == 3 and pos + 2 < len(data):  # ES_Descriptor's optional fields
            flags = data[pos + 2]
            fixed += (2 if flags & 0x80 else 0) + (2 if flags & 0x20 else 0)
            if flags & 0x40 and pos + 3 < len(data):
                fixed += 1 + data[pos + 3]
        pos += fixed
    config = int.from_bytes(data[pos:pos + 6].ljust(6, b"\0"), "big")
    bits = 48
    def take(n: int) -> int:
        nonlocal bits
        bits -= n
        return (config >> bits) & ((1 << n) - 1)
    object_type = take(5)
    if object_type == 31:
        object_type = 32 + take(6)
    if take(4) == 15:                       # an explicit 24-bit sampling rate
        take(24)
    channels = take(4)
    return None if object_type == 29 or pos >= len(data) else channels


def _mp4_boxes_bounded(f: IO[bytes]) -> bool:
    """Whether the box tree mutagen would build (ISO/IEC 14496-12 section
    4.2) has at most _MAX_MP4_BOXES boxes, and no box it reads whole is
    larger than a real one gets (a 150 MB 'stsd' cost 300 MB of memory).
    Reads box headers only."""
    end = _file_size(f)
    ranges, count = [(0, end, False)], 0
    while ranges:
        pos, stop, nested = ranges.pop()
        while pos + 8 <= stop:
            f.seek(pos)
            header = f.read(16)
            size, name, body = int.from_bytes(header[:4], "big"), header[4:8], pos + 8
            if size == 1:     # a 64-bit size follows the name
                size, body = int.from_bytes(header[8:16], "big"), pos + 16
            elif size == 0:   # the box runs to the end of the file
                size = end - pos
            count += 1
            if size < body - pos or count > _MAX_MP4_BOXES or \
                    size > _MP4_READ_WHOLE.get(name, size):
                return False
            if nested and pos + size > stop:
                # mutagen reads a box's children up to the box's own end,
                # not its parent's: past it, this count and mutagen's walk
                # would part ways (a crafted file then costs mutagen
                # millions of boxes). A whole file is never built so.
                return False
            if name in _MP4_CONTAINERS:
                skip = 4 if name == b"meta" else 0   # its version and flags
                ranges.append((body + skip, pos + size, True))
            pos += size
    return True


def _read_ogg(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    # Other Ogg codecs (Speex) are not read. The check also keeps mutagen
    # from walking every page of a file in search of the header.
    packet = ogg_first_packet(head)
    f.seek(0)
    if packet.startswith(b"\x01vorbis"):
        stream = _ogg_stream(OggVorbisInfo, f)
        # The header's nominal rate, as ffprobe reports; libvorbis states
        # none at 96 kHz (the bitrate was null): then the file's.
        bitrate = None if stream.bitrate or not stream.length else \
            _file_size(f) * 8 / stream.length
        return _make_info(stream, "vorbis", "audio/ogg", bitrate=bitrate)
    if packet.startswith(b"\x7fFLAC"):
        stream = _ogg_stream(OggFLACStreamInfo, f)
        bitrate = _file_size(f) * 8 / stream.length if stream.length else None
        return _make_info(stream, "flac", "audio/ogg", bitrate=bitrate)
    return None


def _read_opus(f: IO[bytes], start: int, head: bytes) -> AudioInfo:
    # Opus always decodes at 48 kHz (RFC 7845 section 5.1); the input rate
    # in its header is informational only, so mutagen does not report it.
    f.seek(0)
    stream = _ogg_stream(OggOpusInfo, f)
    # mutagen's Opus bitrate is the bytes it was given over the length:
    # only the tail _ogg_stream hands it. The whole file's, as for FLAC.
    bitrate = _file_size(f) * 8 / stream.length if stream.length else None
    return _make_info(stream, "opus", "audio/opus", sample_rate=48_000, bitrate=bitrate)


def _ogg_stream(info_class: Any, f: IO[bytes]) -> Any:
    """An Ogg stream's facts as mutagen's OggVorbis/OggOpus load them, but
    without parsing the comment packet between the two steps: its tags
    (millions of empty comments, or one of 64 MB) would all be held in
    memory, ~35 times the bytes they take in the file."""
    stream = info_class(f)
    try:
        # The length, from the stream's last page, looked for in the
        # file's last OGG_TAIL bytes only.
        stream._post_tags(_ogg_tail(f))
    except OggError:
        stream.length = 0  # no page of the stream there: duration unknown
    return stream


# mutagen finds an Ogg stream's length on its last page; when the file's
# final page does not end the stream (a live recording cut off, several
# streams muxed) it walks every page from the start, a probe thread busy
# for as long as the file is big (and on after the probe's timeout).
OGG_TAIL = 256 << 10


def _ogg_tail(f: IO[bytes]) -> BytesIO:
    """The file's last OGG_TAIL bytes, from their first page on."""
    start = max(0, _file_size(f) - OGG_TAIL)
    f.seek(start)
    data = f.read(OGG_TAIL)
    if start:
        first = data.find(b"OggS")
        data = data[first:] if first >= 0 else b""
    return BytesIO(data)


# WAVE format tags (RFC 2361 appendix A); WAVE_FORMAT_EXTENSIBLE (0xFFFE)
# names its real format in the first two bytes of its SubFormat GUID.
_WAVE_CODECS = {1: "pcm", 2: "adpcm_ms", 3: "pcm_float", 6: "alaw", 7: "mulaw",
                0x11: "adpcm_ima", 0x31: "gsm_ms", 0x55: "mp3"}
_WAVE_EXTENSIBLE = 0xFFFE
# Formats of one fixed-size block per sample frame, whose length mutagen
# reckons exactly from the data size and block align. In the others a
# block holds many frames (ADPCM, GSM) or none of fixed size (MP3): mutagen
# divides by the block align all the same (3.0 s of IMA ADPCM came out as
# 0.006 s), and the 'fact' chunk states the length instead.
_WAVE_PER_SAMPLE = frozenset({1, 3, 6, 7})


def _read_wav(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    chunks = _riff_chunks(f)
    if chunks is None:
        return None
    f.seek(0)
    stream = WaveStreamInfo(f)
    fmt = _riff_chunk_head(f, chunks, b"fmt ", _MAX_WAVE_FORMAT)
    audio_format = stream.audio_format
    if audio_format == _WAVE_EXTENSIBLE and len(fmt) >= 26:
        audio_format = int.from_bytes(fmt[24:26], "little")
    if audio_format in _WAVE_PER_SAMPLE:
        # The data chunk's declared size survives truncation; the file does not.
        length = _clamp_to_size(stream.length, stream.bitrate, _file_size(f))
        return _make_info(stream, _WAVE_CODECS.get(audio_format, "wav"), "audio/wav",
                          duration=length)
    length, bitrate = _wave_compressed_length(f, chunks, fmt, stream.sample_rate)
    return _make_info(stream, _WAVE_CODECS.get(audio_format, "wav"), "audio/wav",
                      duration=length, bitrate=bitrate)


def _wave_compressed_length(f: IO[bytes], chunks: dict[bytes, tuple[int, int]],
                            fmt: bytes, sample_rate: int) -> tuple[float, float]:
    """(duration, bitrate) of a WAVE file whose blocks hold many sample
    frames: the 'fact' chunk's frame count, scaled down to the part of the
    data chunk present; without one, the data at the format's stated byte
    rate. The data's own rate, not the stated one, where both are known:
    ffmpeg states 128 kb/s for IMA ADPCM at 8 kHz, four times the truth."""
    data_at, data_size = chunks.get(b"data", (0, 0))
    present = max(0, min(data_size, _file_size(f) - data_at))
    frames = int.from_bytes(_riff_chunk_head(f, chunks, b"fact", 4), "little")
    if frames and sample_rate and data_size:
        stated = frames / sample_rate
        return stated * present / data_size, data_size * 8 / stated
    byte_rate = int.from_bytes(fmt[8:12], "little")
    return (present / byte_rate, byte_rate * 8) if byte_rate else (0.0, 0.0)


def _riff_chunks(f: IO[bytes]) -> dict[bytes, tuple[int, int]] | None:
    """The RIFF form's top-level chunks, each id's first: (offset of its
    body, declared size). None if there are more than _MAX_RIFF_CHUNKS
    (mutagen lists them all to find 'fmt ' and 'data') or the 'fmt ' chunk
    is implausibly large (mutagen reads it whole into memory)."""
    pos, end, chunks = 12, _file_size(f), {}
    for _ in range(_MAX_RIFF_CHUNKS):
        if pos + 8 > end:
            return chunks
        f.seek(pos)
        header = f.read(8)
        size = int.from_bytes(header[4:8], "little")
        if header[:4] == b"fmt " and size > _MAX_WAVE_FORMAT:
            return None
        chunks.setdefault(header[:4], (pos + 8, size))
        pos += 8 + size + (size & 1)   # chunks are padded to even length
    return chunks if pos + 8 > end else None


def _riff_chunk_head(f: IO[bytes], chunks: dict[bytes, tuple[int, int]],
                     name: bytes, limit: int) -> bytes:
    """Up to ``limit`` leading bytes of chunk ``name``'s body; b"" if absent."""
    if name not in chunks:
        return b""
    offset, size = chunks[name]
    f.seek(offset)
    return f.read(min(size, limit))


_READERS: dict[str, Callable[[IO[bytes], int, bytes], AudioInfo | None]] = {
    "audio/mpeg": _read_mp3,
    "audio/aac": _read_aac,
    "audio/flac": _read_flac,
    "audio/mp4": _read_mp4,
    "audio/ogg": _read_ogg,
    "audio/opus": _read_opus,
    "audio/wav": _read_wav,
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
    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(_probe_pool, probe, path)
    try:
        return await asyncio.wait_for(work, timeout)
    except TimeoutError:
        log.warning("audio probe of %s gave up after %.3g s", path, timeout)
        return None

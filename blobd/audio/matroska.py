"""WebM and Matroska (RFC 9559, on EBML, RFC 8794): the first audio track.

mutagen has no Matroska reader, so this module reads EBML itself, and
only what it needs: the EBML header's DocType, then the Segment's Info
(TimestampScale, Duration) and Tracks, walked element by element with the
bodies skipped, up to the first Cluster; when either comes after the
Clusters, where the SeekHead says (following chained SeekHeads, at most
_MAX_SEEKS positions, each within the Segment and holding the element its
entry names). Info and Tracks are read whole
into memory, each bounded in size; nothing is ever descended into but the
few master elements named here, so nesting is as deep as this code says,
whatever the file does.

A browser's MediaRecorder writes no Duration, a Segment of unknown size and
often Clusters of unknown size (RFC 8794 section 6.2: the size all ones),
since it streams as it records. Such a file is timed from its last Cluster
that starts in the file's last MATROSKA_TAIL bytes: the end of its last
block of the audio track (the Cluster's Timestamp, the block's relative timestamp,
and its duration: stated, read from the Opus packet's TOC byte, the
track's DefaultDuration, or else the step from the block before), less the
start of the track's first block in the first Cluster. A Cluster is walked
through a window of the file, not read whole: Chrome records sound alone
into Clusters of 32.7 s each (block timestamps are 16 bits), 400 KB of
Opus or 12.5 MB of PCM.

Every walk counts the elements it visits, and a file that exceeds a bound
is not audio (None), as are malformed sizes and elements overrunning their
parent. A cut file is read for what it holds.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from ..sniff import EBML_DOCTYPES
from .flac import streaminfo_bit_depth
from .info import AudioInfo, bit_depth, file_size, round_duration

# RFC 9559 section 5.1 and RFC 8794 section 11.2: the element IDs read here.
_EBML, _DOCTYPE = 0x1A45DFA3, 0x4282
_SEGMENT, _INFO, _TRACKS, _CLUSTER = 0x18538067, 0x1549A966, 0x1654AE6B, 0x1F43B675
_TIMESTAMP_SCALE, _DURATION = 0x2AD7B1, 0x4489
_TRACK_ENTRY, _TRACK_NUMBER, _TRACK_TYPE, _CODEC_ID = 0xAE, 0xD7, 0x83, 0x86
_CODEC_DELAY, _DEFAULT_DURATION, _AUDIO = 0x56AA, 0x23E383, 0xE1
_SAMPLING_FREQUENCY, _OUTPUT_SAMPLING_FREQUENCY, _CHANNELS = 0xB5, 0x78B5, 0x9F
_BIT_DEPTH, _CODEC_PRIVATE = 0x6264, 0x63A2
_CLUSTER_TIMESTAMP, _SIMPLE_BLOCK, _BLOCK_GROUP = 0xE7, 0xA3, 0xA0
_BLOCK, _BLOCK_DURATION, _DISCARD_PADDING = 0xA1, 0x9B, 0x75A2
# What a Cluster of unknown size may hold (RFC 9559 section 5.1.3): its
# end is where an element that is none of these begins.
_CLUSTER_CHILDREN = frozenset({_CLUSTER_TIMESTAMP, _SIMPLE_BLOCK, _BLOCK_GROUP,
                               0xA7, 0xAB, 0x5854, 0xAF, 0xEC, 0xBF})
_TRACK_AUDIO, _TRACK_VIDEO = 2, 1
_SEEK_HEAD, _SEEK, _SEEK_ID, _SEEK_POSITION = 0x114D9B74, 0x4DBB, 0x53AB, 0x53AC

# Bounds on structure: real files have a dozen top-level elements before
# the first Cluster, Info of a few hundred bytes and Tracks of a few KB
# (Vorbis codebooks); each bound is far above that and far below what
# costs real time or memory.
_MAX_EBML_HEADER = 4 << 10
_MAX_TOP_LEVEL = 1_024
_MAX_SEEKS = 8               # positions a SeekHead sends the reader to, chained ones included
_MAX_MASTER = 1 << 20        # Info or Tracks read whole; of the first Cluster, read
_MAX_ELEMENTS = 20_000       # children walked in Info and Tracks, or in the Clusters tried
_MAX_CLUSTER_TRIES = 32      # Cluster IDs in the tail tried, from the last back
MATROSKA_TAIL = 16 << 20
_SEARCH_STEP = 256 << 10     # of the tail, read at a time for Cluster IDs
_BLOCK_HEAD = 16             # of a SimpleBlock: track, timestamp, flags, Opus TOC
_MAX_BLOCK_GROUP = 256 << 10  # one frame and its few elements, read whole

_UNKNOWN = -1                # an element size of all ones (RFC 8794 section 6.2)


class _Malformed(Exception):
    """Bytes that break the EBML grammar or a bound: not audio."""


class _FileBytes:
    """Bytes ``[start, start + length)`` of a file, indexed and sliced as
    ``bytes`` are but read as needed through one window, so that a long
    Cluster is walked in the memory of a window."""

    _WINDOW = 64 << 10

    def __init__(self, f: IO[bytes], start: int, length: int) -> None:
        self._f, self._start, self._length = f, start, length
        self._at, self._window = 0, b""

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            low, high, _ = key.indices(self._length)
            high = max(low, high)
        elif 0 <= key < self._length:
            low, high = key, key + 1
        else:
            raise IndexError(key)
        if not self._at <= low <= high <= self._at + len(self._window):
            self._f.seek(self._start + low)
            self._window, self._at = self._f.read(max(high - low, self._WINDOW)), low
        chunk = self._window[low - self._at:high - self._at]
        return chunk if isinstance(key, slice) else chunk[0]


class _Budget:
    """How many more elements one walk may visit (_MAX_ELEMENTS in all)."""

    def __init__(self) -> None:
        self.left = _MAX_ELEMENTS

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _Malformed("too many elements")


def _vint(data: Any, pos: int) -> tuple[int, int]:
    """(value, width) of the variable-size integer at ``pos`` (RFC 8794
    section 4), its marker bit removed; _UNKNOWN for all ones."""
    if pos >= len(data) or not data[pos]:
        raise _Malformed("no VINT")
    width = 9 - data[pos].bit_length()
    if pos + width > len(data):
        raise _Malformed("cut VINT")
    value = int.from_bytes(data[pos:pos + width], "big") & ((1 << (7 * width)) - 1)
    return (_UNKNOWN if value == (1 << (7 * width)) - 1 else value), width


def _header(data: Any, pos: int) -> tuple[int, int, int]:
    """(element ID, offset of its body, its size or _UNKNOWN) at ``pos``."""
    if pos >= len(data) or data[pos] < 0x10:
        raise _Malformed("no element ID")   # IDs are one to four bytes
    id_width = 9 - data[pos].bit_length()
    element_id = int.from_bytes(data[pos:pos + id_width], "big")
    size, size_width = _vint(data, pos + id_width)
    return element_id, pos + id_width + size_width, size


def _children(data: bytes, budget: _Budget) -> Iterator[tuple[int, bytes]]:
    """The (ID, body) of each element in ``data``, each charged to
    ``budget``; every one must state its size and lie within ``data``."""
    pos = 0
    while pos < len(data):
        budget.spend()
        element_id, body, size = _header(data, pos)
        if size == _UNKNOWN or body + size > len(data):
            raise _Malformed("element overruns its parent")
        yield element_id, data[body:body + size]
        pos = body + size


def _uint(body: bytes) -> int:
    return int.from_bytes(body[:8], "big")


def _float(body: bytes) -> float:
    if len(body) == 4:
        return struct.unpack(">f", body)[0]
    if len(body) == 8:
        return struct.unpack(">d", body)[0]
    return 0.0                               # an empty float element is 0


@dataclass
class _Track:
    number: int = 0
    codec_id: str = ""
    codec_delay_ns: int = 0
    default_duration_ns: int = 0
    sample_rate: float = 8000.0              # RFC 9559's default
    output_rate: float = 0.0
    channels: int = 1
    bit_depth: int = 0
    codec_private: bytes = b""               # its first _PRIVATE_HEAD bytes


def read_matroska(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    try:
        return _read(f)
    except _Malformed:
        return None


def _read(f: IO[bytes]) -> AudioInfo | None:
    size = file_size(f)
    f.seek(0)
    ebml = f.read(_MAX_EBML_HEADER)
    mime, segment_at = _ebml_header(ebml)
    scale, stated, tracks, first_cluster = _segment_head(f, segment_at, size, _Budget())
    audio = next((t for t in tracks if t[0] == _TRACK_AUDIO), None)
    if audio is None:
        return None
    track = audio[1]
    with_video = any(kind == _TRACK_VIDEO for kind, _ in tracks)
    if stated:
        duration = stated * scale / 1e9
    else:
        duration = _unstated_length(f, size, first_cluster, track, scale)
    codec = _codec(track.codec_id)
    rate = 48_000 if codec == "opus" else (track.output_rate or track.sample_rate)
    # The file's rate, as for the other whole-file figures; not when a
    # video shares it.
    bitrate = size * 8 / duration if duration and not with_video else None
    return AudioInfo(
        duration=round_duration(duration) if duration and duration > 0 else None,
        bitrate=round(bitrate) if bitrate else None,
        sample_rate=round(rate) if 0 < rate < 1e7 else None,
        channels=track.channels or None,
        codec=codec, mime=mime, bits_per_sample=_bit_depth(track, codec),
        with_video=with_video)


def without_sound(f: IO[bytes]) -> bool:
    """Whether the file's Tracks are read and list tracks, none of them
    audio (a film with no sound); False when they cannot be read."""
    try:
        f.seek(0)
        _, segment_at = _ebml_header(f.read(_MAX_EBML_HEADER))
        _, _, tracks, _ = _segment_head(f, segment_at, file_size(f), _Budget())
    except _Malformed:
        return False
    return bool(tracks) and all(kind != _TRACK_AUDIO for kind, _ in tracks)


def _ebml_header(data: bytes) -> tuple[str, int]:
    """(the audio type the DocType names, offset of what follows the EBML
    header); refused for another DocType."""
    element_id, body, size = _header(data, 0)
    if element_id != _EBML or size == _UNKNOWN or body + size > len(data):
        raise _Malformed("no EBML header")
    doctype = b"matroska"                    # RFC 8794 section 11.2.6's default
    for child, value in _children(data[body:body + size], _Budget()):
        if child == _DOCTYPE:
            doctype = value.rstrip(b"\0")
    if doctype not in EBML_DOCTYPES:
        raise _Malformed(f"DocType {doctype!r}")
    return EBML_DOCTYPES[doctype], body + size


def _segment_head(f: IO[bytes], pos: int, end: int, budget: _Budget
                  ) -> tuple[int, float, list[tuple[int, _Track]], int]:
    """(TimestampScale, Duration or 0, [(TrackType, track)], offset of
    the first Cluster or -1) from the Segment's Info and Tracks, looked for
    before its first Cluster, and where the SeekHead says when not there
    (a muxer may write them after the Clusters)."""
    f.seek(pos)
    element_id, body, size = _header(f.read(12), 0)
    if element_id != _SEGMENT:
        raise _Malformed("no Segment")
    pos += body
    segment, stop = pos, end if size == _UNKNOWN else min(end, pos + size)
    found: dict[int, bytes] = {}             # the bodies of Info and Tracks
    seeks: list[tuple[int, int]] = []
    cluster, stated = -1, False
    for _ in range(_MAX_TOP_LEVEL):
        # Without a Duration, the first Cluster's offset is wanted too.
        if pos + 2 > stop or (_TRACKS in found and _INFO in found and stated):
            break
        f.seek(pos)
        try:
            element_id, body, size = _header(f.read(12), 0)
        except _Malformed:
            break                            # the file ends here
        if element_id == _CLUSTER or size == _UNKNOWN:
            cluster = pos if element_id == _CLUSTER else -1
            break
        if element_id in (_INFO, _TRACKS) and element_id not in found:
            found[element_id] = _master_body(f, pos, element_id, end)
            if element_id == _INFO:
                stated = _info(found[_INFO], budget)[1] > 0
        elif element_id == _SEEK_HEAD and not seeks:
            try:
                seeks = _seek_entries(_master_body(f, pos, element_id, stop), segment, budget)
            except _Malformed:
                pass                         # only a way to what the walk did not reach
        pos += body + size
    else:
        raise _Malformed("too many top-level elements")
    if not (_INFO in found and _TRACKS in found):
        _follow_seeks(f, seeks, found, segment, stop, budget)
    scale, duration = _info(found[_INFO], budget) if _INFO in found else (1_000_000, 0.0)
    tracks = _tracks(found[_TRACKS], budget) if _TRACKS in found else []
    return scale, duration, tracks, cluster


def _master_body(f: IO[bytes], pos: int, expected: int, stop: int) -> bytes:
    """The body of the master element ``expected`` at ``pos``, read whole
    (at most _MAX_MASTER bytes; less if the file is cut short before
    ``stop``); refused if another element is there or it states no size."""
    f.seek(pos)
    element_id, body, size = _header(f.read(12), 0)
    if element_id != expected or size == _UNKNOWN:
        raise _Malformed("not the element expected")
    if size > _MAX_MASTER:
        raise _Malformed("a master element too large")
    f.seek(pos + body)
    return f.read(max(0, min(size, stop - pos - body)))


def _seek_entries(data: bytes, segment: int, budget: _Budget) -> list[tuple[int, int]]:
    """(element ID, file offset) of each Seek in a SeekHead's body (RFC
    9559 section 5.1.1): its SeekPosition counts from the Segment's body."""
    entries = []
    for element_id, seek in _children(data, budget):
        if element_id != _SEEK:
            continue
        target, position = 0, -1
        for child, body in _children(seek, budget):
            if child == _SEEK_ID:
                target = _uint(body)
            elif child == _SEEK_POSITION:
                position = _uint(body)
        if target in (_INFO, _TRACKS, _SEEK_HEAD) and position >= 0:
            entries.append((target, segment + position))
    return entries


def _follow_seeks(f: IO[bytes], seeks: list[tuple[int, int]], found: dict[int, bytes],
                  segment: int, stop: int, budget: _Budget) -> None:
    """Read into ``found`` the Info and Tracks that ``seeks`` locate and
    the walk did not reach, through SeekHeads that point to more (mkvmerge
    chains one at the end). Each position is read at most once, at most
    _MAX_SEEKS of them; one past the Segment's end, or holding another
    element than its entry names, is passed over."""
    visited: set[int] = set()
    pending = list(seeks)
    while pending and not (_INFO in found and _TRACKS in found):
        target, at = pending.pop(0)
        if target in found or at in visited or at >= stop:
            continue
        if len(visited) >= _MAX_SEEKS:
            break
        visited.add(at)
        try:
            body = _master_body(f, at, target, stop)
        except _Malformed:
            continue
        if target == _SEEK_HEAD:
            pending += _seek_entries(body, segment, budget)
        else:
            found[target] = body


def _info(data: bytes, budget: _Budget) -> tuple[int, float]:
    scale, duration = 1_000_000, 0.0
    for element_id, body in _children(data, budget):
        if element_id == _TIMESTAMP_SCALE:
            scale = _uint(body) or scale
        elif element_id == _DURATION:
            duration = _float(body)
    if not 0 <= duration < 1e30:
        duration = 0.0                       # NaN, infinite: not stated
    return scale, duration


def _tracks(data: bytes, budget: _Budget) -> list[tuple[int, _Track]]:
    found = []
    for element_id, entry in _children(data, budget):
        if element_id != _TRACK_ENTRY:
            continue
        track, kind = _Track(), 0
        for child, body in _children(entry, budget):
            if child == _TRACK_NUMBER:
                track.number = _uint(body)
            elif child == _TRACK_TYPE:
                kind = _uint(body)
            elif child == _CODEC_ID:
                track.codec_id = body.rstrip(b"\0").decode("ascii", "replace")
            elif child == _CODEC_DELAY:
                track.codec_delay_ns = _uint(body)
            elif child == _CODEC_PRIVATE:
                track.codec_private = body[:_PRIVATE_HEAD]
            elif child == _DEFAULT_DURATION:
                track.default_duration_ns = _uint(body)
            elif child == _AUDIO:
                _audio_settings(track, body, budget)
        found.append((kind, track))
    return found


def _audio_settings(track: _Track, data: bytes, budget: _Budget) -> None:
    for element_id, body in _children(data, budget):
        if element_id == _SAMPLING_FREQUENCY:
            track.sample_rate = _float(body)
        elif element_id == _OUTPUT_SAMPLING_FREQUENCY:
            track.output_rate = _float(body)
        elif element_id == _CHANNELS:
            track.channels = _uint(body)
        elif element_id == _BIT_DEPTH:
            track.bit_depth = _uint(body)


# Matroska codec IDs (the Matroska codec mappings) to the names the other
# readers report.
_CODECS = {"A_OPUS": "opus", "A_VORBIS": "vorbis", "A_FLAC": "flac",
           "A_MPEG/L3": "mp3", "A_MPEG/L2": "mp2", "A_MPEG/L1": "mp1",
           "A_PCM/INT/LIT": "pcm", "A_PCM/INT/BIG": "pcm",
           "A_PCM/FLOAT/IEEE": "pcm_float", "A_ALAC": "alac", "A_AC3": "ac3",
           "A_EAC3": "eac3", "A_DTS": "dts", "A_TRUEHD": "truehd",
           "A_WAVPACK4": "wavpack"}


def _codec(codec_id: str) -> str:
    if codec_id.startswith("A_AAC"):
        return "aac"                         # A_AAC, A_AAC/MPEG4/LC, ...
    return _CODECS.get(codec_id, codec_id.removeprefix("A_").lower() or "unknown")


# Of CodecPrivate, what is read: FLAC's "fLaC" and STREAMINFO block, or
# ALAC's magic cookie up to its bit depth (its sixth byte).
_PRIVATE_HEAD = 4 + 4 + 34
# The codecs whose samples have a bit depth that the BitDepth element
# states: PCM's, which the codec mappings require, and the lossless ones'.
# WavPack's is the stream's (ffmpeg writes 8, 16 or 32, as ffprobe reads
# from the blocks). Not TrueHD's: ffmpeg writes 16 for it whatever the
# stream, and TrueHD's own header states no word length (ffmpeg's parser
# assumes 24).
_BIT_DEPTH_CODECS = frozenset({"pcm", "pcm_float", "flac", "alac", "wavpack"})


def _bit_depth(track: _Track, codec: str) -> int | None:
    """The bit depth of a lossless or PCM track: what the codec's own
    header says (FLAC's STREAMINFO, ALAC's cookie, each in CodecPrivate),
    else the Audio element's BitDepth (see _BIT_DEPTH_CODECS). None for
    the others, whose BitDepth (if any) is not of the file."""
    private, own = track.codec_private, None
    if codec == "flac" and private.startswith(b"fLaC"):
        own = streaminfo_bit_depth(private[4:])
    elif codec == "alac":
        # The cookie alone (ALACSpecificConfig), or still in its 'alac' box.
        cookie = private[12:] if private[4:8] == b"alac" else private
        own = cookie[5] if len(cookie) >= 6 else None
    if codec in _BIT_DEPTH_CODECS:
        return bit_depth(own) or bit_depth(track.bit_depth)
    return None


# --- the length of a file that does not state it ------------------------------

def _unstated_length(f: IO[bytes], size: int, first_cluster: int, track: _Track,
                     scale: int) -> float:
    """Seconds from the start of the audio track's first block (in the
    first Cluster, else 0) to the end of its last, in the last Cluster
    starting within the file's last MATROSKA_TAIL bytes that holds one; 0
    if none does. Codec delay and discarded padding, which the player
    drops, are left out."""
    start_ns = 0
    if first_cluster >= 0:
        first = _FileBytes(f, first_cluster, min(size - first_cluster, _MAX_MASTER))
        try:
            span = _cluster_span_ns(first, 0, track, scale, _Budget())
        except _Malformed:
            span = None
        start_ns = span[0] if span else 0
    budget = _Budget()
    for tries, at in enumerate(_cluster_ids_back(f, size)):
        if tries >= _MAX_CLUSTER_TRIES or budget.left <= 0:
            break
        try:
            span = _cluster_span_ns(_FileBytes(f, at, size - at), 0, track, scale, budget)
        except _Malformed:
            continue
        if span is not None:
            return max(0, span[1] - start_ns - track.codec_delay_ns) / 1e9
    return 0.0


def _cluster_ids_back(f: IO[bytes], size: int) -> Iterator[int]:
    """Where the Cluster ID occurs in the file's last MATROSKA_TAIL bytes,
    from the last back, read _SEARCH_STEP bytes at a time."""
    cluster_id = _CLUSTER.to_bytes(4, "big")
    floor, end = max(0, size - MATROSKA_TAIL), size
    while end > floor:
        begin = max(floor, end - _SEARCH_STEP)
        f.seek(begin)
        # Three bytes past the step: an ID that straddles its end.
        window = f.read(end - begin + len(cluster_id) - 1)
        at = len(window)
        while (at := window.rfind(cluster_id, 0, at)) >= 0:
            yield begin + at
        end = begin


def _cluster_span_ns(data: Any, pos: int, track: _Track, scale: int,
                     budget: _Budget) -> tuple[int, int] | None:
    """When the track's first block in the Cluster at ``pos`` starts and
    its last ends, in nanoseconds; None if the Cluster holds none. A Cluster of unknown size
    ends at the first element that cannot be its child, or at the end of
    ``data``; a block cut off by the end of ``data`` is not counted."""
    _, body, size = _header(data, pos)
    end = len(data) if size == _UNKNOWN else min(len(data), body + size)
    cluster_ts, first, last, previous = None, None, None, None
    pos = body
    while pos < end:
        budget.spend()
        try:
            element_id, child, child_size = _header(data, pos)
        except _Malformed:
            break                            # cut off, or the Cluster ended
        if element_id not in _CLUSTER_CHILDREN:
            if size == _UNKNOWN:
                break
            raise _Malformed("not a Cluster's child")
        if child_size == _UNKNOWN or child + child_size > len(data):
            break
        if element_id == _BLOCK_GROUP and child_size > _MAX_BLOCK_GROUP:
            raise _Malformed("BlockGroup too large")
        # Of the other elements only the first bytes are read.
        block = data[child:child + (child_size if element_id == _BLOCK_GROUP
                                    else min(child_size, _BLOCK_HEAD))]
        pos = child + child_size
        if element_id == _CLUSTER_TIMESTAMP:
            cluster_ts = _uint(block)
        elif element_id in (_SIMPLE_BLOCK, _BLOCK_GROUP):
            timed = _block_timing(block, element_id == _BLOCK_GROUP, track, scale, budget)
            if timed is not None:
                first, previous, last = first or timed, last, timed
    if cluster_ts is None or last is None:
        return None
    relative, duration_ns, discard_ns = last
    if duration_ns is None:
        step = (relative - previous[0]) * scale if previous else 0
        duration_ns = track.default_duration_ns or max(step, 0)
    return ((cluster_ts + first[0]) * scale,
            (cluster_ts + relative) * scale + duration_ns - discard_ns)


def _block_timing(data: bytes, grouped: bool, track: _Track, scale: int,
                  budget: _Budget) -> tuple[int, int | None, int] | None:
    """(relative timestamp, duration in ns or None, discarded ns) of a
    SimpleBlock or BlockGroup of ``track``; None for another track's."""
    block, duration_ns, discard_ns = data, None, 0
    if grouped:
        block = b""
        for element_id, body in _children(data, budget):
            if element_id == _BLOCK:
                block = body
            elif element_id == _BLOCK_DURATION:
                duration_ns = _uint(body) * scale
            elif element_id == _DISCARD_PADDING:
                discard_ns = max(0, int.from_bytes(body[:8], "big", signed=True))
    number, width = _vint(block, 0)
    if number != track.number or len(block) < width + 3:
        return None
    relative = int.from_bytes(block[width:width + 2], "big", signed=True)
    laced = block[width + 2] & 0x06
    if duration_ns is None and not laced and track.codec_id == "A_OPUS":
        duration_ns = _opus_packet_ns(block[width + 3:])
    return relative, duration_ns, discard_ns


# Opus frame sizes by TOC configuration (RFC 6716 section 3.1), in units
# of 0.5 ms: SILK 10, 20, 40, 60 ms; hybrid 10, 20 ms; CELT 2.5 to 20 ms.
_OPUS_FRAME_HALF_MS = (20, 40, 80, 120) * 3 + (20, 40) * 2 + (5, 10, 20, 40) * 4


def _opus_packet_ns(packet: bytes) -> int | None:
    """How long an Opus packet plays, from its TOC byte and frame count
    (RFC 6716 section 3.2); None if it is too short to say."""
    if not packet:
        return None
    toc = packet[0]
    frames = (1, 2, 2, 0)[toc & 3]
    if not frames:
        if len(packet) < 2:
            return None
        frames = packet[1] & 0x3F
    return _OPUS_FRAME_HALF_MS[toc >> 3] * frames * 500_000

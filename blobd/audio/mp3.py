"""MPEG audio elementary streams: MP1, MP2 and MP3 frames, and ADTS AAC.

Both are bare runs of self-describing frames, found by their sync word and
possibly fronted by ID3v2 tags (the dispatch skips those). mutagen hunts
for frame syncs and can "find" them in noise, so an MP3 must start a chain
of frames (blobd.sniff's frame helpers, shared with `could_be_audio`).

An MP3's length comes from its Xing/Info header when it has one, less the
encoder delay and padding that ffmpeg states in the LAME tag (mutagen
honours only LAME's own), bounded by the bytes present; without one, from
counting the frames, since the first frame's bitrate says nothing of the
rest.
"""

from __future__ import annotations

from typing import IO

from mutagen.aac import AAC
from mutagen.mp3 import BitrateMode, MPEGInfo

from ..sniff import (MAX_MP3_JUNK, MAX_MPEG_FRAME, MP3_CHAIN_FRAMES,
                     find_mpeg_chain, id3v2_size, mpeg_chain_at, mpeg_frame_length,
                     mpeg_frame_samples, same_mpeg_stream)
from .info import AudioInfo, clamp_to_size, file_size, make_info

_MPEG_LAYER_CODECS = {1: "mp1", 2: "mp2", 3: "mp3"}


def read_mp3(f: IO[bytes], start: int, head: bytes,
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
        length = clamp_to_size(length, stream.bitrate, file_size(f) - stream.frame_offset)
    return make_info(stream, _MPEG_LAYER_CODECS.get(stream.layer, "mp3"),
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
    size = file_size(f)
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


def read_aac(f: IO[bytes], start: int, head: bytes) -> AudioInfo:
    # mutagen reads at most a hundred ADTS frames, then estimates.
    f.seek(0)
    return make_info(AAC(f).info, "aac", "audio/aac")

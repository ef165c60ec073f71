"""Native FLAC: its STREAMINFO, and how much of the stream a file holds.

`read_flac` takes STREAMINFO, which must be the first metadata block (RFC
9639), and skips the other blocks unread, counting them: mutagen would load
every one, and a file of implausibly many is refused.

STREAMINFO states the stream's total samples when the encoder finished; a
file cut short afterwards (an interrupted copy, a partial download
uploaded) keeps that claim. Only the frames can tell: each frame header
carries its position in the stream (RFC 9639 section 9.1), and each frame
ends with a CRC-16 of the whole frame (section 9.3), which tells a real
frame from bytes of audio data that merely look like a header. A file's
last 256 KiB at most are parsed for where its frames end, in one pass.

The frame functions (`samples_held` and what it calls) are pure functions
over bytes already in memory, like blobd.sniff.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from mutagen.flac import StreamInfo as FLACStreamInfo

from .info import AudioInfo, file_size, make_info

# A bound on container structure: real files have a handful of metadata
# blocks; this is far above that and far below what costs real time or
# memory.
_MAX_FLAC_BLOCKS = 1_024


def read_flac(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
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
    audio_bytes = file_size(f) - pos
    if audio_bytes <= 0:
        return None   # the metadata claims to run past the end of the file
    if not stream.length:   # streamed: the length was not known when written
        return make_info(stream, "flac", "audio/flac", bits_per_sample=stream.bits_per_sample)
    length = stream.length
    held = _flac_samples_held(f, stream, pos)
    if held is not None and held < stream.total_samples:
        # STREAMINFO's length survives truncation; the frames do not.
        length = held / stream.sample_rate
    return make_info(stream, "flac", "audio/flac", duration=length,
                     bitrate=audio_bytes * 8 / length, bits_per_sample=stream.bits_per_sample)


def streaminfo_bit_depth(blocks: bytes) -> int | None:
    """The bits per sample of the FLAC metadata ``blocks`` (a block header
    then its body, as after the "fLaC" marker) when the first is
    STREAMINFO (RFC 9639 section 8.2): 5 bits, less one, after the sample
    rate and channels. FLAC in MP4 and in Matroska carries them so."""
    if len(blocks) < 4 + 14 or blocks[0] & 0x7F != 0 or blocks[1:4] != b"\0\0\x22":
        return None
    return ((blocks[4 + 12] & 1) << 4 | blocks[4 + 13] >> 4) + 1


# The bytes read from a FLAC file's end to find its last frames: two of the
# largest frames STREAMINFO states (or could hold uncompressed), capped.
_FLAC_MAX_TAIL = 256 << 10


def _flac_samples_held(f: IO[bytes], stream: Any, audio_at: int) -> int | None:
    """The samples the frames at the file's end reach (see samples_held);
    None if they cannot be told."""
    largest = stream.max_framesize or (
        stream.max_blocksize * stream.channels * stream.bits_per_sample // 8 + 64)
    size = file_size(f)
    start = max(audio_at, size - min(2 * largest + 256, _FLAC_MAX_TAIL))
    f.seek(start)
    return samples_held(f.read(size - start), stream.channels, stream.max_blocksize,
                        stream.total_samples)


# --- the frames at the end of the file --------------------------------------

@dataclass(frozen=True, slots=True)
class FrameHeader:
    number: int          # the frame's number, or with variable block sizes its first sample
    variable: bool       # blocking strategy bit: variable block sizes
    block_size: int      # samples per channel in the frame


def _crc_table(poly: int, width: int) -> list[int]:
    top, mask, table = 1 << (width - 1), (1 << width) - 1, []
    for byte in range(256):
        crc = byte << (width - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly if crc & top else crc << 1) & mask
        table.append(crc)
    return table


_CRC8 = _crc_table(0x07, 8)      # RFC 9639 section 9.1.8
_CRC16 = _crc_table(0x8005, 16)  # RFC 9639 section 9.3


def crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = _CRC8[crc ^ byte]
    return crc


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc


def _coded_number(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, length) of the UTF-8-like coded number at ``pos``
    (RFC 9639 section 9.1.5): up to 7 bytes, 36 bits."""
    if pos >= len(data):
        return None
    first = data[pos]
    if first < 0x80:
        return first, 1
    length = 8 - (~first & 0xFF).bit_length()   # the leading one bits
    if not 2 <= length <= 7 or pos + length > len(data):
        return None
    value = first & (0x7F >> length)
    for byte in data[pos + 1:pos + length]:
        if byte & 0xC0 != 0x80:
            return None
        value = (value << 6) | (byte & 0x3F)
    return value, length


def _channels(assignment: int) -> int | None:
    if assignment < 8:
        return assignment + 1
    return 2 if assignment <= 10 else None   # left/side, right/side, mid/side


def frame_header(data: bytes, pos: int, channels: int) -> FrameHeader | None:
    """The frame header at ``pos`` of ``data``, if one of a stream of
    ``channels`` channels is there with a valid CRC-8; else None."""
    head = data[pos:pos + 4]
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xFE != 0xF8:
        return None
    size_code, rate_code = head[2] >> 4, head[2] & 0x0F
    if (size_code == 0 or rate_code == 15 or (head[3] >> 1) & 7 == 3 or head[3] & 1
            or _channels(head[3] >> 4) != channels):
        return None
    coded = _coded_number(data, pos + 4)
    if coded is None:
        return None
    number, end = coded[0], pos + 4 + coded[1]
    extra = {6: 1, 7: 2}.get(size_code, 0)
    block_size = int.from_bytes(data[end:end + extra], "big") + 1 if extra else \
        192 if size_code == 1 else 144 << size_code if size_code <= 5 else 1 << size_code
    end += extra + {12: 1, 13: 2, 14: 2}.get(rate_code, 0)
    if end >= len(data) or crc8(data[pos:end]) != data[end]:
        return None
    return FrameHeader(number, bool(head[1] & 1), block_size)


def _start(header: FrameHeader, fixed_block_size: int) -> int:
    return header.number if header.variable else header.number * fixed_block_size


def samples_held(tail: bytes, channels: int, fixed_block_size: int,
                 total_samples: int) -> int | None:
    """How many samples of the stream a file holds, from ``tail``, its last
    bytes, which must span at least its last two whole frames; None when
    they hold the stream to its end (or to within its last frame, or
    cannot be told), so that STREAMINFO's length stands.

    The last frame counts only if the frame before it leads to it (its
    first sample where the other's end): audio data passes for a header
    one time in 256, never for one at the right place. It played only if
    its CRC-16 matches, the frame whole. ID3v1 and APEv2 tags at the end
    are not frames; they are taken off first. The work is linear in
    ``tail``: one CRC-16, over the last frame."""
    if tail[-128:-125] == b"TAG":
        tail = tail[:-128]
    ape = tail.rfind(b"APETAGEX", max(0, len(tail) - 32))
    if ape >= 0:
        tail = tail[:ape]
    headers = [(pos, h) for pos in _syncs(tail)
               if (h := frame_header(tail, pos, channels)) is not None]
    ends: dict[int, int] = {}     # a frame's end sample -> its earliest position
    for pos, header in headers:
        ends.setdefault(_start(header, fixed_block_size) + header.block_size, pos)
    for pos, header in reversed(headers):
        first = _start(header, fixed_block_size)
        if ends.get(first, pos) < pos:
            if first + header.block_size >= total_samples:
                return None
            whole = crc16(tail[pos:-2]) == int.from_bytes(tail[-2:], "big")
            return first + (header.block_size if whole else 0)
    return None


def _syncs(data: bytes) -> Iterator[int]:
    """Where a frame sync (FF F8 or FF F9) starts in ``data``."""
    pos = data.find(b"\xff")
    while pos >= 0:
        if pos + 1 < len(data) and data[pos + 1] & 0xFE == 0xF8:
            yield pos
        pos = data.find(b"\xff", pos + 1)

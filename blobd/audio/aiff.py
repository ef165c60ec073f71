"""AIFF and AIFF-C (Apple's IFF audio): the COMM chunk's facts.

The chunks are listed first, bounded in number and 'COMM' in size, as for
WAVE, and COMM's common fields are read here: mutagen's AIFFInfo lists the
chunks again, unbounded, from the file's first byte, so it cannot read a
FORM behind an ID3v2 tag. An AIFF-C file's compression type, which follows
the common fields, names the codec, and for the compressed ones the length
comes from the frame count but the rate from the sound data's size.
"""

from __future__ import annotations

import struct
from typing import IO, NamedTuple

from mutagen.aiff import read_float

from .info import AudioInfo, clamp_to_size, file_size, list_chunks, make_info

# A bound on the chunk mutagen reads whole: a real COMM chunk is a few
# dozen bytes (the number of chunks is bounded by list_chunks).
_MAX_COMM = 4 << 10

# AIFF-C compression types (Apple's AIFF-C specification and the QuickTime
# list) named as the WAVE reader and ffmpeg name them. 'sowt' is PCM
# little-endian, 'NONE' and 'twos' big-endian; all samples of fixed size.
_PCM_TYPES = {b"NONE": "pcm", b"twos": "pcm", b"sowt": "pcm", b"raw ": "pcm",
              b"in24": "pcm", b"in32": "pcm", b"42ni": "pcm", b"23ni": "pcm",
              b"fl32": "pcm_float", b"FL32": "pcm_float",
              b"fl64": "pcm_float", b"FL64": "pcm_float"}
_COMPRESSED_TYPES = {b"ulaw": "mulaw", b"ULAW": "mulaw", b"alaw": "alaw",
                     b"ALAW": "alaw", b"ima4": "adpcm_ima", b"MAC3": "mace3",
                     b"MAC6": "mace6", b"GSM ": "gsm", b"QDM2": "qdm2",
                     b"QDMC": "qdmc"}
# Samples in one packet of the codecs whose COMM frame count counts
# packets (ffmpeg's AIFF reader scales by the same): Apple's ima4 packs 64
# into 34 bytes a channel, MACE 6 into 2 or 1 bytes, GSM 160 into 33.
_SAMPLES_PER_PACKET = {b"ima4": 64, b"MAC3": 6, b"MAC6": 6, b"GSM ": 160}


class _Common(NamedTuple):
    """COMM's common fields, as `make_info` reads a stream's."""

    channels: int
    frames: int
    bits_per_sample: int
    sample_rate: int

    @property
    def length(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0

    @property
    def bitrate(self) -> int:
        # The container's sample size, as mutagen and ffprobe state PCM's.
        return self.channels * self.bits_per_sample * self.sample_rate


def _common(comm: bytes) -> _Common | None:
    """The common fields at the start of a COMM body; None if cut short
    or its sample rate (an 80-bit extended float) is out of range."""
    if len(comm) < 18:
        return None
    channels, frames, bits, rate = struct.unpack(">hLh10s", comm[:18])
    try:
        sample_rate = int(read_float(rate))
    except (OverflowError, ValueError):
        return None
    return _Common(channels, frames, bits, sample_rate) if sample_rate >= 0 else None


def read_aiff(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    """AIFF or AIFF-C, whose FORM starts at ``start`` (past any ID3v2 tag)."""
    chunks = list_chunks(f, start, "big", b"COMM", _MAX_COMM)
    if chunks is None or b"COMM" not in chunks:
        return None
    comm_at, comm_size = chunks[b"COMM"]
    f.seek(comm_at)
    comm = f.read(comm_size)
    stream = _common(comm)
    if stream is None:
        return None
    compression = comm[18:22] if head[8:12] == b"AIFC" else b"NONE"
    # The sound data follows the SSND chunk's offset and block size fields.
    # Its declared size survives truncation; the file does not.
    data_at, data_size = chunks.get(b"SSND", (0, 8))
    data_at, data_size = data_at + 8, max(0, data_size - 8)
    present = max(0, min(data_size, file_size(f) - data_at))
    if compression in _PCM_TYPES:
        length = clamp_to_size(stream.length, stream.bitrate, present)
        # COMM's sampleSize: the bits of each sample that hold sound (20 in
        # a 24-bit container is 20), as WAVE's valid bits.
        return make_info(stream, _PCM_TYPES[compression], "audio/aiff", duration=length,
                         bits_per_sample=stream.bits_per_sample)
    codec = _COMPRESSED_TYPES.get(compression,
                                  compression.decode("latin-1").strip().lower() or "unknown")
    # mutagen's bitrate takes the sample size for the data's; compressed,
    # the data's size over the length says.
    length = (stream.length * _SAMPLES_PER_PACKET.get(compression, 1) * present / data_size
              if data_size else 0.0)
    bitrate = present * 8 / length if length else 0.0
    return make_info(stream, codec, "audio/aiff", duration=length, bitrate=bitrate)

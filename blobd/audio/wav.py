"""WAVE: PCM and compressed sample formats, from the 'fmt ' chunk.

Three containers hold a WAVE stream: RIFF, RF64 and BW64 (RIFF with
64-bit sizes) and Sony Wave64; each lists its chunks its own way (this
module reads RIFF's, `blobd.audio.wave64` the others) into a `WaveLayout`,
and `wave_info` reads the stream from that. The chunks are listed first,
bounded in number, and 'fmt ' is read to a bounded size; mutagen, which
cannot read RF64 or W64, is not needed for RIFF either.

The length of a format of one fixed-size block per sample frame is the
data's size over the block align; for the others it comes from the 'fact'
chunk or the stated byte rate.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import IO, NamedTuple

from .info import AudioInfo, clamp_to_size, file_size, list_chunks, make_info

# A bound on the 'fmt ' chunk read, far above a real one (the number of
# chunks is bounded by list_chunks).
MAX_WAVE_FORMAT = 64 << 10  # a WAVEFORMATEXTENSIBLE is 40 bytes

# WAVE format tags (RFC 2361 appendix A); WAVE_FORMAT_EXTENSIBLE (0xFFFE)
# names its real format in the first two bytes of its SubFormat GUID.
_WAVE_CODECS = {1: "pcm", 2: "adpcm_ms", 3: "pcm_float", 6: "alaw", 7: "mulaw",
                0x11: "adpcm_ima", 0x31: "gsm_ms", 0x55: "mp3"}
_WAVE_EXTENSIBLE = 0xFFFE
# Formats of one fixed-size block per sample frame, whose length is exactly
# the data size over the block align. In the others a block holds many
# frames (ADPCM, GSM) or none of fixed size (MP3): dividing by the block
# align all the same (as mutagen does: 3.0 s of IMA ADPCM came out as
# 0.006 s) is wrong, and the 'fact' chunk states the length instead.
_WAVE_PER_SAMPLE = frozenset({1, 3, 6, 7})
# Formats whose samples are linear: integer PCM and IEEE float. A-law and
# mu-law are 8-bit codes of 13- and 14-bit samples; none has a bit depth.
_WAVE_LINEAR = frozenset({1, 3})


@dataclass(frozen=True)
class WaveLayout:
    """Where a WAVE stream's container keeps what the probe reads: the
    'fmt ' body (at most MAX_WAVE_FORMAT bytes; b"" if absent), the sound
    data's offset and declared size (0 if absent; the declared size
    survives truncation, the file does not), and the sample frames the
    'fact' chunk (or RF64's ds64) states, 0 if none."""

    fmt: bytes
    data_at: int
    data_size: int
    frames: int

    @classmethod
    def of(cls, f: IO[bytes], chunks: dict[bytes, tuple[int, int]],
           frames: int) -> WaveLayout:
        """From a container's chunk list (RIFF ids, each id's first), and
        the frame count its own way of stating one gives."""
        data_at, data_size = chunks.get(b"data", (0, 0))
        return cls(riff_chunk_head(f, chunks, b"fmt ", MAX_WAVE_FORMAT),
                   data_at, data_size, frames)


class _WaveFormat(NamedTuple):
    """The WAVEFORMATEX fields, as `make_info` reads a stream's."""

    channels: int
    sample_rate: int
    byte_rate: int
    block_align: int
    bits_per_sample: int

    @property
    def bitrate(self) -> int:
        # The container's sample size, as mutagen and ffprobe state PCM's.
        return self.channels * self.bits_per_sample * self.sample_rate


def read_wav(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    """RIFF WAVE, starting at ``start`` (past any ID3v2 tag)."""
    chunks = list_chunks(f, start, "little", b"fmt ", MAX_WAVE_FORMAT)
    if chunks is None:
        return None
    frames = int.from_bytes(riff_chunk_head(f, chunks, b"fact", 4), "little")
    return wave_info(f, WaveLayout.of(f, chunks, frames), "audio/wav")


def wave_info(f: IO[bytes], layout: WaveLayout, mime: str) -> AudioInfo | None:
    """The stream facts of a WAVE stream laid out as ``layout`` says; None
    without a whole WAVEFORMATEX."""
    fmt = layout.fmt
    if len(fmt) < 16:
        return None
    audio_format = int.from_bytes(fmt[0:2], "little")
    stream = _WaveFormat(*struct.unpack("<HIIHH", fmt[2:16]))
    if audio_format == _WAVE_EXTENSIBLE and len(fmt) >= 26:
        audio_format = int.from_bytes(fmt[24:26], "little")
    codec = _WAVE_CODECS.get(audio_format, "wav")
    present = max(0, min(layout.data_size, file_size(f) - layout.data_at))
    if audio_format in _WAVE_PER_SAMPLE:
        length = 0.0
        if stream.block_align and stream.sample_rate:
            length = layout.data_size / stream.block_align / stream.sample_rate
        length = clamp_to_size(length, stream.bitrate, present)
        bits = (_valid_bits(fmt, stream.bits_per_sample) if audio_format in _WAVE_LINEAR
                else None)
        return make_info(stream, codec, mime, duration=length, bits_per_sample=bits)
    length, bitrate = _compressed_length(layout, present, stream)
    return make_info(stream, codec, mime, duration=length, bitrate=bitrate)


def _valid_bits(fmt: bytes, container_bits: int) -> int:
    """The bits of each sample that hold sound. WAVE_FORMAT_EXTENSIBLE
    states them apart from the container's (wValidBitsPerSample: 24 of
    32, as some recorders write); a value of 0, or more than the
    container holds, states nothing, and the container's size stands."""
    if int.from_bytes(fmt[0:2], "little") == _WAVE_EXTENSIBLE and len(fmt) >= 26:
        valid = int.from_bytes(fmt[18:20], "little")
        if 0 < valid <= container_bits:
            return valid
    return container_bits


def _compressed_length(layout: WaveLayout, present: int,
                       stream: _WaveFormat) -> tuple[float, float]:
    """(duration, bitrate) of a WAVE stream whose blocks hold many sample
    frames: the 'fact' chunk's frame count, scaled down to the part of the
    data present; without one, the data at the format's stated byte rate.
    The data's own rate, not the stated one, where both are known: ffmpeg
    states 128 kb/s for IMA ADPCM at 8 kHz, four times the truth."""
    if layout.frames and stream.sample_rate and layout.data_size:
        stated = layout.frames / stream.sample_rate
        return stated * present / layout.data_size, layout.data_size * 8 / stated
    if stream.byte_rate:
        return present / stream.byte_rate, stream.byte_rate * 8
    return 0.0, 0.0


def riff_chunk_head(f: IO[bytes], chunks: dict[bytes, tuple[int, int]],
                    name: bytes, limit: int) -> bytes:
    """Up to ``limit`` leading bytes of chunk ``name``'s body; b"" if absent."""
    if name not in chunks:
        return b""
    offset, size = chunks[name]
    f.seek(offset)
    return f.read(min(size, limit))

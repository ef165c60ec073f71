"""WAVE (RIFF): PCM and compressed sample formats, from the chunk list.

mutagen lists every RIFF chunk to find 'fmt ' and 'data', and reads 'fmt '
whole, so the chunks are listed here first, bounded in number and the
'fmt ' chunk in size. mutagen's length holds for formats of one fixed-size
block per sample frame; for the others it comes from the 'fact' chunk or
the stated byte rate.
"""

from __future__ import annotations

from typing import IO

from mutagen.wave import WaveStreamInfo

from .info import AudioInfo, clamp_to_size, file_size, list_chunks, make_info

# A bound on the chunk mutagen reads whole, far above a real one (the
# number of chunks is bounded by list_chunks).
_MAX_WAVE_FORMAT = 64 << 10  # a WAVEFORMATEXTENSIBLE is 40 bytes

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
# Formats whose samples are linear: integer PCM and IEEE float. A-law and
# mu-law are 8-bit codes of 13- and 14-bit samples; none has a bit depth.
_WAVE_LINEAR = frozenset({1, 3})


def read_wav(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    chunks = list_chunks(f, "little", b"fmt ", _MAX_WAVE_FORMAT)
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
        length = clamp_to_size(stream.length, stream.bitrate, file_size(f))
        bits = _valid_bits(fmt, stream.bits_per_sample) if audio_format in _WAVE_LINEAR \
            else None
        return make_info(stream, _WAVE_CODECS.get(audio_format, "wav"), "audio/wav",
                         duration=length, bits_per_sample=bits)
    length, bitrate = _wave_compressed_length(f, chunks, fmt, stream.sample_rate)
    return make_info(stream, _WAVE_CODECS.get(audio_format, "wav"), "audio/wav",
                     duration=length, bitrate=bitrate)


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


def _wave_compressed_length(f: IO[bytes], chunks: dict[bytes, tuple[int, int]],
                            fmt: bytes, sample_rate: int) -> tuple[float, float]:
    """(duration, bitrate) of a WAVE file whose blocks hold many sample
    frames: the 'fact' chunk's frame count, scaled down to the part of the
    data chunk present; without one, the data at the format's stated byte
    rate. The data's own rate, not the stated one, where both are known:
    ffmpeg states 128 kb/s for IMA ADPCM at 8 kHz, four times the truth."""
    data_at, data_size = chunks.get(b"data", (0, 0))
    present = max(0, min(data_size, file_size(f) - data_at))
    frames = int.from_bytes(_riff_chunk_head(f, chunks, b"fact", 4), "little")
    if frames and sample_rate and data_size:
        stated = frames / sample_rate
        return stated * present / data_size, data_size * 8 / stated
    byte_rate = int.from_bytes(fmt[8:12], "little")
    return (present / byte_rate, byte_rate * 8) if byte_rate else (0.0, 0.0)



def _riff_chunk_head(f: IO[bytes], chunks: dict[bytes, tuple[int, int]],
                     name: bytes, limit: int) -> bytes:
    """Up to ``limit`` leading bytes of chunk ``name``'s body; b"" if absent."""
    if name not in chunks:
        return b""
    offset, size = chunks[name]
    f.seek(offset)
    return f.read(min(size, limit))

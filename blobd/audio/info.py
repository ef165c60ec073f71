"""What the probe reports, and the helpers every format's reader shares.

`AudioInfo` is the result and its JSON shape; `complete_json` brings an
`audio` object stored before a key was added up to today's shape;
`make_info` builds one from a mutagen StreamInfo, turning mutagen's 0 for
"unknown" into None; the size helpers bound a header's claims by the bytes
actually present.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any, Literal

from ..sniff import AUDIO_MIME_TYPES


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """Stream facts of one audio file. `duration` is in seconds (rounded to
    milliseconds, see round_duration; None when the file does not say, see
    blobd.audio._plausible),
    `bitrate` in bits per second; `bits_per_sample` the bit depth of a
    stream whose samples have one (PCM, float, FLAC, ALAC: the header's
    valid bits), None for lossy and other compressed codecs (MP3, AAC,
    Vorbis, Opus, ADPCM, A-law, ...), whose samples have no fixed width
    in the file; `mime` is one of AUDIO_MIME_TYPES and is
    not part of the JSON shape (the blob's content_type carries it), nor is
    `with_video` (the file also holds a video track: an MP4 film with its
    sound), which only the choice of content type at upload needs."""

    duration: float | None
    bitrate: int | None
    sample_rate: int | None
    channels: int | None
    codec: str
    mime: str
    bits_per_sample: int | None = None
    with_video: bool = False

    def to_json(self) -> dict[str, Any]:
        """The `audio` object of `GET /blobs/<hash>/meta` (API.md)."""
        return {
            "duration": self.duration,
            "bitrate": self.bitrate,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "codec": self.codec,
            "bits_per_sample": self.bits_per_sample,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], mime: str) -> AudioInfo:
        """Rebuild from `to_json()` output plus the blob's content type.
        Raises ValueError on a malformed mapping: stored data that does not
        round-trip is corruption, and should be loud. A key the object
        gained after it was stored may be missing (see complete_json)."""
        data = complete_json(data)
        try:
            info = cls(
                duration=None if data["duration"] is None else float(data["duration"]),
                bitrate=_optional_int(data["bitrate"]),
                sample_rate=_optional_int(data["sample_rate"]),
                channels=_optional_int(data["channels"]),
                codec=data["codec"],
                mime=mime,
                bits_per_sample=_optional_int(data["bits_per_sample"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not an audio info mapping: {e!r}") from e
        if not isinstance(info.codec, str) or mime not in AUDIO_MIME_TYPES:
            raise ValueError(f"bad codec {info.codec!r} or mime {mime!r}")
        return info


# The keys the `audio` object gained after blobs were first stored, with
# what an object stored before them says: nothing (null). A stored row
# stands as it was recorded (blobd.describe does not probe a known blob
# again), and a restore brings back an index as old as its backup; so
# every reader of a stored object completes it.
_ADDED_KEYS: dict[str, Any] = {"bits_per_sample": None}


def complete_json(data: Mapping[str, Any]) -> dict[str, Any]:
    """A stored `audio` object with the keys added since filled in as null."""
    return {**data, **{key: value for key, value in _ADDED_KEYS.items() if key not in data}}


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer or null, got {value!r}")
    return value


def make_info(stream: Any, codec: str, mime: str, *,
              duration: float | None = None, bitrate: float | None = None,
              sample_rate: int | None = None, bits_per_sample: int | None = None,
              with_video: bool = False) -> AudioInfo:
    """AudioInfo from a mutagen StreamInfo, with overrides; zero or missing
    numbers become None (mutagen uses 0 for "unknown"). `bits_per_sample`
    is never taken from the stream: mutagen reports one for codecs that
    have none (16 for AAC in MP4, 4 for ADPCM), so a reader states it for
    the codecs that do."""
    length = float(stream.length if duration is None else duration)
    return AudioInfo(
        duration=round_duration(length) if length else None,
        bitrate=_positive_int(bitrate or getattr(stream, "bitrate", 0)),
        sample_rate=_positive_int(sample_rate or getattr(stream, "sample_rate", 0)),
        channels=_positive_int(getattr(stream, "channels", 0)),
        codec=codec,
        mime=mime,
        bits_per_sample=bit_depth(bits_per_sample),
        with_video=with_video,
    )


def round_duration(seconds: float) -> float:
    """``seconds`` rounded to milliseconds, but for a stream shorter than
    half of one (a WAV of one sample frame lasts 1/8000 s), which keeps
    its microseconds: rounded to 0 it would read as no stream at all (see
    blobd.audio._plausible, which refuses a duration of 0)."""
    rounded = round(seconds, 3)
    return rounded if rounded or not seconds else round(seconds, 6)


# Linear PCM runs from 8 to 32 bits, float to 64 (FLAC allows 4 to 32); a
# header claiming more, or nothing, states no bit depth.
_MAX_BIT_DEPTH = 64


def bit_depth(value: int | None) -> int | None:
    """``value`` if it is a bit depth a stream can have, else None."""
    return value if isinstance(value, int) and 1 <= value <= _MAX_BIT_DEPTH else None


def _positive_int(value: Any) -> int | None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    number = int(round(value))
    return number if number > 0 else None


def file_size(f: IO[bytes]) -> int:
    return os.fstat(f.fileno()).st_size


def clamp_to_size(length: float, bitrate: float, available_bytes: int) -> float:
    """The shorter of the length a header claims and what the bytes present
    can hold at `bitrate`: a truncated upload reports what it can play."""
    if bitrate <= 0:
        return length
    return min(length, max(available_bytes, 0) * 8 / bitrate)


# Real RIFF and IFF files have a handful of chunks; far above that and far
# below what costs real time or memory (mutagen lists them all).
MAX_CHUNKS = 1_024


# An RF64 chunk whose 32-bit size says this has its size in the 'ds64' chunk.
RF64_SIZE_ELSEWHERE = 0xFFFFFFFF


def list_chunks(f: IO[bytes], start: int, byteorder: Literal["little", "big"],
                read_whole: bytes, max_whole: int,
                big_sizes: Mapping[bytes, int] | None = None,
                ) -> dict[bytes, tuple[int, int]] | None:
    """The chunks of the RIFF or IFF form at offset ``start`` (0, or past
    an ID3v2 tag; sizes in ``byteorder``), each id's first: (offset in the
    file of its body, declared size). None if there are more
    than MAX_CHUNKS or chunk ``read_whole``, which a reader reads whole into
    memory, claims more than ``max_whole`` bytes. ``big_sizes`` are an RF64
    file's 64-bit sizes ('ds64'), by chunk id: each stands for a 32-bit
    size of RF64_SIZE_ELSEWHERE."""
    pos, end, chunks = start + 12, file_size(f), {}
    for _ in range(MAX_CHUNKS):
        if pos + 8 > end:
            return chunks
        f.seek(pos)
        header = f.read(8)
        size = int.from_bytes(header[4:8], byteorder)
        if size == RF64_SIZE_ELSEWHERE and big_sizes and header[:4] in big_sizes:
            size = big_sizes[header[:4]]
        if header[:4] == read_whole and size > max_whole:
            return None
        chunks.setdefault(header[:4], (pos + 8, size))
        pos += 8 + size + (size & 1)   # chunks are padded to even length
    return chunks if pos + 8 > end else None

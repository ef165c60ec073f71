"""AC-3 (Dolby Digital) and E-AC-3 (Dolby Digital Plus) elementary streams,
as DVD and Blu-ray rips and TV recordings hold them (`.ac3`, `.eac3`).

Read by blobd itself from the frame headers (blobd.sniff's helpers, shared
with `sniff_mime` and `could_be_audio`): mutagen's reader skips the mix
level fields of AC-3's header and so misreads LFE, calling 5.1 five
channels. Like MP3, a stream must start a chain of frames before it is
taken for one.

The streams are constant-rate, and state no length: as ffprobe does, it is
the bytes present at the bitrate, so a cut file reports what it holds.
"""

from __future__ import annotations

from typing import IO

from ..sniff import AC3_CHAIN_FRAMES, AC3_HEADER_BYTES, MAX_AC3_FRAME, ac3_chain_at, ac3_frame
from .info import AudioInfo, file_size, round_duration

_CODECS = {"audio/ac3": "ac3", "audio/eac3": "eac3"}
# A program is its independent substream 0 and the substreams sent with
# it, at most 8 independent and 8 dependent ones (A/52 Annex E).
_MAX_PROGRAM_FRAMES = 16


def read_ac3(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    f.seek(start)
    wanted = (AC3_CHAIN_FRAMES + _MAX_PROGRAM_FRAMES) * MAX_AC3_FRAME + AC3_HEADER_BYTES
    data = f.read(wanted)
    if not ac3_chain_at(data, 0, at_end=len(data) < wanted):
        return None
    first = ac3_frame(data)
    if first is None:   # never: the chain starts with one
        return None
    bitrate = first.bitrate
    if first.mime == "audio/eac3":
        # The substreams sent with the first carry bytes of the same
        # stretch of time: the stream's rate is theirs together.
        bitrate = _program_bytes(data) * 8 * first.sample_rate // first.samples
    duration = (file_size(f) - start) * 8 / bitrate
    return AudioInfo(duration=round_duration(duration), bitrate=bitrate,
                     sample_rate=first.sample_rate, channels=first.channels,
                     codec=_CODECS[first.mime], mime=first.mime)


def _program_bytes(data: bytes) -> int:
    """Bytes of the first program: its first frame and every frame
    before the next that opens one."""
    pos = 0
    for _ in range(_MAX_PROGRAM_FRAMES):
        frame = ac3_frame(data[pos:pos + AC3_HEADER_BYTES])
        if frame is None or (pos and frame.opens_program):
            break
        pos += frame.size
    return pos

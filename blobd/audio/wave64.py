"""WAVE in 64-bit containers: RF64 and BW64, and Sony Wave64 (W64).

Field recorders and DAWs switch to these past RIFF's 4 GiB. mutagen reads
neither, so their chunks are listed here into a `WaveLayout`, and
`blobd.audio.wav.wave_info` reads the stream from it as for RIFF WAVE.

* RF64 (EBU Tech 3306) and BW64 (ITU-R BS.2088) are RIFF with a 'ds64'
  chunk first: 64-bit RIFF and data sizes, the sample count, and a table
  of other chunks' sizes. A chunk whose 32-bit size is FFFFFFFF has its
  size there; so has a 'fact' chunk whose count is FFFFFFFF.
* W64 names each chunk with a 16-byte GUID and gives it a 64-bit size
  that counts its 24-byte header; bodies are padded to 8 bytes.

Both are read as RIFF is: the chunks counted up to MAX_CHUNKS, 'fmt ' and
'ds64' read to a bounded size, every 64-bit size bounded by the bytes
present before it sets how much is read.
"""

from __future__ import annotations

from typing import IO

from ..sniff import W64_GUID_TAIL
from .info import (MAX_CHUNKS, RF64_SIZE_ELSEWHERE, AudioInfo, file_size,
                   list_chunks)
from .wav import MAX_WAVE_FORMAT, WaveLayout, riff_chunk_head, wave_info

# ds64's fixed fields: RIFF size, data size, sample count (64 bits each)
# and the count of table entries (32 bits); each entry is a chunk id and
# its 64-bit size.
_DS64_FIXED = 28
_DS64_ENTRY = 12
# A bound on the ds64 read: a real one lists a few chunks at most.
_MAX_DS64 = 4 << 10

# W64: a 16-byte GUID and a 64-bit size start the file and every chunk.
_W64_HEADER = 24
_W64_FIRST_CHUNK = 40    # after the riff GUID, its size and the wave GUID


def read_rf64(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    # EBU Tech 3306 puts ds64 first, where a reader looks for it.
    if head[12:16] != b"ds64":
        return None
    f.seek(start + 16)
    ds64_size = int.from_bytes(f.read(4), "little")
    ds64 = f.read(min(ds64_size, _MAX_DS64))
    if len(ds64) < _DS64_FIXED:
        return None
    data_size = int.from_bytes(ds64[8:16], "little")
    sample_count = int.from_bytes(ds64[16:24], "little")
    big_sizes = {**_ds64_table(ds64), b"data": data_size}
    chunks = list_chunks(f, start, "little", b"fmt ", MAX_WAVE_FORMAT, big_sizes)
    if chunks is None:
        return None
    fact = riff_chunk_head(f, chunks, b"fact", 4)
    frames = int.from_bytes(fact, "little")
    if len(fact) < 4 or frames == RF64_SIZE_ELSEWHERE:
        frames = sample_count
    return wave_info(f, WaveLayout.of(f, chunks, frames), "audio/wav")


def _ds64_table(ds64: bytes) -> dict[bytes, int]:
    """The sizes ds64's table gives chunks other than 'data', as many
    entries as it claims and the bytes read hold."""
    claimed = int.from_bytes(ds64[24:28], "little")
    held = (len(ds64) - _DS64_FIXED) // _DS64_ENTRY
    table = {}
    for i in range(min(claimed, held)):
        at = _DS64_FIXED + i * _DS64_ENTRY
        table.setdefault(ds64[at:at + 4], int.from_bytes(ds64[at + 4:at + 12], "little"))
    return table


def read_w64(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    chunks = _list_w64_chunks(f, start)
    if chunks is None:
        return None
    # W64's fact holds a 64-bit frame count (ffmpeg writes 8 bytes).
    frames = int.from_bytes(riff_chunk_head(f, chunks, b"fact", 8), "little")
    return wave_info(f, WaveLayout.of(f, chunks, frames), "audio/x-w64")


def _list_w64_chunks(f: IO[bytes], start: int) -> dict[bytes, tuple[int, int]] | None:
    """The WAVE chunks of a W64 file by their RIFF ids, each id's first:
    (offset of its body, size of its body). Chunks of other GUIDs are
    passed over. None, as `list_chunks` for RIFF, past MAX_CHUNKS chunks,
    for a 'fmt ' over MAX_WAVE_FORMAT bytes, or for a size smaller than
    the chunk's header (the next chunk would never be reached). The file
    starts at ``start`` (past any ID3v2 tag)."""
    pos, end, chunks = start + _W64_FIRST_CHUNK, file_size(f), {}
    for _ in range(MAX_CHUNKS):
        if pos + _W64_HEADER > end:
            return chunks
        f.seek(pos)
        header = f.read(_W64_HEADER)
        guid, size = header[:16], int.from_bytes(header[16:24], "little")
        if size < _W64_HEADER:
            return None
        body = size - _W64_HEADER
        if guid[4:] == W64_GUID_TAIL:
            if guid[:4] == b"fmt " and body > MAX_WAVE_FORMAT:
                return None
            chunks.setdefault(guid[:4], (pos + _W64_HEADER, body))
        pos += size + (-size % 8)
    return chunks if pos + _W64_HEADER > end else None

"""Ogg: Vorbis, Opus and FLAC in Ogg, from the first packet and the file's tail.

The first packet names the codec; other Ogg codecs (Speex) are not read.
The stream facts come from mutagen without its comment packet (the tags)
being parsed, and the length from the stream's last page, looked for in the
file's last OGG_TAIL bytes only: a stream without an end-of-stream page (a
recording cut off) or muxed with another that runs on costs a bounded read,
not a walk through every page. A chained file's links are summed when that
read holds the whole file (see _chain_length).
"""

from __future__ import annotations

from io import BytesIO
from typing import IO, Any

from mutagen.ogg import error as OggError
from mutagen.oggflac import OggFLACStreamInfo
from mutagen.oggopus import OggOpusInfo
from mutagen.oggvorbis import OggVorbisInfo

from ..sniff import ogg_first_packet
from .info import AudioInfo, file_size, make_info


def read_ogg(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    # Other Ogg codecs (Speex) are not read. The check also keeps mutagen
    # from walking every page of a file in search of the header.
    packet = ogg_first_packet(head)
    f.seek(0)
    if packet.startswith(b"\x01vorbis"):
        stream = _ogg_stream(OggVorbisInfo, f)
        # The header's nominal rate, as ffprobe reports; libvorbis states
        # none at 96 kHz (the bitrate was null): then the file's.
        bitrate = None if stream.bitrate or not stream.length else \
            file_size(f) * 8 / stream.length
        return make_info(stream, "vorbis", "audio/ogg", bitrate=bitrate)
    if packet.startswith(b"\x7fFLAC"):
        stream = _ogg_stream(OggFLACStreamInfo, f)
        bitrate = file_size(f) * 8 / stream.length if stream.length else None
        return make_info(stream, "flac", "audio/ogg", bitrate=bitrate,
                         bits_per_sample=stream.bits_per_sample)
    return None


def read_opus(f: IO[bytes], start: int, head: bytes) -> AudioInfo:
    # Opus always decodes at 48 kHz (RFC 7845 section 5.1); the input rate
    # in its header is informational only, so mutagen does not report it.
    f.seek(0)
    stream = _ogg_stream(OggOpusInfo, f)
    # mutagen's Opus bitrate is the bytes it was given over the length:
    # only the tail _ogg_stream hands it, over the last link's length in a
    # chain. The whole file's, as for FLAC, or none when the length is
    # unknown.
    stream.bitrate = file_size(f) * 8 / stream.length if stream.length else 0
    return make_info(stream, "opus", "audio/opus", sample_rate=48_000)


def _ogg_stream(info_class: Any, f: IO[bytes]) -> Any:
    """An Ogg stream's facts as mutagen's OggVorbis/OggOpus load them, but
    without parsing the comment packet between the two steps: its tags
    (millions of empty comments, or one of 64 MB) would all be held in
    memory, ~35 times the bytes they take in the file."""
    stream = info_class(f)
    tail, whole = _ogg_tail(f)
    try:
        # The length, from the stream's last page, looked for in the
        # file's last OGG_TAIL bytes only.
        stream._post_tags(BytesIO(tail))
    except OggError:
        stream.length = 0  # no page of the stream there: duration unknown
    chained = _chain_length(tail, whole)
    if chained is not None:
        stream.length = chained
    return stream


# mutagen finds an Ogg stream's length on its last page; when the file's
# final page does not end the stream (a live recording cut off, several
# streams muxed) it walks every page from the start, a probe thread busy
# for as long as the file is big (and on after the probe's timeout).
OGG_TAIL = 256 << 10


def _ogg_tail(f: IO[bytes]) -> tuple[bytes, bool]:
    """The file's last OGG_TAIL bytes, from their first page on, and
    whether they are the whole file."""
    start = max(0, file_size(f) - OGG_TAIL)
    f.seek(start)
    data = f.read(OGG_TAIL)
    if start:
        first = data.find(b"OggS")
        data = data[first:] if first >= 0 else b""
    return data, not start


# --- chained files ------------------------------------------------------------
#
# A chained Ogg file is several files one after another (RFC 3533 section
# 4): internet radio dumps start a link at each track. Each link opens with
# its own beginning-of-stream pages and header packets, and its granule
# positions start again from 0, so the last page of the file times the
# last link only, and mutagen's reading of it the first link, or nothing
# (the links' serial numbers differ). The whole length is the sum of the
# links' lengths, which takes every link's last page: in a file larger
# than the tail read, pages the probe does not read. Such a file's length
# is unknown; one read whole is summed.

_BOS = 0x02    # a page's header flag: beginning of stream


def _chain_length(data: bytes, whole: bool) -> float | None:
    """None if ``data`` (the file's tail, or all of it if ``whole``) shows
    no chain: no link starts in it after its first. Else the sum of the
    links' lengths, if ``whole`` and each link's audio stream is timed;
    else 0, unknown."""
    links = _links(data)
    if len(links) < (2 if whole else 1):
        # A tail's first link began before it: the file's first page is
        # the only beginning-of-stream page outside a chain.
        return None
    if not whole:
        return 0.0
    total = 0.0
    for header, last_granule in links:
        length = _link_length(header, last_granule)
        if length is None:
            return 0.0
        total += length
    return total


def _links(data: bytes) -> list[tuple[bytes, int]]:
    """The links that start in ``data``: (the first page's body of their
    first stream, which opens with its identification header; that
    stream's last granule position, -1 if none), read page by page from
    ``data``'s first, up to the first page that is not whole. A link opens
    with a run of beginning-of-stream pages (RFC 3533 section 4)."""
    links: list[list[Any]] = []
    pos, after_bos = 0, False
    while pos + 27 <= len(data) and data[pos:pos + 4] == b"OggS" and data[pos + 4] == 0:
        flags = data[pos + 5]
        granule = int.from_bytes(data[pos + 6:pos + 14], "little", signed=True)
        serial = data[pos + 14:pos + 18]
        segments = data[pos + 27:pos + 27 + data[pos + 26]]
        body = pos + 27 + len(segments)
        end = body + sum(segments)
        if len(segments) < data[pos + 26] or end > len(data):
            break
        if flags & _BOS and not after_bos:
            links.append([data[body:end], -1, serial])
        elif links and serial == links[-1][2] and granule >= 0:
            links[-1][1] = granule
        after_bos = bool(flags & _BOS)
        pos = end
    return [(header, granule) for header, granule, _ in links]


def _link_length(header: bytes, last_granule: int) -> float | None:
    """Seconds of a link whose first stream's identification header is
    ``header`` and whose last granule position is ``last_granule``; None
    for another codec, or a stream that states no rate or has no page
    with a granule position."""
    if last_granule < 0:
        return None
    if header.startswith(b"OpusHead") and len(header) >= 12:
        # Granules count 48 kHz samples from before the pre-skip (RFC 7845).
        pre_skip = int.from_bytes(header[10:12], "little")
        return max(0, last_granule - pre_skip) / 48_000
    rate = 0
    if header.startswith(b"\x01vorbis") and len(header) >= 16:
        rate = int.from_bytes(header[12:16], "little")
    elif header.startswith(b"\x7fFLAC") and len(header) >= 30:
        # The mapping's 9-byte header, "fLaC", a block header, STREAMINFO:
        # its sample rate is 20 bits from its 11th byte.
        rate = int.from_bytes(header[27:30], "big") >> 4
    return last_granule / rate if rate else None

"""Ogg: Vorbis, Opus and FLAC in Ogg, from the first packet and the file's tail.

The first packet names the codec; other Ogg codecs (Speex) are not read.
The stream facts come from mutagen without its comment packet (the tags)
being parsed, and the length from the stream's last page, looked for in the
file's last OGG_TAIL bytes only: a stream without an end-of-stream page (a
recording cut off) or muxed with another that runs on costs a bounded read,
not a walk through every page.
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
    # only the tail _ogg_stream hands it. The whole file's, as for FLAC.
    bitrate = file_size(f) * 8 / stream.length if stream.length else None
    return make_info(stream, "opus", "audio/opus", sample_rate=48_000, bitrate=bitrate)


def _ogg_stream(info_class: Any, f: IO[bytes]) -> Any:
    """An Ogg stream's facts as mutagen's OggVorbis/OggOpus load them, but
    without parsing the comment packet between the two steps: its tags
    (millions of empty comments, or one of 64 MB) would all be held in
    memory, ~35 times the bytes they take in the file."""
    stream = info_class(f)
    try:
        # The length, from the stream's last page, looked for in the
        # file's last OGG_TAIL bytes only.
        stream._post_tags(_ogg_tail(f))
    except OggError:
        stream.length = 0  # no page of the stream there: duration unknown
    return stream


# mutagen finds an Ogg stream's length on its last page; when the file's
# final page does not end the stream (a live recording cut off, several
# streams muxed) it walks every page from the start, a probe thread busy
# for as long as the file is big (and on after the probe's timeout).
OGG_TAIL = 256 << 10


def _ogg_tail(f: IO[bytes]) -> BytesIO:
    """The file's last OGG_TAIL bytes, from their first page on."""
    start = max(0, file_size(f) - OGG_TAIL)
    f.seek(start)
    data = f.read(OGG_TAIL)
    if start:
        first = data.find(b"OggS")
        data = data[first:] if first >= 0 else b""
    return BytesIO(data)

"""Audio formats recognised by their leading bytes (magic numbers).

Pure functions over bytes already in memory: no I/O, nothing to await.
`blobd.audio` re-exports `sniff_mime` and `AUDIO_MIME_TYPES`; the frame
header helpers here are shared with its MP3 and AC-3 readers
(`blobd.audio.mp3`, `blobd.audio.ac3`).
`could_be_audio` is the probe's own acceptance test run backwards: bytes it
refuses would never probe as audio, so a body held in memory that fails it
skips the probe.
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: The audio Content-Types blobd recognises, one canonical name per format,
#: spelled as `sniff_mime` and `blobd.audio.probe` report them.
AUDIO_MIME_TYPES: frozenset[str] = frozenset({
    "audio/mpeg", "audio/mp4", "audio/aac", "audio/ogg",
    "audio/opus", "audio/flac", "audio/wav", "audio/webm", "audio/matroska",
    "audio/aiff", "audio/3gpp", "audio/3gpp2", "audio/x-w64",
    "audio/ac3", "audio/eac3",
})

#: How many leading bytes `sniff_mime` needs to decide.
SNIFF_BYTES = 64

#: With no magic at the start, an MP3 is still accepted when its first frame
#: sits within this many bytes: zero padding or a damaged tag before the
#: audio. A sync found deeper is more likely MP3 data inside another file.
MAX_MP3_JUNK = 8 * 1024
#: mutagen accepts an MP3 after four chained frames (or one with a VBR
#: header), a test that runs of bytes in executables and data files pass now
#: and then; a real stream goes on much longer.
MP3_CHAIN_FRAMES = 8
MP3_SHORT_CHAIN_FRAMES = 3  # a whole file's, ending it exactly (see mpeg_chain_at)

# ftyp major brands of MP4 files that hold audio, or that ffmpeg and other
# muxers write for audio-only MP4. Video-only (M4V, qt), image (heic, avif)
# and 3GPP brands are deliberately absent.
_MP4_AUDIO_BRANDS = frozenset({b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "})
# Major brands by their first three bytes: 3gp4 ... 3gp9, 3ge6, 3gg6 and
# 3g2a ... 3g2c.
_3GPP_BRANDS = {b"3gp": "audio/3gpp", b"3ge": "audio/3gpp", b"3gg": "audio/3gpp",
                b"3g2": "audio/3gpp2"}
_MP4_GENERIC_BRANDS = frozenset({
    b"isom", b"iso2", b"iso3", b"iso4", b"iso5", b"iso6",
    b"mp41", b"mp42", b"dash",
})


def sniff_mime(head: bytes) -> str | None:
    """The audio MIME type that the leading bytes of a file announce, or None.

    Pass at least SNIFF_BYTES bytes (fewer only for a shorter file). Only
    magic numbers are checked: fast, no I/O, and no proof that the rest of
    the file is valid (that is `blobd.audio.probe`'s job). Behind ID3v2
    tags that end within ``head``, the format that follows is reported if
    blobd reads it there (see _BEHIND_ID3); otherwise an ID3v2 tag says
    audio/mpeg, the format it usually fronts.
    """
    if starts_with_id3v2(head):
        return _sniff_behind_id3(head)
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"OggS\x00"):
        return _sniff_ogg(head)
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if is_rf64_header(head):
        return "audio/wav"
    if head[:16] == W64_RIFF_GUID and head[24:40] == W64_WAVE_GUID:
        return "audio/x-w64"
    if head[4:8] == b"ftyp":
        return _sniff_ftyp(head)
    if head.startswith(_EBML_MAGIC):
        return _sniff_ebml(head)
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "audio/aiff"
    if head.startswith(b"ADIF") or is_adts_header(head):
        return "audio/aac"
    if mpeg_frame_length(head) is not None:
        return "audio/mpeg"
    return _sniff_ac3(head)


# RF64 (EBU Tech 3306) and BW64 (ITU-R BS.2088) are RIFF WAVE with 64-bit
# sizes: the RIFF size says FFFFFFFF and a 'ds64' chunk holds the real
# ones; every other chunk, and the 'fmt ' in it, is WAVE's own. So they are
# audio/wav, as libmagic (file 5.44 says audio/x-wav of an RF64) and ffmpeg
# (one wav muxer and demuxer, "-rf64 always") name them. Browsers' own
# sniffing (WHATWG mimesniff) knows only RIFF....WAVE, so the type served
# is what they go by.
_RF64_MAGICS = (b"RF64", b"BW64")

# Sony Wave64 is another container: 16-byte GUIDs for chunk ids, 64-bit
# sizes, 8-byte alignment; no WAV reader opens it. Serving it as audio/wav
# would send a browser bytes its WAV demuxer refuses, so it gets a type of
# its own: audio/x-w64, the name libmagic (file 5.44) and GStreamer's
# libsndfile plugin give it. No type is registered for it (ffmpeg's w64
# muxer states none).
W64_RIFF_GUID = b"riff\x2e\x91\xcf\x11\xa5\xd6\x28\xdb\x04\xc1\x00\x00"
#: Every WAVE chunk's GUID in W64 is its RIFF id followed by these 12 bytes
#: ('wave' itself, 'fmt ', 'fact', 'data').
W64_GUID_TAIL = b"\xf3\xac\xd3\x11\x8c\xd1\x00\xc0\x4f\x8e\xdb\x8a"
W64_WAVE_GUID = b"wave" + W64_GUID_TAIL


def is_rf64_header(head: bytes) -> bool:
    """Whether ``head`` opens an RF64 or BW64 file: the magic, a RIFF size
    of FFFFFFFF (the real one is in 'ds64'), then WAVE."""
    return (head[:4] in _RF64_MAGICS and head[4:8] == b"\xff\xff\xff\xff"
            and head[8:12] == b"WAVE")


def ogg_first_packet(head: bytes) -> bytes:
    """The start of the first packet of an Ogg file (RFC 3533 section 6):
    it follows the first page's 27-byte header and its segment table, and
    names the codec of the stream. Empty if `head` is too short."""
    if len(head) < 27:
        return b""
    return head[27 + head[26]:]


def _sniff_ogg(head: bytes) -> str | None:
    packet = ogg_first_packet(head)
    if packet.startswith(b"OpusHead"):
        return "audio/opus"
    if packet.startswith(b"\x80theora"):
        return None
    return "audio/ogg"


# RFC 8794 section 8: an EBML document opens with the EBML header element,
# whose DocType child names the format (ffmpeg and browsers write it within
# the first 40 bytes); RFC 8794 section 11.2.6 makes "matroska" the default.
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_EBML_DOCTYPE = 0x4282
#: The EBML DocTypes of audio blobd reads, and the type each one names.
EBML_DOCTYPES = {b"webm": "audio/webm", b"matroska": "audio/matroska"}


def _sniff_ebml(head: bytes) -> str | None:
    """The type an EBML header's DocType names; Matroska when the head
    ends before the DocType, None for another DocType."""
    pos, end = 4, len(head)
    try:
        size, width = _ebml_vint(head, pos)
        pos, end = pos + width, min(end, pos + width + size)
        while pos < end:
            id_width = 9 - head[pos].bit_length()
            size, width = _ebml_vint(head, pos + id_width)
            body = pos + id_width + width
            if int.from_bytes(head[pos:pos + id_width], "big") == _EBML_DOCTYPE:
                if body + size > len(head):
                    break
                return EBML_DOCTYPES.get(head[body:body + size].rstrip(b"\0"))
            pos = body + size
    except (IndexError, ValueError):
        pass
    return "audio/matroska"


def _ebml_vint(head: bytes, pos: int) -> tuple[int, int]:
    """(value, width) of the EBML variable-size integer at ``pos``."""
    if not head[pos]:
        raise ValueError("VINT wider than 8 bytes")
    width = 9 - head[pos].bit_length()
    if pos + width > len(head):
        raise IndexError("VINT cut off")
    return int.from_bytes(head[pos:pos + width], "big") & ((1 << (7 * width)) - 1), width


def _sniff_ftyp(head: bytes) -> str | None:
    if head[8:11] in _3GPP_BRANDS:
        return mp4_family(head)
    if head[8:12] in _MP4_GENERIC_BRANDS or mp4_brands_say_audio(head):
        return "audio/mp4"
    return None


def mp4_family(head: bytes) -> str:
    """The type of a file of the MP4 family by its ftyp's major brand:
    3GPP's own (TS 26.244), which phones record voice memos and MMS audio
    into, are named as their IANA registrations (RFC 3839, RFC 4393) and
    browsers name them; every other brand is MP4."""
    return _3GPP_BRANDS.get(head[8:11], "audio/mp4")


def mp4_brands_say_audio(head: bytes) -> bool:
    """Whether an MP4's ftyp box names an audio brand, as its major brand
    or a compatible one (those follow the minor version, to the end of the
    box). A generic brand (isom, mp42) holds video as well as audio."""
    if head[4:8] != b"ftyp":
        return False
    if head[8:12] in _MP4_AUDIO_BRANDS:
        return True
    box_end = min(int.from_bytes(head[:4], "big"), len(head))
    compatible = {head[i:i + 4] for i in range(16, box_end - 3, 4)}
    return bool(compatible & _MP4_AUDIO_BRANDS)


def starts_with_id3v2(head: bytes) -> bool:
    """Whether ``head`` starts with what it holds of an ID3v2 header
    (id3.org, ID3v2.4 structure, section 3.1): "ID3", a major version of 2
    to 4, a revision below FF, flags with their low nibble clear, and four
    size bytes of 7 bits. Text can begin with the word "ID3" ("ID3 tags
    ..."), and was served as audio/mpeg for it."""
    # Each test looks only at bytes ``head`` has: a file of a few bytes
    # is judged by them.
    padded = head[:10].ljust(10, b"\x00")
    version, revision, flags = padded[3] if len(head) > 3 else 3, padded[4], padded[5]
    return (head.startswith(b"ID3") and 2 <= version <= 4 and revision != 0xFF
            and not flags & 0x0F and all(b < 0x80 for b in padded[6:10]))


# The formats some taggers put an ID3v2 tag in front of, and that the
# probe reads behind one (ffprobe does too). Ogg, MP4 and Matroska are not
# among them: their readers expect their magic at the start.
_BEHIND_ID3 = frozenset({"audio/flac", "audio/wav", "audio/aiff", "audio/x-w64",
                         "audio/aac", "audio/mpeg", "audio/ac3", "audio/eac3"})
#: A bound on the ID3v2 tags stacked at the start that the sniff and the
#: probe look past: real files have one or two; this is far above that and
#: far below what costs real time.
MAX_ID3_TAGS = 8


def _sniff_behind_id3(head: bytes) -> str:
    pos = 0
    for _ in range(MAX_ID3_TAGS):
        size = id3v2_size(head[pos:pos + 10])
        if size is None:
            break
        pos += size
    # pos 0: a header cut off within ``head``, nothing to look behind.
    return sniff_behind_id3(head[pos:] if pos else b"")


def sniff_behind_id3(after: bytes) -> str:
    """The type of a file that opens with ID3v2 tags, by ``after``, the
    SNIFF_BYTES that follow them: the format there if blobd reads it
    behind a tag, else audio/mpeg."""
    found = sniff_mime(after)
    return found if found in _BEHIND_ID3 else "audio/mpeg"


def id3v2_size(head: bytes) -> int | None:
    """Bytes taken by the ID3v2 tag whose 10-byte header starts ``head``
    (header, body and footer), or None if none starts it."""
    if len(head) < 10 or not starts_with_id3v2(head):
        return None
    size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
    return 10 + size + (10 if head[5] & 0x10 else 0)


def is_adts_header(head: bytes) -> bool:
    """Whether `head` starts with an ADTS AAC frame header (ISO/IEC 13818-7):
    12-bit sync, layer 00, a defined sampling rate index and a frame length
    that at least covers the header itself."""
    if len(head) < 7 or head[0] != 0xFF or head[1] & 0xF6 != 0xF0:
        return False
    if (head[2] >> 2) & 0x0F > 12:
        return False
    frame_length = ((head[3] & 0x03) << 11) | (head[4] << 3) | (head[5] >> 5)
    return frame_length >= 7


# MPEG audio frame header tables (ISO/IEC 11172-3 and 13818-3), in kb/s and
# Hz. Version bits: 3 = MPEG-1, 2 = MPEG-2, 0 = MPEG-2.5 (1 is reserved).
# Layer bits: 3 = Layer I, 2 = Layer II, 1 = Layer III (0 is reserved).
_MPEG_BITRATES = {
    (3, 3): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (3, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (3, 1): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (2, 3): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (2, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000),
                      0: (11025, 12000, 8000)}

#: The longest MPEG audio frame: MPEG-2.5 Layer II at 160 kb/s, 8 kHz, padded.
MAX_MPEG_FRAME = 2881


def mpeg_frame_length(head: bytes) -> int | None:
    """Byte length of the MPEG audio frame whose header starts `head`, or
    None if it is not a valid header: 11-bit sync, then no reserved value in
    version, layer, bitrate index (free format is refused too), sampling
    rate index or emphasis."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return None
    version, layer = (head[1] >> 3) & 0x03, (head[1] >> 1) & 0x03
    bitrate_index, rate_index = head[2] >> 4, (head[2] >> 2) & 0x03
    if (version == 1 or layer == 0 or bitrate_index in (0, 15)
            or rate_index == 3 or head[3] & 0x03 == 2):
        return None
    # MPEG-2 and 2.5 share one table for Layers II and III.
    table = (3, layer) if version == 3 else (2, 3 if layer == 3 else 2)
    bitrate = _MPEG_BITRATES[table][bitrate_index - 1] * 1000
    sample_rate = _MPEG_SAMPLE_RATES[version][rate_index]
    padding = (head[2] >> 1) & 0x01
    if layer == 3:
        return (12 * bitrate // sample_rate + padding) * 4
    per_frame = 72 if layer == 1 and version != 3 else 144
    return per_frame * bitrate // sample_rate + padding


def mpeg_frame_samples(head: bytes) -> int:
    """Samples per channel in the frame whose valid header starts `head`."""
    version, layer = (head[1] >> 3) & 0x03, (head[1] >> 1) & 0x03
    if layer == 3:
        return 384
    return 576 if layer == 1 and version != 3 else 1152


def same_mpeg_stream(a: bytes, b: bytes) -> bool:
    """Whether two frame headers agree on version, layer and sample rate,
    as consecutive frames of one stream must."""
    return a[1] & 0xFE == b[1] & 0xFE and a[2] & 0x0C == b[2] & 0x0C


def mpeg_chain_at(data: bytes, offset: int, *, at_end: bool = False) -> bool:
    """Whether MP3_CHAIN_FRAMES frames of one stream follow each other in
    ``data`` from ``offset``, each header where the previous frame's length
    says. With ``at_end`` (``data`` runs to the end of the file) a shorter
    chain counts too if it ends the file exactly, but for an ID3v1 tag: a
    clip of a tenth of a second is a few frames, and noise does not land
    on the last byte."""
    first, pos = data[offset:offset + 4], offset
    for count in range(MP3_CHAIN_FRAMES):
        if at_end and count >= MP3_SHORT_CHAIN_FRAMES and (
                pos == len(data) or (pos == len(data) - 128 and data[pos:pos + 3] == b"TAG")):
            return True
        header = data[pos:pos + 4]
        length = mpeg_frame_length(header)
        if length is None or not same_mpeg_stream(first, header):
            return False
        pos += length
    return True


def could_be_audio(data: bytes) -> bool:
    """False only for a whole file (all of it in ``data``) that
    `blobd.audio.probe` cannot take for audio: no ID3 tag, no magic
    `sniff_mime` knows, and no chain of MPEG frames starting within
    MAX_MP3_JUNK bytes (where the probe's MP3 reader would have to find
    one); or an AC-3 header that starts no chain of frames. Costs a few
    microseconds where the probe, hunting frame syncs through noise,
    costs milliseconds."""
    sniffed = sniff_mime(data[:SNIFF_BYTES])
    if sniffed in _AC3_TYPES:
        # The probe's AC-3 reader takes nothing but this chain.
        return ac3_chain_at(data, 0, at_end=True)
    if sniffed is not None:
        return True
    return find_mpeg_chain(data, 0, MAX_MP3_JUNK, at_end=True) is not None


def find_mpeg_chain(data: bytes, first: int, last: int, *,
                    at_end: bool = False) -> int | None:
    """The first offset from ``first`` to ``last`` (inclusive) where
    `mpeg_chain_at` holds, or None."""
    # Only a frame sync (eleven set bits) can start a chain: let the regex
    # engine skip the rest of the bytes.
    for match in _FRAME_SYNC.finditer(data, first, last + 2):
        if mpeg_chain_at(data, match.start(), at_end=at_end):
            return match.start()
    return None


# A lookahead, so that in FF FF E0 the second FF is a candidate too.
_FRAME_SYNC = re.compile(rb"\xff(?=[\xe0-\xff])")


# AC-3 (Dolby Digital, ATSC A/52) and E-AC-3 (Dolby Digital Plus, A/52
# Annex E): bare runs of frames, each opening with the syncword 0B 77 and a
# header stating its size and sample rate. The 5-bit bsid tells them apart:
# up to 8 is AC-3 (lower values are subsets older decoders read), 11 to 16
# E-AC-3. 9 and 10 (half and quarter rate AC-3, which ffmpeg and liba52
# decode) are in neither standard: refused, as every other value.
_AC3_SAMPLE_RATES = (48000, 44100, 32000)
#: AC-3 bitrates in kb/s, by frmsizecod // 2 (A/52 table 5.18).
_AC3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
                320, 384, 448, 512, 576, 640)
# Full-bandwidth channels by acmod; dual mono (1+1) is two.
_AC3_CHANNELS = (2, 1, 2, 3, 3, 4, 4, 5)
_EAC3_BLOCKS = (1, 2, 3, 6)
#: Samples per channel in an audio block; AC-3 frames hold six.
_AC3_BLOCK_SAMPLES = 256
#: The longest frame: E-AC-3's 11-bit size in 16-bit words (AC-3's is
#: 3840 bytes, 640 kb/s at 32 kHz).
MAX_AC3_FRAME = 4096
#: Bytes of a frame's header that `ac3_frame` reads.
AC3_HEADER_BYTES = 8
#: Frames chained one after another, each where the last one's size says,
#: before bytes are taken for an AC-3 stream: the syncword is 16 bits and
#: the checked fields a few more, so a single header turns up in a few
#: megabytes of noise; a real stream goes on (a 0.1 s clip is 3 frames).
AC3_CHAIN_FRAMES = 4
_AC3_TYPES = frozenset({"audio/ac3", "audio/eac3"})


class Ac3Frame(NamedTuple):
    """What the header of one AC-3 or E-AC-3 frame states."""

    mime: str           # audio/ac3 or audio/eac3
    size: int           # bytes, header included
    sample_rate: int
    samples: int        # per channel
    channels: int       # LFE included: 5.1 is 6
    bitrate: int        # bits per second, from the size and the samples
    # E-AC-3 sends a program's extra channels (7.1's back pair) in
    # dependent substreams, and other programs in independent substreams
    # 1 to 7; a program opens with independent substream 0, as AC-3's
    # every frame does.
    opens_program: bool


def _bits(head: bytes, first: int, count: int) -> int:
    """``count`` bits of ``head`` from bit ``first`` (0 is the top bit of
    its first byte), as an unsigned integer; ``head`` must hold them."""
    last_byte = (first + count + 7) // 8
    value = int.from_bytes(head[first // 8:last_byte], "big")
    return (value >> (last_byte * 8 - first - count)) & ((1 << count) - 1)


def ac3_frame(head: bytes) -> Ac3Frame | None:
    """The frame whose header starts ``head`` (AC3_HEADER_BYTES at least),
    or None if no AC-3 or E-AC-3 header does: the syncword, a bsid of
    either, and no reserved sample rate code, frame size code or stream
    type. Bit positions: A/52 section 5.4.1 and Annex E section 2.3.1."""
    if len(head) < AC3_HEADER_BYTES or head[:2] != b"\x0b\x77":
        return None
    bsid = _bits(head, 40, 5)
    if bsid <= 8:
        return _ac3_frame(head)
    if 11 <= bsid <= 16:
        return _eac3_frame(head)
    return None


def _ac3_frame(head: bytes) -> Ac3Frame | None:
    fscod, frmsizecod = _bits(head, 32, 2), _bits(head, 34, 6)
    if fscod == 3 or frmsizecod >= 2 * len(_AC3_BITRATES):
        return None
    rate, kbps = _AC3_SAMPLE_RATES[fscod], _AC3_BITRATES[frmsizecod >> 1]
    # Frames last 1536 samples; at 44.1 kHz that is no whole number of
    # 16-bit words, and the low bit of frmsizecod adds the word that keeps
    # the average (A/52 table 5.18).
    words = kbps * 96_000 // rate + (frmsizecod & 1 if rate == 44100 else 0)
    acmod, pos = _bits(head, 48, 3), 51
    # Mix levels, each present for some channel modes, come before lfeon.
    pos += 2 * ((acmod & 1 and acmod != 1) + bool(acmod & 4) + (acmod == 2))
    channels = _AC3_CHANNELS[acmod] + _bits(head, pos, 1)
    return Ac3Frame("audio/ac3", 2 * words, rate, 6 * _AC3_BLOCK_SAMPLES, channels,
                    kbps * 1000, True)


def _eac3_frame(head: bytes) -> Ac3Frame | None:
    strmtyp, substreamid = _bits(head, 16, 2), _bits(head, 18, 3)
    size = (_bits(head, 21, 11) + 1) * 2
    fscod, code = _bits(head, 32, 2), _bits(head, 34, 2)
    if strmtyp == 3 or size < AC3_HEADER_BYTES:
        return None
    if fscod == 3:
        # Half rates; their frames always hold six blocks.
        if code == 3:
            return None
        rate, blocks = _AC3_SAMPLE_RATES[code] // 2, 6
    else:
        rate, blocks = _AC3_SAMPLE_RATES[fscod], _EAC3_BLOCKS[code]
    samples = blocks * _AC3_BLOCK_SAMPLES
    channels = _AC3_CHANNELS[_bits(head, 36, 3)] + _bits(head, 39, 1)
    return Ac3Frame("audio/eac3", size, rate, samples, channels,
                    size * 8 * rate // samples, strmtyp != 1 and substreamid == 0)


def ac3_chain_at(data: bytes, offset: int, *, at_end: bool = False) -> bool:
    """Whether AC3_CHAIN_FRAMES frames of one stream follow each other in
    ``data`` from ``offset``, the first opening a program, each where the
    previous one's size says. With ``at_end`` (``data`` runs to the end of
    the file) fewer count if they end the file exactly: a clip of a tenth
    of a second is three frames, and noise does not land on the last
    byte."""
    first = ac3_frame(data[offset:offset + AC3_HEADER_BYTES])
    if first is None or not first.opens_program:
        return False
    pos = offset
    for _ in range(AC3_CHAIN_FRAMES):
        frame = ac3_frame(data[pos:pos + AC3_HEADER_BYTES])
        if frame is None or (frame.mime, frame.sample_rate) != (first.mime, first.sample_rate):
            return False
        pos += frame.size
        if at_end and pos == len(data):
            return True
    return True


def _sniff_ac3(head: bytes) -> str | None:
    """audio/ac3 or audio/eac3 if ``head`` starts a stream of either. A
    head that holds the second frame's header must show it where the
    first frame ends (the SNIFF_BYTES of an upload never do: the shortest
    frame is 128 bytes)."""
    first = ac3_frame(head)
    if first is None or not first.opens_program:
        return None
    if len(head) >= first.size + AC3_HEADER_BYTES:
        second = ac3_frame(head[first.size:first.size + AC3_HEADER_BYTES])
        if second is None or (second.mime, second.sample_rate) != (first.mime,
                                                                    first.sample_rate):
            return None
    return first.mime

"""MP4/M4A (ISO/IEC 14496-12): the first sound track's facts, box by box.

mutagen builds an object per box and reads some boxes whole into memory,
so the box tree is walked first, headers only, and refused when it holds
implausibly many boxes or a box larger than a real one gets. Only then
does mutagen's MP4Info read the stream facts (never the tags), and these
are corrected where real files mislead it: the channel count ffmpeg writes
for mono AAC and MP3, E-AC-3's (from its 'dec3' box), the length an edit
list presents, the bitrate of ALAC and of codecs without an esds, QuickTime's
PCM sample entries (named as PCM, a version 2 entry's own fields), and
whether a video track comes with the sound. Only a lossless or PCM codec's
sample size is reported as a bit depth.
"""

from __future__ import annotations

import struct
from typing import IO, Any

from mutagen.mp4 import Atoms, MP4Info

from ..sniff import mp4_family, mpeg_frame_length
from .flac import streaminfo_bit_depth
from .info import AudioInfo, bit_depth, file_size, make_info

# A bound on container structure: real files have a few hundred boxes;
# this is far above that and far below what costs real time or memory.
_MAX_MP4_BOXES = 50_000
_MP4_CONTAINERS = frozenset({   # the boxes mutagen descends into
    b"moov", b"udta", b"trak", b"mdia", b"meta", b"ilst",
    b"stbl", b"minf", b"moof", b"traf",
})
# The boxes MP4Info reads whole into memory, and how large a real one gets
# (a 'stsd' holds a sample entry or two with their codec configuration;
# 'hdlr' a name string; 'mdhd', 'mvhd' and 'tkhd' are a few dozen bytes).
_MP4_READ_WHOLE = {b"stsd": 1 << 20, b"hdlr": 64 << 10, b"mdhd": 4 << 10,
                   b"mvhd": 4 << 10, b"tkhd": 64 << 10}


def _mp4_codec(name: str) -> str:
    name = name.lower()
    if name.startswith("mp4a.40."):
        return "aac"
    return {"mp4a.69": "mp3", "mp4a.6b": "mp3", "ac-3": "ac3",
            "ec-3": "eac3", "samr": "amr_nb", "sawb": "amr_wb"}.get(name, name or "unknown")


def read_mp4(f: IO[bytes], start: int, head: bytes) -> AudioInfo | None:
    if not _mp4_boxes_bounded(f):
        return None
    f.seek(0)
    # The stream facts only: MP4(f) would also load every tag, cover art
    # and all, into memory (a 64 MB 'covr' cost ~190 MB).
    stream, atoms = MP4Info(), Atoms(f)
    stream.load(atoms, f)
    codec = _mp4_codec(stream.codec)
    mime = mp4_family(head)
    if codec == "aac" and stream.channels == 2 and _aac_mono(atoms, f):
        # ffmpeg writes a channel count of 2 in every AAC sample entry; the
        # AAC configuration says mono, and mutagen believes it only when it
        # also rules out parametric stereo, which no mono-configured LC or
        # HE-AAC stream uses (HE-AAC v2 says so with object type 29).
        stream.channels = 1
    if codec in ("amr_nb", "amr_wb"):
        # AMR is mono by definition; its sample entry's channel count is a
        # reserved field that TS 26.244 fixes at 2.
        stream.channels = 1
    if codec == "mp3" and stream.channels == 2 and _mp4_first_mpeg_frame_mono(atoms, f):
        # The same sample entry as AAC's; here the frames say mono.
        stream.channels = 1
    if codec == "eac3":
        # The sample entry's channel count is 2 whatever the stream
        # (ISO/IEC 14496-12 fixes it for every codec that does not use
        # it); mutagen reads AC-3's 'dac3', not E-AC-3's 'dec3'.
        _apply_dec3(_config_box(_sound_stsd(atoms, f), b"dec3"), stream)
    with_video = _mp4_has_video(atoms, f)
    bits = _mp4_bit_depth(codec, stream, atoms, f)
    pcm = _qt_pcm(_sound_stsd(atoms, f)) if stream.codec in _QT_PCM else None
    if pcm is not None:
        codec, stream.channels, stream.sample_rate, bits = pcm
        # What the samples take, as WAV and AIFF state PCM's (and ffprobe):
        # the file's rate would count the boxes too.
        stream.bitrate = stream.channels * stream.sample_rate * (bits or 0)
    presented = _mp4_presented_length(atoms, f)
    if 0 < presented < stream.length:
        # An empty edit (a delay) or a repeat would make it longer: those
        # are not what a listener of the samples hears, so only a cut counts.
        stream.length = presented
    if stream.length and (codec == "alac" or (
            not stream.bitrate and len(list(atoms[b"moov"].findall(b"trak"))) == 1)):
        # mutagen reports ALAC's uncompressed rate (what the header holds),
        # and none where no esds states one (FLAC and Opus in MP4). The
        # file's rate, if the sound is all it holds.
        return make_info(stream, codec, mime, with_video=with_video,
                         bitrate=file_size(f) * 8 / stream.length, bits_per_sample=bits)
    return make_info(stream, codec, mime, with_video=with_video, bits_per_sample=bits)


def without_sound(f: IO[bytes]) -> bool:
    """Whether the file's moov is read and lists tracks, none of them
    sound (a film with no sound); False when it cannot be read."""
    if not _mp4_boxes_bounded(f):
        return False
    f.seek(0)
    atoms = Atoms(f)
    try:
        traks = list(atoms[b"moov"].findall(b"trak"))
    except KeyError:
        return False
    return bool(traks) and _mp4_sound_trak(atoms, f) is None


def _mp4_bit_depth(codec: str, stream: Any, atoms: Any, f: IO[bytes]) -> int | None:
    """The bit depth of a lossless track: ALAC's, which mutagen reads from
    its magic cookie; FLAC's from the STREAMINFO in its 'dfLa' box, else
    the sample entry's sample size (which the FLAC-in-MP4 mapping makes
    the same). None for the rest: every sample entry has a sample size,
    16 for AAC and MP3 alike, which says nothing of them."""
    if codec == "alac":
        return stream.bits_per_sample
    if codec != "flac":
        return None
    stsd = _sound_stsd(atoms, f)
    at = stsd.find(b"dfLa")
    # Past the box's name, version and flags: the metadata blocks.
    from_streaminfo = streaminfo_bit_depth(stsd[at + 8:]) if at >= 0 else None
    return from_streaminfo or stream.bits_per_sample


# QuickTime's uncompressed sample entries (QuickTime File Format, "Sound
# sample descriptions"), which cameras write into MP4 files too (Sony's
# XAVC S: 'twos'): the codec each names, and its bit depth. 'twos' and
# 'sowt' (big- and little-endian) hold 8 or 16 bits, as the entry's sample
# size says; 'lpcm' (a version 2 entry) states its own format. mutagen
# reports the four-character code as the codec, and reads a version 2
# entry's placeholder fields (a sample rate of 1, 3 channels).
_QT_PCM: dict[str, tuple[str, int | None]] = {
    "twos": ("pcm", None), "sowt": ("pcm", None), "raw ": ("pcm", 8),
    "in24": ("pcm", 24), "in32": ("pcm", 32),
    "fl32": ("pcm_float", 32), "fl64": ("pcm_float", 64), "lpcm": ("pcm", None),
}
# formatSpecificFlags of an 'lpcm' entry: kAudioFormatFlagIsFloat.
_LPCM_FLOAT = 1


def _qt_pcm(stsd: bytes) -> tuple[str, int, float, int | None] | None:
    """(codec, channels, sample rate, bit depth) of the first sample entry
    in ``stsd`` if it is one of _QT_PCM, else None. The entry's fields
    (after its 8-byte header): 6 reserved bytes, data_reference_index,
    version (2 bytes each), revision, vendor, channels, sample size,
    compression id, packet size, the rate as 16.16 fixed point; version 2
    puts placeholders there and follows with sizeOfStructOnly, the rate
    as a 64-bit float, channels, 7F000000, bits per channel and format
    flags (QuickTime File Format, "Sound sample description (version 2)")."""
    entry = stsd[8:]                        # past version, flags and count
    size = int.from_bytes(entry[:4], "big")
    name = entry[4:8].decode("latin-1")
    body = entry[8:min(size, len(entry))]
    if name not in _QT_PCM or len(body) < 28:
        return None
    codec, bits = _QT_PCM[name]
    if int.from_bytes(body[8:10], "big") == 2:
        if len(body) < 56:
            return None
        rate, channels, bits, flags = struct.unpack(">dIxxxxII", body[32:56])
        codec = "pcm_float" if flags & _LPCM_FLOAT else "pcm"
        return codec, channels, rate, bit_depth(bits)
    channels, sample_size = struct.unpack(">HH", body[16:20])
    rate = int.from_bytes(body[24:28], "big") / 65536
    return codec, channels, rate, bits or bit_depth(sample_size)


def _sound_stsd(atoms: Any, f: IO[bytes]) -> bytes:
    """The first sound track's 'stsd' box (its sample entries), b"" if
    none is read. Its size is bounded by _mp4_boxes_bounded."""
    stbl = _mp4_sound_stbl(atoms, f)
    try:
        ok, stsd = stbl[(b"stsd",)].read(f) if stbl is not None else (False, b"")
    except KeyError:
        return b""
    return stsd if ok else b""


def _config_box(stsd: bytes, name: bytes) -> bytes:
    """The body of the first box ``name`` in the sample entries ``stsd``,
    cut at its declared size and at the end of ``stsd``; b"" if there is
    none, or its size is not a box's."""
    at = stsd.find(name)
    if at < 4:
        return b""
    size = int.from_bytes(stsd[at - 4:at], "big")
    return stsd[at + 4:at - 4 + size] if size >= 8 else b""


# Full-bandwidth channels by acmod (ATSC A/52 table 5.8), as in AC-3 frames.
_ACMOD_CHANNELS = (2, 1, 2, 3, 3, 4, 4, 5)


def _apply_dec3(dec3: bytes, stream: Any) -> None:
    """Channels and bitrate from an EC3SpecificBox (ETSI TS 102 366 F.6):
    data_rate (13 bits, kb/s) and num_ind_sub (3), then per independent
    substream fscod (2), bsid (5), a reserved bit, asvc (1), bsmod (3),
    acmod (3) and lfeon (1), ... The first independent substream is the
    programme's main one; the channels its dependent substreams add (7.1's
    back pair, in chan_loc) are left out, as the raw E-AC-3 reader (and
    ffmpeg's MP4 demuxer) count them. Nothing changes when the box is
    missing or too short."""
    if len(dec3) < 4:
        return
    fields = dec3[3]
    stream.channels = _ACMOD_CHANNELS[(fields >> 1) & 7] + (fields & 1)
    data_rate = int.from_bytes(dec3[0:2], "big") >> 3
    if data_rate:
        stream.bitrate = data_rate * 1000


def _aac_mono(atoms: Any, f: IO[bytes]) -> bool:
    try:
        return _aac_channel_configuration(atoms, f) == 1
    except Exception:  # noqa: BLE001 - a refinement: mutagen's figure stands
        return False


def _mp4_sound_trak(atoms: Any, f: IO[bytes]) -> Any | None:
    """The first sound track's box, or None."""
    return _mp4_trak(atoms, f, b"soun")


def _mp4_has_video(atoms: Any, f: IO[bytes]) -> bool:
    return _mp4_trak(atoms, f, b"vide") is not None


def _mp4_trak(atoms: Any, f: IO[bytes], handler: bytes) -> Any | None:
    """The first track of a handler type ('soun', 'vide'), or None."""
    try:
        for trak in atoms[b"moov"].findall(b"trak"):
            ok, hdlr = trak[b"mdia", b"hdlr"].read(f)
            if ok and hdlr[8:12] == handler:
                return trak
    except KeyError:
        pass
    return None


def _mp4_sound_stbl(atoms: Any, f: IO[bytes]) -> Any | None:
    """The sample table box of the first sound track, or None."""
    trak = _mp4_sound_trak(atoms, f)
    try:
        return trak[b"mdia", b"minf", b"stbl"] if trak is not None else None
    except KeyError:
        return None


def _mp4_presented_length(atoms: Any, f: IO[bytes]) -> float:
    """The sound track's duration as presented, in seconds: its tkhd's,
    the sum of its edits (ISO/IEC 14496-12 8.3.2, 8.6.5), in the mvhd's
    timescale; 0 if unknown. mutagen reports the mdhd's, all the samples,
    encoder priming and padding included, which an edit list cuts off
    (2.5 % at 8 kHz: 5.128 s for 5.0 s)."""
    try:
        trak = _mp4_sound_trak(atoms, f)
        if trak is None:
            return 0.0
        ok_m, mvhd = atoms[b"moov", b"mvhd"].read(f)
        ok_t, tkhd = trak[(b"tkhd",)].read(f)
    except KeyError:
        return 0.0
    if not (ok_m and ok_t and mvhd and tkhd):
        return 0.0
    timescale = int.from_bytes(mvhd[20:24] if mvhd[0] == 1 else mvhd[12:16], "big")
    duration = int.from_bytes(tkhd[28:36] if tkhd[0] == 1 else tkhd[20:24], "big")
    # All ones: "duration cannot be determined".
    if not timescale or duration in (0, 0xFFFFFFFF, (1 << 64) - 1):
        return 0.0
    return duration / timescale


def _mp4_first_mpeg_frame_mono(atoms: Any, f: IO[bytes]) -> bool:
    """Whether the first sample of the sound track, at the first chunk
    offset of its stco or co64 box (ISO/IEC 14496-12 8.7.5), is an MPEG
    audio frame in single-channel mode. Reads a few bytes of each box."""
    try:
        stbl = _mp4_sound_stbl(atoms, f)
        boxes = {child.name: child for child in stbl.children} if stbl is not None else {}
        for name, width in ((b"stco", 4), (b"co64", 8)):
            if name in boxes:
                f.seek(boxes[name]._dataoffset)
                table = f.read(8 + width)      # version, flags, count, entry
                if len(table) < 8 + width or not int.from_bytes(table[4:8], "big"):
                    return False
                f.seek(int.from_bytes(table[8:], "big"))
                frame = f.read(4)
                return mpeg_frame_length(frame) is not None and frame[3] >> 6 == 3
    except Exception:  # noqa: BLE001 - a refinement: mutagen's figure stands
        pass
    return False


def _aac_channel_configuration(atoms: Any, f: IO[bytes]) -> int | None:
    """channelConfiguration of the first sound track's AudioSpecificConfig
    (ISO/IEC 14496-3 1.6.2.1), read from the esds box in its sample entry
    (ISO/IEC 14496-1 7.2.6); None if absent, unreadable or object type 29."""
    stsd = _sound_stsd(atoms, f)
    at = stsd.find(b"esds")
    if at < 0:
        return None
    data, pos = stsd[at + 8:], 0            # past the name, version and flags
    for tag, fixed in ((3, 3), (4, 13), (5, 0)):
        if pos >= len(data) or data[pos] != tag:
            return None
        pos += 1
        for _ in range(4):                  # the length: 7 bits a byte
            pos += 1
            if pos > len(data) or not data[pos - 1] & 0x80:
                break
        if tag == 3 and pos + 2 < len(data):  # ES_Descriptor's optional fields
            flags = data[pos + 2]
            fixed += (2 if flags & 0x80 else 0) + (2 if flags & 0x20 else 0)
            if flags & 0x40 and pos + 3 < len(data):
                fixed += 1 + data[pos + 3]
        pos += fixed
    config = int.from_bytes(data[pos:pos + 6].ljust(6, b"\0"), "big")
    bits = 48
    def take(n: int) -> int:
        nonlocal bits
        bits -= n
        return (config >> bits) & ((1 << n) - 1)
    object_type = take(5)
    if object_type == 31:
        object_type = 32 + take(6)
    if take(4) == 15:                       # an explicit 24-bit sampling rate
        take(24)
    channels = take(4)
    return None if object_type == 29 or pos >= len(data) else channels


def _mp4_boxes_bounded(f: IO[bytes]) -> bool:
    """Whether the box tree mutagen would build (ISO/IEC 14496-12 section
    4.2) has at most _MAX_MP4_BOXES boxes, and no box it reads whole is
    larger than a real one gets (a 150 MB 'stsd' cost 300 MB of memory).
    Reads box headers only."""
    end = file_size(f)
    ranges, count = [(0, end, False)], 0
    while ranges:
        pos, stop, nested = ranges.pop()
        while pos + 8 <= stop:
            f.seek(pos)
            header = f.read(16)
            size, name, body = int.from_bytes(header[:4], "big"), header[4:8], pos + 8
            if size == 1:     # a 64-bit size follows the name
                size, body = int.from_bytes(header[8:16], "big"), pos + 16
            elif size == 0:   # the box runs to the end of the file
                size = end - pos
            count += 1
            if size < body - pos or count > _MAX_MP4_BOXES or \
                    size > _MP4_READ_WHOLE.get(name, size):
                return False
            if nested and pos + size > stop:
                # mutagen reads a box's children up to the box's own end,
                # not its parent's: past it, this count and mutagen's walk
                # would part ways (a crafted file then costs mutagen
                # millions of boxes). A whole file is never built so.
                return False
            if name in _MP4_CONTAINERS:
                skip = 4 if name == b"meta" else 0   # its version and flags
                ranges.append((body + skip, pos + size, True))
            pos += size
    return True

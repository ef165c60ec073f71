"""Crafted files a client may upload to make the audio probe eat memory.

Every upload is probed (in a thread, with a timeout that cannot stop the
thread), so the probe's memory must stay bounded by what it needs, not by
what a file claims. Measured with tracemalloc around the probe of a real
file on disk: mutagen's allocations are Python objects.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from mutagen.mp4 import MP4, MP4Cover
from mutagen.ogg import OggPage

from audiofixtures import fixture
from blobd import audio

MIB = 1 << 20


def _peak_while(probe_path: Path) -> tuple[audio.AudioInfo | None, int]:
    tracemalloc.start()
    try:
        info = audio.probe(probe_path)
        return info, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _ogg_with_comment_packet(comment: bytes) -> bytes:
    """tone.ogg with its Vorbis comment packet replaced."""
    with fixture("tone.ogg").open("rb") as src:
        pages = []
        while True:
            try:
                pages.append(OggPage(src))
            except EOFError:
                break
    head = pages[:1]
    for page in pages[1:]:
        head.append(page)
        if len(OggPage.to_packets(head, strict=False)) >= 3 and page.complete:
            break
    setup = OggPage.to_packets(head, strict=False)[2]
    new = OggPage.from_packets([comment, setup], sequence=1, default_size=65025)
    for page in new:
        page.serial, page.position = head[0].serial, 0
    out = [head[0], *new, *pages[len(head):]]
    for number, page in enumerate(out):
        page.sequence = number
    return b"".join(page.write() for page in out)


def test_a_vorbis_comment_bomb_is_read_without_its_comments(tmp_path: Path) -> None:
    count = 300_000  # 1.2 MB of empty comments; ~40 MB as mutagen's tags
    comment = b"\x03vorbis" + struct.pack("<II", 0, count) + b"\0\0\0\0" * count + b"\x01"
    path = tmp_path / "bomb.ogg"
    path.write_bytes(_ogg_with_comment_packet(comment))
    info, peak = _peak_while(path)
    assert info is not None and info.codec == "vorbis"
    assert abs(info.duration - 2.0) < 0.05  # the stream facts are all still there
    assert peak < 4 * MIB, f"{peak / MIB:.1f} MiB"


def test_nested_mp4_boxes_claiming_more_than_their_parent_are_not_audio(
        tmp_path: Path) -> None:
    """A 'udta' inside a 24-byte 'moov' claims to run to the end of the file:
    mutagen would then read every 8 bytes of the following 'free' box as a
    box of its own (200,000 here)."""
    boxes = 200_000
    ftyp = struct.pack(">I4s4sI4s", 20, b"ftyp", b"M4A ", 0, b"M4A ")
    body = struct.pack(">I4s", 8, b"abcd") * boxes
    total = 20 + 24 + 8 + len(body)
    moov = (struct.pack(">I4s", 24, b"moov") + struct.pack(">I4s", total - 28, b"udta")
            + struct.pack(">I4s", 16, b"skip"))
    path = tmp_path / "bomb.m4a"
    path.write_bytes(ftyp + moov + struct.pack(">I4s", 8 + len(body), b"free") + body)
    info, peak = _peak_while(path)
    assert info is None
    assert peak < 4 * MIB, f"{peak / MIB:.1f} MiB"


def test_mp4_tags_are_not_loaded(tmp_path: Path) -> None:
    """Cover art (or any tag) of any size costs the probe nothing."""
    path = tmp_path / "cover.m4a"
    path.write_bytes(fixture("tone.m4a").read_bytes())
    tagged = MP4(path)
    tagged["covr"] = [MP4Cover(bytes(8 * MIB))]
    tagged.save()
    info, peak = _peak_while(path)
    assert info is not None and info.codec == "aac"
    assert peak < 4 * MIB, f"{peak / MIB:.1f} MiB"


def test_a_wave_format_chunk_of_megabytes_is_not_audio(tmp_path: Path) -> None:
    data = fixture("tone.wav").read_bytes()
    huge_fmt = struct.pack("<4sI", b"fmt ", 4 * MIB) + bytes(4 * MIB)
    riff = data[12:]
    body = b"WAVE" + huge_fmt + riff
    path = tmp_path / "bomb.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    info, peak = _peak_while(path)
    assert info is None
    assert peak < 2 * MIB, f"{peak / MIB:.1f} MiB"


def _grown_box(data: bytes, path: list[bytes], extra: int) -> bytes:
    """``data`` (an MP4) with ``extra`` zero bytes at the end of the box at
    ``path`` (names from the top), every box around it grown to match."""
    pos, end, starts = 0, len(data), []
    for name in path:
        while pos < end:
            size = int.from_bytes(data[pos:pos + 4], "big")
            if data[pos + 4:pos + 8] == name:
                break
            pos += size
        else:
            raise AssertionError(f"no {name!r} box")
        starts.append(pos)
        end = pos + size
        pos += 8
    out = bytearray(data[:end] + bytes(extra) + data[end:])
    for start in starts:
        size = int.from_bytes(out[start:start + 4], "big")
        out[start:start + 4] = (size + extra).to_bytes(4, "big")
    return bytes(out)


@pytest.mark.parametrize("box", [
    [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd"],
    [b"moov", b"trak", b"tkhd"],     # read for the edited length
])
def test_an_mp4_box_the_probe_reads_whole_is_bounded(tmp_path: Path, box: list[bytes]) -> None:
    """Found by review: mutagen reads 'stsd' (and 'hdlr', 'mdhd', 'mvhd')
    whole, so a 150 MB 'stsd' cost the probe 300 MB, out of a timeout's
    reach (one read() call)."""
    data = fixture("tone.m4a").read_bytes()
    path = tmp_path / "padded.m4a"
    path.write_bytes(_grown_box(data, box, 4096))  # still a plausible one
    info = audio.probe(path)
    assert info is not None and info.codec == "aac"
    path.write_bytes(_grown_box(data, box, 16 * MIB))
    info, peak = _peak_while(path)
    assert info is None
    assert peak < 4 * MIB, f"{peak / MIB:.1f} MiB"


def test_a_flac_tail_of_fake_frame_headers_is_read_once(tmp_path: Path) -> None:
    """The probe reads a FLAC file's last frames for where a cut fell. A
    tail made of nothing but frame headers, each leading to the next, costs
    a parse per header and one CRC-16, not one per pair."""
    from blobd.audio.flac import crc8
    fake = b"".join(head + bytes([crc8(head)]) for head in
                    (bytes([0xFF, 0xF8, 0xC9, 0x08, n & 0x7F]) for n in range(60_000)))
    data = bytearray(fixture("tone.flac").read_bytes())
    data[8 + 7:8 + 10] = b"\xff\xff\xff"   # STREAMINFO's largest frame: 16 MiB
    path = tmp_path / "fake.flac"
    path.write_bytes(bytes(data) + fake)
    started = time.perf_counter()
    audio.probe(path)
    assert time.perf_counter() - started < 2.0


# --- WebM/Matroska: blobd's own EBML reader ---------------------------------

def _element(element_id: int, body: bytes, *, size: bytes | None = None) -> bytes:
    """An EBML element (RFC 8794 section 6); ``size`` overrides its 8-byte size."""
    width = (element_id.bit_length() + 7) // 8
    if size is None:
        size = (1 << 56 | len(body)).to_bytes(8, "big")
    return element_id.to_bytes(width, "big") + size + body


UNKNOWN = b"\x01" + b"\xff" * 7          # an 8-byte size of all ones


def _matroska(*, before_tracks: bytes = b"", in_audio: bytes = b"", in_tracks: bytes = b"",
              tracks_size: bytes | None = None) -> bytes:
    """A minimal Opus-in-Matroska file stating its 2 s Duration."""
    ebml = _element(0x1A45DFA3, _element(0x4282, b"matroska"))
    info = _element(0x1549A966, _element(0x2AD7B1, (1_000_000).to_bytes(3, "big"))
                    + _element(0x4489, struct.pack(">d", 2000.0)))
    audio_settings = _element(0xE1, _element(0xB5, struct.pack(">d", 48000.0))
                              + _element(0x9F, b"\x02") + in_audio)
    entry = _element(0xAE, _element(0xD7, b"\x01") + _element(0x83, b"\x02")
                     + _element(0x86, b"A_OPUS") + audio_settings)
    tracks = _element(0x1654AE6B, in_tracks + entry, size=tracks_size)
    return ebml + _element(0x18538067, info + before_tracks + tracks, size=UNKNOWN)


def _probe_bounded(tmp_path: Path, data: bytes) -> audio.AudioInfo | None:
    path = tmp_path / "crafted.mka"
    path.write_bytes(data)
    started = time.perf_counter()
    info, peak = _peak_while(path)
    assert time.perf_counter() - started < 2.0
    assert peak < 4 * MIB, f"{peak / MIB:.1f} MiB"
    return info


def test_the_crafted_matroska_base_is_audio(tmp_path: Path) -> None:
    info = _probe_bounded(tmp_path, _matroska())
    assert info is not None and (info.codec, info.duration, info.channels) == ("opus", 2.0, 2)


def test_a_matroska_element_claiming_petabytes_is_not_audio(tmp_path: Path) -> None:
    assert _probe_bounded(tmp_path, _matroska()) is not None
    huge = (1 << 56 | 1 << 50).to_bytes(8, "big")   # Tracks of 1 PiB, in a 200-byte file
    assert _probe_bounded(tmp_path, _matroska(tracks_size=huge)) is None


def test_deeply_nested_matroska_elements_are_skipped_not_followed(tmp_path: Path) -> None:
    depth, core = 50_000, b""
    sizes, size = [], 0
    for _ in range(depth):               # inside out: each level wraps the last
        sizes.append(size)
        size += 10                       # a 2-byte ID and an 8-byte size
    nested = b"".join(b"\x4f\xab" + (1 << 56 | s).to_bytes(8, "big")
                      for s in reversed(sizes)) + core
    info = _probe_bounded(tmp_path, _matroska(in_audio=nested))
    assert info is not None and info.codec == "opus"


@pytest.mark.parametrize("where", ["top-level", "in-tracks"])
def test_endless_tiny_matroska_elements_are_not_audio(tmp_path: Path, where: str) -> None:
    voids = b"\xec\x80" * 300_000        # Void elements of no body, 600 KB
    data = (_matroska(before_tracks=voids) if where == "top-level"
            else _matroska(in_tracks=voids))
    few = _matroska(before_tracks=voids[:200], in_tracks=voids[:200])
    assert _probe_bounded(tmp_path, few) is not None
    assert _probe_bounded(tmp_path, data) is None


@pytest.mark.parametrize("filler", [
    b"\x1f\x43\xb6\x75\xff",                        # Clusters of unknown size, empty
    b"\x1f\x43\xb6\x75\xff\xe7\x81\x00" + b"\xec\x80" * 50,   # a Timestamp, then Voids
])
def test_a_tail_of_unknown_size_clusters_is_bounded(tmp_path: Path, filler: bytes) -> None:
    """A MediaRecorder file (no Duration) followed by 256 KiB of Clusters
    that never end: a bounded number tried, each walk bounded, no length."""
    data = fixture("recorded.webm").read_bytes()
    info = _probe_bounded(tmp_path, data + filler * (300_000 // len(filler)))
    assert info is not None and info.codec == "opus" and info.duration is None


def test_matroska_masters_of_unknown_size_are_not_audio(tmp_path: Path) -> None:
    # Only a Segment and a Cluster may have an unknown size (RFC 9559).
    assert _probe_bounded(tmp_path, _matroska()) is not None   # its Segment's is
    assert _probe_bounded(tmp_path, _matroska(tracks_size=UNKNOWN)) is None


@pytest.mark.parametrize("name", ["recorded.webm", "tone_flac.mka", "video_sound.webm",
                                  "tone.aiff", "tone_float.aifc"])
def test_every_prefix_of_a_new_container_probes_without_raising(tmp_path: Path,
                                                                name: str) -> None:
    assert audio.probe(fixture(name)) is not None
    data = fixture(name).read_bytes()
    path = tmp_path / name
    for end in range(0, len(data), 7):
        path.write_bytes(data[:end])
        info = audio.probe(path)
        assert info is None or info.duration is None or 0 < info.duration <= 0.6


def test_an_aiff_with_endless_chunks_or_a_huge_comm_is_not_audio(tmp_path: Path) -> None:
    assert audio.probe(fixture("tone.aiff")) is not None
    data = fixture("tone.aiff").read_bytes()
    many = data[:12] + b"junk\x00\x00\x00\x00" * 2_000 + data[12:]
    huge_comm = data[:12] + b"COMM" + struct.pack(">I", 4 * MIB) + bytes(4 * MIB)
    for crafted in (many, huge_comm):
        path = tmp_path / "bomb.aiff"
        path.write_bytes(crafted[:4] + struct.pack(">I", len(crafted) - 8) + crafted[8:])
        info, peak = _peak_while(path)
        assert info is None
        assert peak < 2 * MIB, f"{peak / MIB:.1f} MiB"

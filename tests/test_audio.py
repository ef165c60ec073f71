"""blobd.audio and blobd.sniff against real audio files.

The fixtures in tests/fixtures/audio were made by make.sh there (ffmpeg);
variants (cut, re-wrapped, padded, crafted) are built from them in tmp_path.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
from mutagen.ogg import OggPage

from audiofixtures import (AUDIO_FIXTURES, FIXTURES, NOT_AUDIO_FIXTURES,
                           PROBE_ONLY_FIXTURES, fixture, ogg_without_end)
from blobd import audio
from blobd.audio import (AUDIO_MIME_TYPES, OGG_TAIL, AudioInfo, probe, probe_async,
                         sniff_mime)
from blobd.audio import mp3, wave64
from blobd.sniff import ac3_frame, mpeg_frame_length

PROBED = AUDIO_FIXTURES | PROBE_ONLY_FIXTURES
SNIFFED = {name: e.mime for name, e in PROBED.items()} | {
    "truncated.mp3": "audio/mpeg",
    # Valid files that do not say their length (test_describe checks them).
    "streamed.flac": "audio/flac",
    "fragmented.m4a": "audio/mp4",
    "not_audio.txt": None,
    "not_audio.png": None,
    # The brand cannot tell; the probe finds no sound track (test_describe).
    "video_only.mp4": "audio/mp4",
    "video_sound.mp4": "audio/mp4",
    # The DocType says WebM; only the probe finds the sound, or none.
    "video_sound.webm": "audio/webm",
    "video_only.webm": "audio/webm",
    # Its ID3v2 tag runs past the 64 bytes: the head says MP3, the file
    # (sniff_file) FLAC.
    "id3_long_cut.flac": "audio/mpeg",
}


def id3_tag_of(name: str) -> bytes:
    """The leading ID3v2 tag of a fixture, header included."""
    data = fixture(name).read_bytes()
    assert data.startswith(b"ID3")
    size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
    return data[:10 + size]


def test_every_fixture_has_an_expectation() -> None:
    made = {p.name for p in FIXTURES.iterdir()} - {"README.md", "make.sh"}
    assert made == set(SNIFFED)


def test_fixtures_are_small() -> None:
    for name in SNIFFED:
        # long.opus must outgrow the 256 KiB Ogg tail that is read.
        limit = {"sweep.mp3": 100_000, "long.opus": 340_000}.get(name, 40_000)
        assert fixture(name).stat().st_size < limit, name


@pytest.mark.parametrize("name", sorted(PROBED))
def test_probe_reads_each_format(name: str) -> None:
    want = PROBED[name]
    info = probe(fixture(name))
    assert info is not None
    assert (info.mime, info.codec) == (want.mime, want.codec)
    assert info.duration == pytest.approx(want.duration, rel=0.10)
    assert (info.sample_rate, info.channels) == (want.sample_rate, want.channels)
    low, high = want.bitrate
    assert info.bitrate is not None and low <= info.bitrate <= high
    assert info.bits_per_sample == want.bits_per_sample
    assert info.mime in AUDIO_MIME_TYPES


def test_amr_in_3gp_is_named_and_mono(tmp_path: Path) -> None:
    """Phones record voice as AMR in 3GP. This ffmpeg has no AMR encoder, so
    the sample entry of tone.3gp is renamed 'samr': what the probe reads of
    it (codec, channels) is the sample entry's, never the AAC inside."""
    data = fixture("tone.3gp").read_bytes()
    assert data.count(b"mp4a") == 1
    path = tmp_path / "voice.3gp"
    path.write_bytes(data.replace(b"mp4a", b"samr"))
    info = probe(path)
    assert info is not None
    # The entry says 2 channels, a field TS 26.244 fixes; AMR is mono.
    assert (info.mime, info.codec, info.channels, info.sample_rate) == (
        "audio/3gpp", "amr_nb", 1, 8000)


@pytest.mark.parametrize("name", sorted(SNIFFED))
def test_sniff_mime_reads_each_head(name: str) -> None:
    head = fixture(name).read_bytes()[:64]
    assert sniff_mime(head) == SNIFFED[name]


def test_sniffed_types_are_the_recognised_types() -> None:
    # and the fixtures cover every one of them
    assert {m for m in SNIFFED.values() if m is not None} == AUDIO_MIME_TYPES


# Sony Wave64's GUIDs for RIFF and WAVE, as Sony's W64 specification
# writes them to disk.
_W64_RIFF = bytes.fromhex("72696666 2e91cf11 a5d628db 04c10000")
_W64_WAVE = bytes.fromhex("77617665 f3acd311 8cd100c0 4f8edb8a")


@pytest.mark.parametrize("head, mime", [
    (b"", None),
    (b"ID3", "audio/mpeg"),
    (b"ID3\x03\x00\x00\x00\x00\x07\x76", "audio/mpeg"),  # a whole v2.3 header
    # Text beginning with the word: no version 2 to 4, or a size byte over
    # 7F (found by review: served as audio/mpeg).
    (b"ID3 tags name the artist.\n", None),
    (b"ID3v2.4 notes\n", None),
    (b"ID3\x03\x00\x00\x00\x00\x80\x00", None),
    (b"\xff\xfb\x90\x00" + bytes(60), "audio/mpeg"),      # MPEG-1 Layer III
    (b"\xff\xfb\xf0\x00" + bytes(60), None),              # bitrate index 15
    (b"\xff\xfb\x9c\x00" + bytes(60), None),              # sample rate index 3
    (b"\xff\xe9\x90\x00" + bytes(60), None),              # version 01 (reserved)
    (b"\xff\xf9\x90\x00" + bytes(60), None),              # layer 00, not ADTS
    (b"\xff\xf1\x50\x80\x02\x1f\xfc", "audio/aac"),       # ADTS
    (b"ADIF" + bytes(60), "audio/aac"),
    (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom", "audio/mp4"),
    (b"\x00\x00\x00\x18ftypXYZ \x00\x00\x00\x00XYZ M4A ", "audio/mp4"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", None),
    (b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  ", None),
    (b"OggS\x00\x02" + bytes(20) + b"\x01\x2a\x80theora", None),
    (b"OggS\x00\x02" + bytes(20) + b"\x01\x1e\x01vorbis", "audio/ogg"),
    (b"OggS\x00\x02", "audio/ogg"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "audio/wav"),
    (b"RIFF\x24\x00\x00\x00AVI LIST", None),
    # RF64 (EBU Tech 3306) and BW64 (ITU-R BS.2088): WAVE, 64-bit sizes.
    (b"RF64\xff\xff\xff\xffWAVEds64", "audio/wav"),
    (b"BW64\xff\xff\xff\xffWAVEds64", "audio/wav"),
    (b"RF64\x24\x00\x00\x00WAVEds64", None),      # its RIFF size must be FFFFFFFF
    (b"RF64\xff\xff\xff\xffAVI LIST", None),
    # Sony Wave64: the riff GUID, a 64-bit size, the wave GUID.
    (_W64_RIFF + bytes(8) + _W64_WAVE, "audio/x-w64"),
    (_W64_RIFF + bytes(8) + b"avi " + _W64_WAVE[4:], None),
    (b"riff" + bytes(36), None),
    (b"%PDF-1.7\n", None),
    (b"\x7fELF\x02\x01\x01\x00", None),
])
def test_sniff_mime_magic(head: bytes, mime: str | None) -> None:
    assert sniff_mime(head) == mime


def test_sniff_mime_knows_ebml_and_aiff() -> None:
    cases = [
        # EBML (RFC 8794): the DocType element (42 82) names WebM or Matroska.
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm\x42\x87\x81\x04",
         "audio/webm"),
        (b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\x82\x88matroska\x42\x87\x81\x04",
         "audio/matroska"),
        (b"\x1a\x45\xdf\xa3\x8f\x42\x82\x84webm", "audio/webm"),
        (b"\x1a\x45\xdf\xa3\x8f\x42\x82\x84mkvx", None),       # another EBML format
        (b"\x1a\x45\xdf\xa3\x8f\x42\x86\x81", "audio/matroska"),  # cut before the DocType
        (b"\x1a\x45\xdf\xa3", "audio/matroska"),
        (b"FORM\x00\x00\x12\xeeAIFFCOMM", "audio/aiff"),
        (b"FORM\x00\x00\x12\xeeAIFCFVER", "audio/aiff"),
        (b"FORM\x00\x00\x12\xee8SVXVHDR", None),                 # Amiga 8SVX: not read
    ]
    assert [sniff_mime(head) for head, _ in cases] == [mime for _, mime in cases]


@pytest.mark.parametrize("name", ["tone.mp3", "sweep.mp3"])
def test_mp3_from_ffmpeg_is_as_long_as_its_audio(name: str) -> None:
    # Its LAME tag names the encoder "Lavc" and states the encoder delay
    # and padding, which mutagen subtracts only for "LAME" (found by
    # review: 2.064 s for 2.0 s; 5.184 s for 5.0 s of 8 kHz audio).
    info = probe(fixture(name))
    assert info is not None and info.duration == PROBED[name].duration


def test_mp3_whose_lavc_tag_claims_more_gap_than_audio_keeps_its_length(tmp_path: Path) -> None:
    data = bytearray(fixture("tone.mp3").read_bytes())
    info_at = data.index(b"Info", len(id3_tag_of("tone.mp3")))
    data[info_at + 8:info_at + 12] = (5).to_bytes(4, "big")   # frames: 5 x 576 samples
    lavf = data.index(b"Lavf", info_at)
    data[lavf + 21:lavf + 24] = b"\xff\xff\xff"               # gap: 2 x 4095 samples
    odd = tmp_path / "odd.mp3"
    odd.write_bytes(bytes(data))
    info = probe(odd)
    assert info is not None and info.duration == pytest.approx(5 * 576 / 22050, abs=0.002)


@pytest.mark.parametrize("name", ["tone.m4a", "tone_mono.m4a", "mp3_mono.mp4"])
def test_mp4_is_as_long_as_its_edit_list(name: str) -> None:
    # The samples hold the encoder's priming and padding too; the edit
    # list, summed in the tkhd, cuts them (found by review: 2.023 s for
    # 2.0 s, 5.128 s for 5.0 s of 8 kHz AAC).
    info = probe(fixture(name))
    assert info is not None and info.duration == PROBED[name].duration


# --- damaged, disguised and foreign input ------------------------------------

@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_cut_mp3_reports_what_is_left(tmp_path: Path, fraction: float) -> None:
    whole = fixture("tone.mp3").read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(whole[:int(len(whole) * fraction)])
    full = probe(fixture("tone.mp3"))
    info = probe(cut)
    # Its Info header still claims the whole 2 s; the bytes bound it.
    assert full is not None and info is not None
    assert info.codec == "mp3" and info.sample_rate == 22050
    assert info.duration == pytest.approx(full.duration * fraction, abs=0.1)


@pytest.mark.parametrize("name", ["tone.wav", "adpcm.wav", "tone.aiff", "tone_sowt.aifc",
                                  "tone_rf64.wav", "adpcm_rf64.wav", "tone.w64", "adpcm.w64"])
def test_cut_wav_or_aiff_reports_what_is_left(tmp_path: Path, name: str) -> None:
    whole = fixture(name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(whole[:len(whole) // 2])
    info = probe(cut)
    # The header chunks (WAV's data and fact, RF64's ds64, AIFF's COMM)
    # still claim the whole; the bytes present bound it.
    assert info is not None and info.codec == PROBED[name].codec
    # PCM is cut at a sample; ADPCM counts whole blocks of 505 samples.
    slack = 0.01 if info.codec == "pcm" else 0.05
    assert info.duration == pytest.approx(PROBED[name].duration / 2, abs=slack)


def test_truncated_fixture_is_about_half_the_tone() -> None:
    info = probe(fixture("truncated.mp3"))
    assert info is not None and info.mime == "audio/mpeg"
    assert 0.9 <= info.duration <= 1.15


@pytest.mark.parametrize("keep", [0, 3, 40, 200])
def test_mp3_cut_before_enough_frames_is_not_audio(tmp_path: Path, keep: int) -> None:
    data = fixture("tone.mp3").read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[:len(id3_tag_of("tone.mp3")) + keep])
    assert probe(cut) is None


@pytest.mark.parametrize("name, disguise", [
    ("tone.mp3", "song.flac"),
    ("tone.ogg", "song.mp3"),
    ("tone.wav", "song.m4a"),
    ("tone.opus", "song.ogg"),
])
def test_file_name_does_not_matter(tmp_path: Path, name: str, disguise: str) -> None:
    moved = tmp_path / disguise
    shutil.copy(fixture(name), moved)
    assert probe(moved) == probe(fixture(name))
    assert probe(moved) is not None


@pytest.mark.parametrize("inner, codec", [("tone.aac", "aac"), ("tone.flac", "flac")])
def test_id3_tag_may_front_aac_and_flac(tmp_path: Path, inner: str, codec: str) -> None:
    tagged = tmp_path / "tagged"
    tagged.write_bytes(id3_tag_of("tone.mp3") + fixture(inner).read_bytes())
    info = probe(tagged)
    assert info is not None and info.codec == codec
    assert info.duration == pytest.approx(2.0, rel=0.10)


@pytest.mark.parametrize("inner", ["tone_rf64.wav", "tone.w64", "tone_sowt.aifc",
                                   "adpcm.wav", "tone_ima4.aifc"])
def test_id3_tag_may_front_the_wave_and_aiff_family(tmp_path: Path, inner: str) -> None:
    """As ffprobe reads them: the facts of the file behind the tag (each
    was not audio: its reader took the tag for the form's header)."""
    tag = id3_tag_of("id3_tone.wav")
    tagged = tmp_path / "tagged"
    tagged.write_bytes(tag + fixture(inner).read_bytes())
    assert probe(tagged) == probe(fixture(inner)) != None  # noqa: E711
    assert sniff_mime(tagged.read_bytes()[:len(tag) + 64]) == PROBED[inner].mime


@pytest.mark.parametrize("inner", ["tone.wav", "tone.aiff", "tone_rf64.wav", "tone.w64"])
def test_an_id3_tag_claiming_past_the_end_is_not_audio(tmp_path: Path, inner: str) -> None:
    """A tag whose size points past the end (or into the middle of the
    form) leaves nothing to read there: None, at once."""
    header = b"ID3\x03\x00\x00" + bytes([0x7F, 0x7F, 0x7F, 0x7F])   # 256 MiB
    tagged = tmp_path / "tagged"
    tagged.write_bytes(header + fixture(inner).read_bytes())
    assert probe(tagged) is None
    tagged.write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x08" + fixture(inner).read_bytes())
    assert probe(tagged) is None


def test_sniff_mime_looks_past_id3_tags_in_its_head() -> None:
    tag = id3_tag_of("id3_tone.wav")
    wav = fixture("tone.wav").read_bytes()
    assert sniff_mime((tag + wav)[:64]) == "audio/wav"
    assert sniff_mime((tag + tag + wav)[:80]) == "audio/wav"
    # The tag outgrows the head: what follows cannot be seen.
    assert sniff_mime((id3_tag_of("tone.mp3") + wav)[:64]) == "audio/mpeg"
    # Behind a tag blobd reads no Ogg, MP4 or Matroska, nor text.
    assert sniff_mime((tag + fixture("tone.ogg").read_bytes())[:64]) == "audio/mpeg"
    assert sniff_mime(tag + b"plain text after a tag") == "audio/mpeg"
    assert sniff_mime((tag + fixture("tone.mp3").read_bytes()[54:])[:64]) == "audio/mpeg"


def test_id3_tag_does_not_front_ogg(tmp_path: Path) -> None:
    tagged = tmp_path / "tagged.ogg"
    tagged.write_bytes(id3_tag_of("tone.mp3") + fixture("tone.ogg").read_bytes())
    assert probe(tagged) is None


def test_flac_must_open_with_streaminfo(tmp_path: Path) -> None:
    data = bytearray(fixture("tone.flac").read_bytes())
    assert data[4] & 0x7F == 0   # STREAMINFO, as RFC 9639 requires
    data[4] |= 0x01              # the same bytes, typed as PADDING
    relabelled = tmp_path / "relabelled.flac"
    relabelled.write_bytes(data)
    assert probe(relabelled) is None


def _flac_audio_start(data: bytes) -> tuple[int, int]:
    """(offset of the last metadata block's header, offset of the audio)."""
    pos = 4
    while True:
        header_at, last = pos, data[pos] & 0x80
        pos += 4 + int.from_bytes(data[pos + 1:pos + 4], "big")
        if last:
            return header_at, pos


@pytest.mark.parametrize("where", ["in-a-block", "in-the-last-block", "at-the-audio"])
def test_flac_cut_inside_its_metadata_is_none(tmp_path: Path, where: str) -> None:
    data = fixture("tone.flac").read_bytes()
    last_header, audio_start = _flac_audio_start(data)
    keep = {"in-a-block": 60, "in-the-last-block": last_header + 5,
            "at-the-audio": audio_start}[where]
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[:keep])   # STREAMINFO intact, no audio at all
    assert probe(cut) is None


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_cut_flac_reports_what_is_left(tmp_path: Path, fraction: float) -> None:
    # STREAMINFO still claims the whole 2 s; the frames at the end say
    # where the cut fell (found by review: 5 s reported, 0.31 s played).
    data = fixture("tone.flac").read_bytes()
    _, audio_start = _flac_audio_start(data)
    keep = audio_start + int((len(data) - audio_start) * fraction)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[:keep])
    info = probe(cut)
    assert info is not None and info.codec == "flac"
    assert info.duration == pytest.approx(2.0 * fraction, abs=0.15)


def test_flac_with_a_tag_after_its_frames_is_whole(tmp_path: Path) -> None:
    # Some taggers append ID3v1 to FLAC: no frame, no truncation.
    tagged = tmp_path / "tagged.flac"
    tagged.write_bytes(fixture("tone.flac").read_bytes() + b"TAG" + bytes(125))
    info = probe(tagged)
    assert info is not None and info.duration == 2.0


def test_ogg_with_another_codec_first_is_not_read(tmp_path: Path) -> None:
    # Only Vorbis (audio/ogg) and Opus are read, and only as the first
    # stream: mutagen would otherwise walk page after page for a header.
    first = OggPage()
    first.serial, first.first, first.position = 7, True, 0
    first.packets = [b"Speex   1.2" + bytes(69)]
    muxed = tmp_path / "speex-first.ogg"
    muxed.write_bytes(first.write() + fixture("tone.ogg").read_bytes())
    assert sniff_mime(muxed.read_bytes()[:64]) == "audio/ogg"
    assert probe(muxed) is None


def test_wav_claiming_no_channels_is_none(tmp_path: Path) -> None:
    data = bytearray(fixture("tone.wav").read_bytes())
    assert data[22:24] == b"\x01\x00"   # fmt: number of channels
    data[22:24] = b"\x00\x00"
    broken = tmp_path / "broken.wav"
    broken.write_bytes(data)
    assert probe(broken) is None


@pytest.mark.parametrize("junk, found", [(1000, True), (100_000, False)])
def test_mp3_after_leading_zeros(tmp_path: Path, junk: int, found: bool) -> None:
    # Without magic at the start, a short run of padding is tolerated; a
    # stream deep inside some other file is not claimed as MP3.
    frames = fixture("tone.mp3").read_bytes()[len(id3_tag_of("tone.mp3")):]
    padded = tmp_path / "padded"
    padded.write_bytes(bytes(junk) + frames)
    info = probe(padded)
    assert (info is not None) == found
    if info is not None:
        assert info.codec == "mp3" and info.duration == pytest.approx(2.0, rel=0.10)


def test_stacked_id3_tags_are_skipped(tmp_path: Path) -> None:
    tag = id3_tag_of("tone.mp3")
    stacked = tmp_path / "stacked.mp3"
    stacked.write_bytes(tag * 3 + fixture("tone.mp3").read_bytes()[len(tag):])
    info = probe(stacked)
    assert info is not None and info.codec == "mp3"


def _random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("name, content", [
    ("empty.mp3", b""),
    ("text.mp3", b"just some words, not a song\n" * 200),
    ("random.mp3", _random_bytes(1, 50_000)),
    ("random.bin", _random_bytes(2, 300_000)),
    ("ff.mp3", b"\xff" * 20_000),
    ("zeros.wav", bytes(20_000)),
    # one valid MPEG header repeated: the frames it announces do not chain
    ("headers.mp3", b"\xff\xfb\x90\x00" * 5_000),
    ("id3-then-text.mp3", b"ID3\x03\x00\x00\x00\x00\x00\x10" + bytes(16) + b"hello" * 999),
    ("ogg-random.ogg", b"OggS\x00\x02" + _random_bytes(3, 10_000)),
    ("flac-random.flac", b"fLaC" + _random_bytes(4, 10_000)),
    ("riff-no-fmt.wav", b"RIFF\x04\x00\x00\x00WAVE"),
    ("ftyp-only.m4a", b"\x00\x00\x00\x14ftypM4A \x00\x00\x02\x00M4A "),
])
def test_non_audio_is_none(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert probe(path) is None


@pytest.mark.parametrize("name", NOT_AUDIO_FIXTURES)
def test_non_audio_fixtures_are_none(name: str) -> None:
    assert probe(fixture(name)) is None


def test_an_executable_is_not_audio() -> None:
    assert probe(os.path.realpath(sys.executable)) is None


@pytest.mark.parametrize("seed", range(20))
def test_damaged_audio_never_raises(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    name = sorted(AUDIO_FIXTURES)[seed % len(AUDIO_FIXTURES)]
    data = bytearray(fixture(name).read_bytes())
    for _ in range(rng.choice([1, 10, 100])):
        data[rng.randrange(len(data))] = rng.randrange(256)
    damaged = tmp_path / name
    damaged.write_bytes(data[:rng.randrange(1, len(data) + 1)])
    info = probe(damaged)   # the assertion is that this returns at all
    assert info is None or info.mime in AUDIO_MIME_TYPES


def test_missing_file_and_directory_are_none(tmp_path: Path) -> None:
    assert probe(tmp_path / "absent.mp3") is None
    assert probe(tmp_path) is None


# --- bounded work on crafted containers --------------------------------------
# mutagen alone would parse each of these as valid audio, spending memory in
# proportion to the count of parts; probe refuses past a sane count.

def _m4a_with_free_boxes(count: int) -> bytes:
    return fixture("tone.m4a").read_bytes() + b"\x00\x00\x00\x08free" * count


def _wav_with_chunks(count: int) -> bytes:
    data = fixture("tone.wav").read_bytes()
    assert data[12:16] == b"fmt " and data[36:40] == b"data"
    body = b"WAVE" + data[12:36] + b"junk\x00\x00\x00\x00" * count + data[36:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _flac_with_padding_blocks(count: int) -> bytes:
    data = fixture("tone.flac").read_bytes()
    streaminfo = bytes([data[4] & 0x7F]) + data[5:42]   # no longer the last
    padding = b"\x01\x00\x00\x00" * (count - 1) + b"\x81\x00\x00\x00"
    # the original blocks after STREAMINFO give way to the padding
    return b"fLaC" + streaminfo + padding + data[_flac_audio_start(data)[1]:]


def _rf64_with_chunks(count: int) -> bytes:
    data = fixture("tone_rf64.wav").read_bytes()
    assert data[48:52] == b"fmt " and data[96:100] == b"data"
    return data[:96] + b"junk\x00\x00\x00\x00" * count + data[96:]


def _w64_with_chunks(count: int) -> bytes:
    data = fixture("tone.w64").read_bytes()
    assert data[80:84] == b"data"
    junk = b"junk" + _W64_WAVE[4:] + struct.pack("<Q", 24)
    return data[:80] + junk * count + data[80:]


@pytest.mark.parametrize("build, few, many", [
    (_m4a_with_free_boxes, 100, 60_000),
    (_wav_with_chunks, 100, 2_000),
    (_flac_with_padding_blocks, 100, 2_000),
    (_rf64_with_chunks, 100, 2_000),
    (_w64_with_chunks, 100, 2_000),
], ids=["mp4-boxes", "riff-chunks", "flac-blocks", "rf64-chunks", "w64-chunks"])
def test_container_parts_are_bounded(tmp_path: Path, build, few: int, many: int) -> None:
    path = tmp_path / "crafted"
    path.write_bytes(build(few))
    info = probe(path)
    assert info is not None and info.duration > 0.25
    path.write_bytes(build(many))
    assert probe(path) is None


# --- AudioInfo ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["tone.ogg", "tone_24.flac"])
def test_json_round_trip(name: str) -> None:
    info = probe(fixture(name))
    assert info is not None
    body = info.to_json()
    assert set(body) == {"duration", "bitrate", "sample_rate", "channels", "codec",
                         "bits_per_sample"}
    assert body["bits_per_sample"] == PROBED[name].bits_per_sample
    assert AudioInfo.from_json(body, info.mime) == info


def test_json_allows_unknown_numbers() -> None:
    body = {"duration": 1.5, "bitrate": None, "sample_rate": None,
            "channels": None, "codec": "pcm", "bits_per_sample": None}
    assert AudioInfo.from_json(body, "audio/wav").to_json() == body


def test_json_stored_before_bits_per_sample_reads_as_null() -> None:
    """Index rows written before the key existed stand as they were."""
    old = {"duration": 1.5, "bitrate": 128000, "sample_rate": 8000,
           "channels": 1, "codec": "pcm"}
    info = AudioInfo.from_json(old, "audio/wav")
    assert info.bits_per_sample is None and info.sample_rate == 8000
    assert info.to_json() == old | {"bits_per_sample": None}


@pytest.mark.parametrize("body, mime", [
    ({"duration": 1.0, "bitrate": 1, "sample_rate": 8000, "channels": 1}, "audio/wav"),
    ({"duration": 1.0, "bitrate": "fast", "sample_rate": 8000, "channels": 1,
      "codec": "pcm"}, "audio/wav"),
    ({"duration": 1.0, "bitrate": 1, "sample_rate": 8000, "channels": True,
      "codec": "pcm"}, "audio/wav"),
    ({"duration": 1.0, "bitrate": 1, "sample_rate": 8000, "channels": 1,
      "codec": 7}, "audio/wav"),
    ({"duration": 1.0, "bitrate": 1, "sample_rate": 8000, "channels": 1,
      "codec": "pcm"}, "text/plain"),
    ({"duration": 1.0, "bitrate": 1, "sample_rate": 8000, "channels": 1,
      "codec": "pcm", "bits_per_sample": "24"}, "audio/wav"),
])
def test_from_json_refuses_malformed(body: dict, mime: str) -> None:
    with pytest.raises(ValueError):
        AudioInfo.from_json(body, mime)


# --- probe_async ----------------------------------------------------------------

async def test_probe_async_matches_probe() -> None:
    for name in AUDIO_FIXTURES:
        assert await probe_async(fixture(name), timeout=10) == probe(fixture(name))
    assert await probe_async(fixture("not_audio.txt"), timeout=10) is None


async def test_an_ogg_without_its_end_is_timed_from_its_tail(tmp_path: Path) -> None:
    """A recording cut off has no end-of-stream page: mutagen then walks
    every page from the start for the last one (seconds for 12 MB, a probe
    thread held on past the probe's timeout). Only the file's tail is
    searched now, and the duration comes from its last page in time."""
    small = ogg_without_end(tmp_path, 1_000)
    info = await probe_async(small, timeout=10)
    assert info is not None and info.duration == pytest.approx(2.0)
    large = ogg_without_end(tmp_path, 400_000)   # ~12 MB of pages after the audio
    assert large.stat().st_size > 40 * OGG_TAIL
    info = await probe_async(large, timeout=0.5)
    assert info is not None and info.duration == pytest.approx(2.0)


def test_an_ogg_whose_stream_ends_before_the_tail_has_no_duration(tmp_path: Path) -> None:
    """No page of the audio stream in the last OGG_TAIL bytes (another
    stream runs on after it): still Vorbis audio, its duration unknown."""
    other = OggPage()
    other.serial, other.position, other.packets = 0x5EED, 1, [os.urandom(4000)]
    muxed = tmp_path / "muxed.ogg"
    muxed.write_bytes(fixture("tone.ogg").read_bytes() + other.write() * 100)
    info = probe(muxed)
    assert info is not None and info.codec == "vorbis" and info.duration is None


def _release_fifo(path: Path) -> None:
    """Let a reader blocked opening `path` go on: open the write end, then
    close it, so the reader sees end of file."""
    # Generous: the probe thread may first wait for another probe to end.
    deadline = time.monotonic() + 30
    while True:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            return
        except OSError:   # ENXIO: the reader has not opened it yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


async def test_probe_async_returns_while_a_read_never_does(tmp_path: Path) -> None:
    fifo = tmp_path / "never"
    os.mkfifo(fifo)
    started = time.monotonic()
    try:
        assert await probe_async(fifo, timeout=0.2) is None
        assert time.monotonic() - started < 1.2
    finally:
        _release_fifo(fifo)
    assert await probe_async(fixture("tone.mp3"), timeout=10) is not None


async def test_stuck_probes_leave_the_default_executor_alone(tmp_path: Path) -> None:
    fifos = [tmp_path / f"never-{i}" for i in range(audio.PROBE_THREADS)]
    stuck = []
    try:
        for fifo in fifos:
            os.mkfifo(fifo)
            stuck.append(asyncio.ensure_future(probe_async(fifo, timeout=30)))
        await asyncio.sleep(0.2)   # every probe thread now waits in open()
        # A new probe only queues behind them, and times out...
        assert await probe_async(fixture("tone.mp3"), timeout=0.3) is None
        # ...while other blocking work still gets threads at once.
        info = await asyncio.wait_for(asyncio.to_thread(probe, fixture("tone.mp3")), 5)
        assert info is not None and info.codec == "mp3"
    finally:
        for fifo in fifos:
            _release_fifo(fifo)
    assert await asyncio.gather(*stuck) == [None] * len(fifos)
    assert await probe_async(fixture("tone.mp3"), timeout=10) is not None


# --- sniff.could_be_audio: the probe's shortcut for bodies held in memory ---

def _variants(seed: int) -> list[bytes]:
    """Audio, damaged audio, audio behind junk, and noise."""
    rng = random.Random(seed)
    out = []
    for name in sorted(AUDIO_FIXTURES) + ["truncated.mp3"]:
        data = fixture(name).read_bytes()
        bare = data[len(id3_tag_of(name)):] if data.startswith(b"ID3") else data
        out += [data, bare, data[:rng.randrange(1, len(data) + 1)]]
        for junk in (1, 417, audio.MAX_MP3_JUNK, audio.MAX_MP3_JUNK + 1, 20_000):
            out.append(bytes(junk) + bare)
            out.append(rng.randbytes(junk) + bare)
        damaged = bytearray(bare)
        for _ in range(rng.choice([1, 10, 100])):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        out.append(bytes(damaged))
    out += [rng.randbytes(65536), b"\xff\xfb\x90\x00" * 5_000, bytes(20_000), b""]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_could_be_audio_never_refuses_what_probes_as_audio(tmp_path: Path,
                                                           seed: int) -> None:
    path = tmp_path / "body"
    probed = 0
    for data in _variants(seed):
        path.write_bytes(data)
        if probe(path) is not None:
            probed += 1
            assert audio.could_be_audio(data), data[:16]
    assert probed > 20   # the variants include plenty of real audio


@pytest.mark.parametrize("seed", range(20))
def test_could_be_audio_refuses_noise(seed: int) -> None:
    noise = random.Random(seed).randbytes(65536)
    assert not audio.could_be_audio(noise)
    assert not audio.could_be_audio(fixture("not_audio.png").read_bytes())
    assert not audio.could_be_audio(b"just some words\n" * 4096)


def test_could_be_audio_finds_a_chain_behind_a_run_of_ff(tmp_path: Path) -> None:
    frames = fixture("tone.mp3").read_bytes()[len(id3_tag_of("tone.mp3")):]
    for junk in (b"\xff", b"\xff\xff", b"\x00\xff\xff\xff"):
        path = tmp_path / "body"
        path.write_bytes(junk + frames)
        assert probe(path) is not None
        assert audio.could_be_audio(junk + frames)


def whole_frames(name: str, count: int) -> tuple[bytes, bytes]:
    """A fixture's ID3 tag, and its first ``count`` MPEG frames, whole."""
    tag = id3_tag_of(name)
    data = fixture(name).read_bytes()
    pos = len(tag)
    for _ in range(count):
        pos += mpeg_frame_length(data[pos:pos + 4])
    return tag, data[len(tag):pos]


@pytest.mark.parametrize("frames, trailer, is_audio", [
    (5, b"", True), (3, b"", True), (5, b"TAG" + bytes(125), True),
    (2, b"", False), (5, b"x", False),
])
def test_a_clip_of_a_few_frames_is_audio(tmp_path: Path, frames: int, trailer: bytes,
                                         is_audio: bool) -> None:
    """Found by review: an MP3 shorter than eight frames (a tenth of a
    second, a UI sound) was not audio, and require_audio refused it. A
    chain that ends the file exactly counts from three frames."""
    tag, audio_frames = whole_frames("tone.mp3", frames)
    for name, data in (("tagged.mp3", tag + audio_frames + trailer),
                       ("bare.mp3", audio_frames + trailer)):
        path = tmp_path / name
        path.write_bytes(data)
        info = probe(path)
        assert (info is not None) == is_audio, (name, info)
        if is_audio:
            assert info.codec == "mp3" and info.sample_rate == 22050 and info.channels == 1
            assert info.duration is not None and 0 < info.duration < 0.2
        assert audio.could_be_audio(data) or not is_audio


# --- MP3s whose length no header states --------------------------------------

def _id3v2_tag(body_size: int) -> bytes:
    size = bytes((body_size >> s) & 0x7F for s in (21, 14, 7, 0))
    return b"ID3\x04\x00\x00" + size + b"\x00" * body_size


def test_vbr_mp3_without_a_header_is_timed_by_its_frames(tmp_path: Path) -> None:
    """Found in review: with no Xing/VBRI header mutagen takes the file's
    size at the first frame's bitrate, 10.8 s for this 4 s file (its first
    frames are silence at 8 kb/s)."""
    info = probe(fixture("vbr_no_header.mp3"))
    assert info is not None
    assert info.duration == pytest.approx(4.075, abs=0.001)
    # The average over the frames, not the first frame's 8 kb/s.
    frames = fixture("vbr_no_header.mp3").read_bytes()[len(id3_tag_of("vbr_no_header.mp3")):]
    assert info.bitrate == pytest.approx(len(frames) * 8 / info.duration, rel=0.001)


@pytest.mark.parametrize("trailer", [
    b"TAG" + bytes(125),                       # ID3v1
    _id3v2_tag(40_000),                        # an appended ID3v2 tag with a cover image
    _id3v2_tag(40_000) + b"TAG" + bytes(125),
    b"APETAGEX" + bytes(2_000),
])
def test_tags_after_the_frames_are_not_audio(tmp_path: Path, trailer: bytes) -> None:
    """An appended tag used to count as audio at the first frame's bitrate
    (a 40 kB cover art: +40 s at 8 kb/s)."""
    data = fixture("vbr_no_header.mp3").read_bytes()
    path = tmp_path / "tagged.mp3"
    path.write_bytes(data + trailer)
    info = probe(path)
    assert info is not None and info.duration == pytest.approx(4.075, abs=0.001)


def test_junk_and_tags_between_frames_are_skipped(tmp_path: Path) -> None:
    """Two tracks joined, each with its ID3v2 tag (one larger than the
    junk a resync looks through), and a damaged stretch inside the first."""
    tag = id3_tag_of("vbr_no_header.mp3")
    frames = fixture("vbr_no_header.mp3").read_bytes()[len(tag):]
    cut = 0
    while cut < len(frames) // 2:              # to a frame's start near the middle
        cut += mpeg_frame_length(frames[cut:cut + 4])
    damaged = frames[:cut] + b"\x00" * 300 + frames[cut:]
    path = tmp_path / "joined.mp3"
    path.write_bytes(tag + damaged + _id3v2_tag(20_000) + frames)
    info = probe(path)
    assert info is not None and info.duration == pytest.approx(2 * 4.075, abs=0.001)


def test_a_long_mp3_is_counted_then_estimated(tmp_path: Path) -> None:
    """Past _MP3_COUNT_FRAMES frames the rest is taken at the average
    bitrate so far: the same 4 s repeated 1,400 times (218,400 frames)."""
    tag = id3_tag_of("vbr_no_header.mp3")
    frames = fixture("vbr_no_header.mp3").read_bytes()[len(tag):]
    repeats = 1_400
    assert 156 * repeats > mp3._MP3_COUNT_FRAMES
    path = tmp_path / "long.mp3"
    path.write_bytes(tag + frames * repeats)
    info = probe(path)
    assert info is not None
    assert info.duration == pytest.approx(4.075 * repeats, rel=0.002)


# --- WebM, Matroska, AIFF ------------------------------------------------------

def _ebml_element(element_id: int, body: bytes) -> bytes:
    """An EBML element with an 8-byte size (RFC 8794 section 6)."""
    width = (element_id.bit_length() + 7) // 8
    return element_id.to_bytes(width, "big") + (0x01 << 56 | len(body)).to_bytes(8, "big") + body


def test_a_mediarecorder_webm_is_timed_from_its_last_block() -> None:
    """As Chrome's MediaRecorder writes it: a Segment and a Cluster of
    unknown size (all ones), and no Duration. The length is the last
    block's end, less the Opus codec delay and the padding it discards."""
    data = fixture("recorded.webm").read_bytes()
    segment = data.index(bytes.fromhex("18538067"))
    assert data[segment + 4:segment + 12] == b"\x01" + b"\xff" * 7
    cluster = data.index(bytes.fromhex("1f43b675"))
    assert data[cluster + 4:cluster + 6] == b"\x7f\xff"
    assert bytes.fromhex("4489") not in data[segment:cluster]   # no Duration
    info = probe(fixture("recorded.webm"))
    assert info is not None and info.duration == pytest.approx(0.5, abs=0.002)
    assert info.bitrate == round(len(data) * 8 / info.duration)


def test_a_webm_film_is_audio_with_video() -> None:
    info = probe(fixture("video_sound.webm"))
    assert info is not None and info.with_video
    assert (info.codec, info.sample_rate, info.channels) == ("opus", 48000, 1)
    assert info.duration == pytest.approx(0.3, abs=0.03)
    assert info.bitrate is None   # the file's rate would be the film's
    sound = probe(fixture("tone.webm"))
    assert sound is not None and not sound.with_video


def _without_duration(name: str) -> bytes:
    """A Matroska fixture whose Info/Duration (ID 44 89) is renamed to an
    unknown element that readers skip."""
    data = bytearray(fixture(name).read_bytes())
    info = data.index(bytes.fromhex("1549a966"))
    at = data.index(bytes.fromhex("448988"), info)
    data[at:at + 2] = b"\x4f\xab"
    return bytes(data)


@pytest.mark.parametrize("name", ["tone_flac.mka", "tone.webm"])
def test_matroska_without_a_duration_is_timed_from_its_tail(tmp_path: Path, name: str) -> None:
    # FLAC frames state no length here: the last block lasts as long as the
    # step from the one before.
    path = tmp_path / name
    path.write_bytes(_without_duration(name))
    info = probe(path)
    assert info is not None and info.codec == PROBED[name].codec
    assert info.duration == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("fraction", [0.4, 0.7])
def test_a_cut_recording_reports_what_is_left(tmp_path: Path, fraction: float) -> None:
    data = fixture("recorded.webm").read_bytes()
    cut = tmp_path / "cut.webm"
    cut.write_bytes(data[:int(len(data) * fraction)])
    info = probe(cut)
    cluster = data.index(bytes.fromhex("1f43b675"))
    # About as much as the share of the Cluster's bytes left.
    left = (len(data) * fraction - cluster) / (len(data) - cluster)
    assert info is not None and info.codec == "opus"
    assert info.duration == pytest.approx(0.5 * left, abs=0.06)


def test_a_recording_whose_last_cluster_outgrows_256_kib_is_timed(tmp_path: Path) -> None:
    """Chrome records sound alone into Clusters of 32.7 s (400 KB of Opus
    at 100 kb/s); when the last one started more than 256 KiB before the
    end, the duration was null. Here 300 KB of Void inside the last
    Cluster (of unknown size, so it runs on) stand for its blocks."""
    padded = tmp_path / "long_cluster.webm"
    padded.write_bytes(fixture("recorded.webm").read_bytes()
                       + _ebml_element(0xEC, bytes(300_000)))   # a Void
    info = probe(padded)
    assert info is not None and info.duration == pytest.approx(0.5, abs=0.002)


def test_a_recording_whose_last_cluster_is_before_the_tail_has_no_duration(
        tmp_path: Path) -> None:
    """The tail read for the length holds no Cluster start: still Opus in
    WebM, its duration unknown, as an Ogg whose stream ends before the tail."""
    from blobd.audio.matroska import MATROSKA_TAIL
    padded = tmp_path / "padded.webm"
    padded.write_bytes(fixture("recorded.webm").read_bytes()
                       + _ebml_element(0xEC, bytes(MATROSKA_TAIL)))   # a Void
    info = probe(padded)
    assert info is not None and info.codec == "opus" and info.duration is None


# tracks_last.webm's SeekHead entry for its Tracks: SeekID, then the
# 4-byte SeekPosition make.sh wrote.
_TRACKS_SEEK = bytes.fromhex("53ab84 1654ae6b 53ac84")


def _tracks_last(tmp_path: Path, *, position: int | None = None, seek_id: int | None = None,
                 tail: bytes = b"") -> Path:
    """tracks_last.webm with its Tracks' Seek entry changed, and ``tail``
    after it in a Segment now of unknown size (so that it runs on)."""
    data = bytearray(fixture("tracks_last.webm").read_bytes())
    at = data.index(_TRACKS_SEEK)
    if seek_id is not None:
        data[at + 3:at + 7] = seek_id.to_bytes(4, "big")
    if position is not None:
        data[at + 10:at + 14] = position.to_bytes(4, "big")
    segment = data.index(bytes.fromhex("18538067"))
    data[segment + 4:segment + 12] = bytes.fromhex("01ffffffffffffff")
    path = tmp_path / "hostile.webm"
    path.write_bytes(bytes(data) + tail)
    return path


def test_tracks_after_the_clusters_are_found_through_the_seekhead() -> None:
    info = probe(fixture("tracks_last.webm"))
    assert info is not None
    # As tone.webm, the same stream with its Tracks in the usual place.
    assert (info.codec, info.sample_rate, info.channels, info.duration) == \
        ("opus", 48000, 1, probe(fixture("tone.webm")).duration)


_SEGMENT_BODY = 48     # tracks_last.webm: where the Segment's body starts
_SEEK_HEAD = 0x114D9B74


def _seek_head(target: int, position: int) -> bytes:
    seek = _ebml_element(0x53AB, target.to_bytes(4, "big")) + \
        _ebml_element(0x53AC, position.to_bytes(4, "big"))
    return _ebml_element(_SEEK_HEAD, _ebml_element(0x4DBB, seek))


@pytest.mark.parametrize("case", ["past-the-end", "at-the-seekhead", "mid-element",
                                  "seekhead-loop", "seekhead-chain", "huge-tracks"])
def test_hostile_seekheads_get_a_bounded_answer(tmp_path: Path, case: str) -> None:
    """Positions past the end, at another element, a SeekHead that points
    to itself or to one that points to the next, a Tracks claiming 2 GiB:
    None (no Tracks read), a few kilobytes read, whatever they say."""
    end = fixture("tracks_last.webm").stat().st_size - _SEGMENT_BODY
    # Each appended SeekHead is 50 bytes and points to the next one.
    chain = b"".join(_seek_head(_SEEK_HEAD, end + 50 * (i + 1)) for i in range(3000))
    path = {
        "past-the-end": lambda: _tracks_last(tmp_path, position=0xFFFFFFF0),
        "at-the-seekhead": lambda: _tracks_last(tmp_path, position=0),
        "mid-element": lambda: _tracks_last(tmp_path, position=1),
        "seekhead-loop": lambda: _tracks_last(tmp_path, seek_id=_SEEK_HEAD, position=end,
                                              tail=_seek_head(_SEEK_HEAD, end)),
        "seekhead-chain": lambda: _tracks_last(tmp_path, seek_id=_SEEK_HEAD, position=end,
                                               tail=chain),
        "huge-tracks": lambda: _tracks_last(
            tmp_path, position=end,
            tail=bytes.fromhex("1654ae6b 010000007fffffff") + bytes(1 << 20)),
    }[case]()
    assert len(_seek_head(_SEEK_HEAD, 0)) == 50
    with _CountingFile(path) as f:
        assert audio.probe_file(f) is None
        assert f.bytes_read < 64 << 10


@pytest.mark.parametrize("name", ["tone.webm", "tone_flac.mka", "recorded.webm"])
def test_matroska_without_an_audio_track_is_none(tmp_path: Path, name: str) -> None:
    assert probe(fixture(name)) is not None
    data = bytearray(fixture(name).read_bytes())
    track_type = data.index(bytes.fromhex("838102"))   # TrackType: audio
    data[track_type + 2] = 0x11                        # a subtitle track
    path = tmp_path / name
    path.write_bytes(bytes(data))
    assert probe(path) is None


def test_a_compressed_aifc_is_timed_by_its_frames(tmp_path: Path) -> None:
    """mu-law in AIFF-C: COMM states 16 bits a sample, the data is 8."""
    data = bytearray(fixture("tone_sowt.aifc").read_bytes())
    comm = data.index(b"COMM") + 8
    assert data[comm + 18:comm + 22] == b"sowt"
    data[comm + 18:comm + 22] = b"ulaw"
    ssnd = data.index(b"SSND")
    frames = int.from_bytes(data[comm + 2:comm + 6], "big")
    body = data[ssnd + 16:ssnd + 16 + frames]   # one byte a frame now
    data[ssnd + 4:ssnd + 8] = (8 + len(body)).to_bytes(4, "big")
    path = tmp_path / "ulaw.aifc"
    path.write_bytes(bytes(data[:ssnd + 16]) + body)
    info = probe(path)
    assert info is not None and info.codec == "mulaw"
    assert info.duration == pytest.approx(0.3) and info.bitrate == 64_000


@pytest.mark.parametrize("name, content", [
    ("ebml-only.webm", bytes.fromhex("1a45dfa3") + b"\x84\x42\x82\x81w"),
    ("ebml-random.webm", bytes.fromhex("1a45dfa39f4286810142f7810142f2810442f381084282847765626d"
                                       "4287810442858102") + _random_bytes(5, 20_000)),
    ("segment-no-tracks.mka", bytes.fromhex("1a45dfa38c4282886d6174726f736b61")
     + _ebml_element(0x18538067, _ebml_element(0x1549A966, b""))),
    ("form-random.aiff", b"FORM\x00\x01\x00\x00AIFF" + _random_bytes(6, 10_000)),
    ("form-no-comm.aiff", b"FORM\x00\x00\x00\x04AIFF"),
])
def test_new_containers_of_garbage_are_none(tmp_path: Path, name: str, content: bytes) -> None:
    assert probe(fixture("recorded.webm")) is not None and probe(fixture("tone.aiff")) is not None
    path = tmp_path / name
    path.write_bytes(content)
    assert probe(path) is None


def test_a_recording_that_starts_late_is_timed_from_its_first_block(tmp_path: Path) -> None:
    """Timestamps need not start at 0 (a capture of a running stream): the
    length runs from the first block, not from time 0."""
    data = bytearray(fixture("recorded.webm").read_bytes())
    cluster = data.index(bytes.fromhex("1f43b675"))
    assert data[cluster + 6:cluster + 9] == b"\xe7\x81\x00"   # Timestamp 0
    data[cluster + 8] = 100                                    # 100 ms
    path = tmp_path / "late.webm"
    path.write_bytes(bytes(data))
    info = probe(path)
    assert info is not None and info.duration == pytest.approx(0.5, abs=0.002)


# --- bit depth ------------------------------------------------------------------

def _wave_with_valid_bits(tmp_path: Path, valid: int) -> Path:
    """tone_24in32.wav (WAVE_FORMAT_EXTENSIBLE, 32-bit containers) with
    wValidBitsPerSample set to ``valid``."""
    data = bytearray(fixture("tone_24in32.wav").read_bytes())
    at = data.index(b"fmt ") + 8 + 18
    data[at:at + 2] = valid.to_bytes(2, "little")
    path = tmp_path / f"valid{valid}.wav"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("valid, reported", [
    (24, 24), (20, 20), (32, 32),
    # No valid bits stated, or more than the container holds: the
    # container's size (ffprobe says 32, then "unknown").
    (0, 32), (40, 32),
])
def test_wave_reports_its_valid_bits(tmp_path: Path, valid: int, reported: int) -> None:
    info = probe(_wave_with_valid_bits(tmp_path, valid))
    assert info is not None and info.codec == "pcm"
    assert info.bits_per_sample == reported
    assert info.duration == pytest.approx(0.1)   # 4 bytes a sample, whatever is valid


def test_flac_in_mp4_takes_the_bit_depth_of_its_streaminfo(tmp_path: Path) -> None:
    """The 'dfLa' box's STREAMINFO says 16; the sample entry's sample size,
    set here to 24, yields to it."""
    data = bytearray(fixture("flac.mp4").read_bytes())
    entry = data.index(b"fLaC", data.index(b"stsd"))
    # Past the name: 6 reserved bytes, the data reference index, 8 bytes of
    # version, revision and vendor, the channel count; then the sample size.
    at = entry + 4 + 6 + 2 + 8 + 2
    assert data[at:at + 2] == (16).to_bytes(2, "big")
    data[at:at + 2] = (24).to_bytes(2, "big")
    path = tmp_path / "flac24entry.mp4"
    path.write_bytes(data)
    info = probe(path)
    assert info is not None and info.codec == "flac" and info.bits_per_sample == 16
    # Without its 'dfLa' box (renamed), the sample entry's figure stands.
    path.write_bytes(data.replace(b"dfLa", b"dfLx"))
    info = probe(path)
    assert info is not None and info.bits_per_sample == 24


def test_flac_in_matroska_takes_the_bit_depth_of_its_streaminfo(tmp_path: Path) -> None:
    """tone_flac.mka's Audio element says BitDepth 16, as its STREAMINFO in
    CodecPrivate does; a BitDepth of 24 yields to STREAMINFO."""
    data = fixture("tone_flac.mka").read_bytes()
    bit_depth_16 = bytes.fromhex("6264 81 10")
    assert data.count(bit_depth_16) == 1
    path = tmp_path / "flac.mka"
    path.write_bytes(data.replace(bit_depth_16, bytes.fromhex("6264 81 18")))
    info = probe(path)
    assert info is not None and info.codec == "flac" and info.bits_per_sample == 16


def test_a_bit_depth_element_says_nothing_of_opus(tmp_path: Path) -> None:
    """A lossy track's BitDepth, if a muxer writes one, is not reported:
    tone_flac.mka with its codec renamed A_OPUS."""
    data = fixture("tone_flac.mka").read_bytes()
    assert data.count(b"\x86\x86A_FLAC") == 1
    path = tmp_path / "opus.mka"
    path.write_bytes(data.replace(b"\x86\x86A_FLAC", b"\x86\x86A_OPUS"))
    info = probe(path)
    assert info is not None and info.codec == "opus" and info.bits_per_sample is None


# --- WAVE with 64-bit sizes: RF64, BW64 and Sony Wave64 -----------------------
# mutagen reads neither; blobd.audio.wave64 lists their chunks. The
# fixtures' layouts (make.sh): tone_rf64.wav has ds64 at 12 (28 bytes:
# RIFF size at 20, data size at 28, sample count at 36, table length at
# 44), 'fmt ' at 48, 'data' at 96; adpcm_rf64.wav 'fmt ' at 48, 'fact' at
# 76, 'data' at 88. tone.w64 has 'fmt ' at 40, 'data' at 80; adpcm.w64
# 'fmt ' at 40, 'fact' at 88.

# What ffprobe 5.1 says of each (stream codec_name, duration, bit_rate,
# bits_per_sample, sample_rate, channels), and the codec blobd names it.
# ADPCM's stated bit_rate (128000) is the header's byte rate, four times
# the data's; blobd reports the data's, as for RIFF (adpcm.wav).
FFPROBE = {
    "tone_rf64.wav": ("pcm", 0.3, 192_000, 24, 8000, 1),
    "adpcm_rf64.wav": ("adpcm_ima", 1.0205, None, None, 8000, 1),
    "tone.w64": ("pcm", 0.3, 128_000, 16, 8000, 1),
    "adpcm.w64": ("adpcm_ima", 1.0205, None, None, 8000, 1),
}


@pytest.mark.parametrize("name", sorted(FFPROBE))
def test_rf64_and_w64_agree_with_ffprobe(name: str) -> None:
    codec, duration, bitrate, bits, rate, channels = FFPROBE[name]
    info = probe(fixture(name))
    assert info is not None
    assert (info.codec, info.sample_rate, info.channels, info.bits_per_sample) == (
        codec, rate, channels, bits)
    assert info.duration == pytest.approx(duration, abs=0.001)
    if bitrate is not None:
        assert info.bitrate == bitrate
    else:
        # 4096 bytes of data over 8164 frames at 8 kHz.
        assert info.bitrate == round(4096 * 8 / (8164 / 8000))


def test_bw64_is_read_as_rf64(tmp_path: Path) -> None:
    data = fixture("tone_rf64.wav").read_bytes()
    path = tmp_path / "tone.bw64"
    path.write_bytes(b"BW64" + data[4:])
    assert sniff_mime(path.read_bytes()[:64]) == "audio/wav"
    assert probe(path) == probe(fixture("tone_rf64.wav")) is not None


def test_rf64_takes_its_sizes_from_ds64(tmp_path: Path) -> None:
    """The data chunk's 32-bit size says FFFFFFFF: the length comes from
    ds64's data size, which a smaller value shows (and which a 32-bit size
    that is not FFFFFFFF would not consult)."""
    data = bytearray(fixture("tone_rf64.wav").read_bytes())
    assert data[100:104] == b"\xff\xff\xff\xff"
    data[28:36] = struct.pack("<Q", 2400)   # 800 samples of 3 bytes: 0.1 s
    path = tmp_path / "short.wav"
    path.write_bytes(data)
    info = probe(path)
    assert info is not None and info.duration == 0.1


def _patched(tmp_path: Path, name: str, patches: dict[int, bytes],
             tail: bytes = b"") -> Path:
    data = bytearray(fixture(name).read_bytes())
    for at, value in patches.items():
        data[at:at + len(value)] = value
    path = tmp_path / f"hostile-{name}"
    path.write_bytes(bytes(data) + tail)
    return path


_Q = lambda n: struct.pack("<Q", n)   # noqa: E731
_I = lambda n: struct.pack("<I", n)   # noqa: E731
EXA = 1 << 62


# (fixture, patches, what the probe reports: a duration, or None)
HOSTILE = {
    # ds64 claims an exabyte of data: the bytes present bound it.
    "rf64-exabyte-data": ("tone_rf64.wav", {28: _Q(EXA)}, 0.3),
    "rf64-exabyte-riff": ("tone_rf64.wav", {20: _Q(EXA)}, 0.3),
    # ds64 claims 2^62 samples of ADPCM: 18,000 years, not audio.
    "rf64-exabyte-samples": ("adpcm_rf64.wav", {36: _Q(EXA)}, None),
    # ds64's table claims 2^32 - 1 entries; it holds none.
    "rf64-endless-table": ("tone_rf64.wav", {44: _I(0xFFFFFFFF)}, 0.3),
    # ds64 claims 4 GiB of its own: 4 KiB of it is read, and nothing
    # follows it in the file.
    "rf64-huge-ds64": ("tone_rf64.wav", {16: _I(0xFFFFFFFF)}, None),
    # 'fmt ' sized FFFFFFFF and no ds64 entry for it: over the bound on
    # the 'fmt ' read, refused as RIFF's is.
    "rf64-fmt-elsewhere": ("tone_rf64.wav", {52: _I(0xFFFFFFFF)}, None),
    # EBU Tech 3306 puts ds64 first.
    "rf64-no-ds64": ("tone_rf64.wav", {12: b"JUNK"}, None),
    "w64-exabyte-data": ("tone.w64", {96: _Q(EXA)}, 0.3),
    "w64-exabyte-fact": ("adpcm.w64", {112: _Q(EXA)}, None),
    "w64-exabyte-fmt": ("tone.w64", {56: _Q(EXA)}, None),
    # A chunk smaller than its own header would never move on.
    "w64-zero-chunk": ("tone.w64", {56: _Q(0)}, None),
    "w64-short-chunk": ("tone.w64", {56: _Q(23)}, None),
    # The file's own size is not consulted.
    "w64-exabyte-riff": ("tone.w64", {16: _Q(EXA)}, 0.3),
    # 'fmt ' cut below a WAVEFORMATEX.
    "w64-tiny-fmt": ("tone.w64", {56: _Q(24 + 8)}, None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_rf64_and_w64_headers_get_a_bounded_answer(tmp_path: Path, case: str) -> None:
    name, patches, duration = HOSTILE[case]
    path = _patched(tmp_path, name, patches)
    with open(path, "rb") as f:
        head = f.read(64)
        # The readers themselves, not the probe that catches what they raise.
        reader = wave64.read_w64 if name.endswith(".w64") else wave64.read_rf64
        info = reader(f, 0, head)
    probed = probe(path)
    if duration is None:
        assert probed is None
        assert info is None or not 0 < (info.duration or 0) <= 31 * 24 * 3600
    else:
        assert probed == info is not None
        assert info.duration == pytest.approx(duration, abs=0.001)


class _CountingFile(io.FileIO):
    """A file that counts the bytes read from it."""

    bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


@pytest.mark.parametrize("case", ["rf64-huge-ds64", "w64-exabyte-fmt", "rf64-exabyte-data",
                                  "w64-exabyte-data"])
def test_hostile_sizes_do_not_make_the_probe_read_them(tmp_path: Path, case: str) -> None:
    """A megabyte follows each header, where a reader trusting the sizes
    would read on; the probe reads a few kilobytes whatever they say."""
    name, patches, _ = HOSTILE[case]
    path = _patched(tmp_path, name, patches, tail=bytes(1 << 20))
    with _CountingFile(path) as f:
        audio.probe_file(f)
        assert f.bytes_read < 16 << 10


@pytest.mark.parametrize("seed", range(40))
def test_damaged_rf64_and_w64_headers_never_raise(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    name = sorted(FFPROBE)[seed % len(FFPROBE)]
    data = bytearray(fixture(name).read_bytes())
    for _ in range(rng.choice([1, 4, 16])):
        # The headers, past the magic that picks the reader.
        at = rng.randrange(12 if name.endswith(".wav") else 40, 128)
        data[at] = rng.randrange(256)
    damaged = tmp_path / name
    damaged.write_bytes(data[:rng.randrange(64, len(data) + 1)])
    reader = wave64.read_w64 if name.endswith(".w64") else wave64.read_rf64
    with open(damaged, "rb") as f:
        info = reader(f, 0, bytes(data[:64]))   # the assertion is that this returns
    assert info is None or info.mime in AUDIO_MIME_TYPES


# --- AC-3 and E-AC-3 ---------------------------------------------------------

# ffprobe 5.1 on each fixture: codec_name, format duration, bit_rate,
# sample_rate, channels (5.1(side) is 6).
AC3_FFPROBE = {
    "tone.ac3": ("ac3", 0.313333, 96_000, 44100, 2),
    "tone_51.ac3": ("ac3", 0.32, 192_000, 48000, 6),
    "tone_51.eac3": ("eac3", 0.32, 192_000, 48000, 6),
}


@pytest.mark.parametrize("name", sorted(AC3_FFPROBE))
def test_ac3_agrees_with_ffprobe(name: str) -> None:
    """Found when they were added: mutagen's AC-3 reader calls 5.1 five
    channels (it skips two of the four mix level bits before lfeon)."""
    codec, duration, bitrate, rate, channels = AC3_FFPROBE[name]
    info = probe(fixture(name))
    assert info is not None
    assert (info.codec, info.bitrate, info.sample_rate, info.channels,
            info.bits_per_sample) == (codec, bitrate, rate, channels, None)
    assert info.duration == pytest.approx(duration, abs=0.001)


def _ac3_header(bsid: int = 8, fscod: int = 0, frmsizecod: int = 20, acmod: int = 7,
                lfe: int = 1) -> bytes:
    """An AC-3 frame header (A/52 5.4.1): syncword, CRC, fscod and
    frmsizecod, bsid and bsmod, then acmod, the 2-bit mix levels acmod
    has (zero), lfeon, left-aligned in two bytes."""
    levels = sum(map(bool, (acmod & 1 and acmod != 1, acmod & 4, acmod == 2)))
    fields = (acmod << (2 * levels) << 1 | lfe) << (16 - 3 - 2 * levels - 1)
    return (b"\x0b\x77\x12\x34" + bytes([fscod << 6 | frmsizecod, bsid << 3])
            + fields.to_bytes(2, "big"))


@pytest.mark.parametrize("head, mime", [
    (_ac3_header(), "audio/ac3"),
    (_ac3_header(bsid=6, acmod=2, lfe=0), "audio/ac3"),     # Annex D's alternate syntax
    (_ac3_header(fscod=3), None),                           # reserved sample rate
    (_ac3_header(frmsizecod=38), None),                     # past the table
    (_ac3_header(bsid=9), None),                            # in no standard
    (_ac3_header(bsid=17), None),
    (fixture("tone_51.eac3").read_bytes()[:64], "audio/eac3"),
    (b"\x0b\x77" + fixture("tone_51.eac3").read_bytes()[2:4] + b"\xf0\x80", None),  # fscod2 3
    (b"\x0b\x77\xc0\x00\x30\x80\x00\x00", None),            # stream type 3: reserved
    (b"\x0b\x77\x40\x00\x30\x80\x00\x00", None),            # a dependent frame first
    (b"\x0b\x77\x12\x34\x14", None),                         # cut before bsid
])
def test_sniff_mime_ac3_header(head: bytes, mime: str | None) -> None:
    assert sniff_mime(head) == mime


def test_ac3_header_fields_are_read() -> None:
    frame = ac3_frame(_ac3_header())
    assert frame is not None
    assert (frame.size, frame.sample_rate, frame.channels, frame.bitrate) == (
        768, 48000, 6, 192_000)
    # 3/0 has a centre mix level and no surround one; 2/0 a Dolby surround mode.
    for acmod, channels in ((3, 3), (2, 2), (1, 1), (0, 2), (6, 4)):
        for lfe in (0, 1):
            frame = ac3_frame(_ac3_header(acmod=acmod, lfe=lfe))
            assert frame is not None and frame.channels == channels + lfe, (acmod, lfe)
    # 44.1 kHz: the low bit of frmsizecod adds a word (A/52 table 5.18).
    assert [ac3_frame(_ac3_header(fscod=1, frmsizecod=c)).size for c in (0, 1, 36, 37)] == [
        138, 140, 2786, 2788]
    assert ac3_frame(_ac3_header(fscod=2, frmsizecod=37)).size == 3840


def _text_as_ac3(size: int = 4096) -> bytes:
    """Text whose first bytes pass for an AC-3 header: a vertical tab, a
    "w", then two letters and "@@": fscod 1, frmsizecod 0, bsid 8."""
    text = b"\x0b\x77ho@@ reads this? " + b"Plain words, not frames. " * 200
    assert sniff_mime(text[:64]) == "audio/ac3"   # the head alone cannot tell
    return text[:size]


def test_text_and_noise_starting_with_the_ac3_syncword_are_not_ac3(tmp_path: Path) -> None:
    text = _text_as_ac3()
    assert sniff_mime(text) is None      # no second frame where the first ends
    assert not audio.could_be_audio(text)
    path = tmp_path / "note.txt"
    path.write_bytes(text)
    assert probe(path) is None
    rng = random.Random(4184)
    for _ in range(2000):
        noise = b"\x0b\x77" + rng.randbytes(8190)
        assert sniff_mime(noise) is None
        assert not audio.could_be_audio(noise)


@pytest.mark.parametrize("name", sorted(AC3_FFPROBE))
def test_ac3_cut_and_damaged_give_a_bounded_answer(tmp_path: Path, name: str) -> None:
    data = fixture(name).read_bytes()
    path = tmp_path / name
    ends = [0]     # where each frame ends
    while ends[-1] < len(data):
        ends.append(ends[-1] + ac3_frame(data[ends[-1]:ends[-1] + 8]).size)
    # Whole frames ending the file are a (short) stream; a file cut
    # within the first four frames is not (its last frame plays nothing,
    # and bytes that merely start like AC-3 look the same); past them, a
    # cut stream is timed by the bytes it has.
    for cut, is_audio in ((7, False), (100, False), (ends[1], True), (ends[1] + 1, False),
                          (ends[2], True), (ends[2] + 100, False), (ends[3] + 10, True),
                          (len(data) - 1, True)):
        path.write_bytes(data[:cut])
        info = probe(path)
        assert (info is not None) == is_audio, cut
        assert audio.could_be_audio(data[:cut]) == is_audio, cut
        if info is not None:
            assert info.duration <= AC3_FFPROBE[name][1] + 0.001, cut
    # A chain of frames, then a megabyte of anything: the probe reads a
    # few frames whatever follows, and (as ffprobe) times the bytes at the
    # stream's bitrate, the frames unread.
    path.write_bytes(data + bytes(1 << 20))
    with _CountingFile(path) as f:
        info = audio.probe_file(f)
        assert f.bytes_read < 128 << 10
    bitrate = AC3_FFPROBE[name][2]
    assert info is not None
    assert info.duration == round((len(data) + (1 << 20)) * 8 / bitrate, 3)
    rng = random.Random(len(data))
    for _ in range(200):
        damaged = bytearray(data)
        for _ in range(rng.choice([1, 4, 16])):
            damaged[rng.randrange(2, 64)] = rng.randrange(256)
        path.write_bytes(damaged)
        info = probe(path)
        assert info is None or info.mime in AUDIO_MIME_TYPES


def test_a_one_frame_ac3_clip_is_audio_and_a_cut_one_is_not(tmp_path: Path) -> None:
    data = fixture("tone_51.ac3").read_bytes()
    path = tmp_path / "blip.ac3"
    path.write_bytes(data[:768])
    info = probe(path)
    assert info is not None and info.duration == 0.032 and info.channels == 6
    assert audio.could_be_audio(data[:768])
    path.write_bytes(data[:767])
    assert probe(path) is None and not audio.could_be_audio(data[:767])


def test_ac3_behind_an_id3_tag_is_ac3(tmp_path: Path) -> None:
    """As ffprobe reads it (0.313 s): the tag is not audio."""
    data = id3_tag_of("id3_tone.wav") + fixture("tone.ac3").read_bytes()
    path = tmp_path / "tagged.ac3"
    path.write_bytes(data)
    assert sniff_mime(data[:64]) == "audio/ac3"
    info = probe(path)
    assert info is not None
    assert (info.mime, info.codec, info.channels) == ("audio/ac3", "ac3", 2)
    assert info.duration == pytest.approx(0.313, abs=0.001)


# --- Dolby and PCM in MP4 -------------------------------------------------------

def _box_at(data: bytes, name: bytes) -> int:
    """Offset of the body of the only box ``name`` in ``data``."""
    assert data.count(name) == 1, name
    return data.index(name) + 4


@pytest.mark.parametrize("size, channels", [
    (8, 2),             # an empty dec3: the sample entry's count stands
    (11, 2),            # cut before acmod and lfeon
    (0xFFFF_FFFF, 6),   # claiming more than its stsd: read to the stsd's end
])
def test_a_dec3_box_cut_or_lying_gives_a_bounded_answer(tmp_path: Path, size: int,
                                                        channels: int) -> None:
    data = bytearray(fixture("tone_51_eac3.mp4").read_bytes())
    at = _box_at(data, b"dec3") - 8
    data[at:at + 4] = size.to_bytes(4, "big")
    path = tmp_path / "lying.mp4"
    path.write_bytes(data)
    info = probe(path)
    assert info is not None and (info.codec, info.channels) == ("eac3", channels)


@pytest.mark.parametrize("field, value, result", [
    (32, struct.pack(">d", float("nan")), None),      # the rate: no number
    (32, struct.pack(">d", 1e300), None),             # the rate: no real one
    (40, (0xFFFF_FFFF).to_bytes(4, "big"), None),     # channels: 4 billion
    (48, bytes(4), "no bit depth"),                   # bits per channel: 0
])
def test_hostile_lpcm_entries_give_a_bounded_answer(tmp_path: Path, field: int, value: bytes,
                                                    result: str | None) -> None:
    """A version 2 'lpcm' entry's fields, from the end of its 8-byte header."""
    data = bytearray(fixture("tone_lpcm.mp4").read_bytes())
    at = _box_at(data, b"lpcm") + field
    data[at:at + len(value)] = value
    path = tmp_path / "lpcm.mp4"
    path.write_bytes(data)
    info = probe(path)
    if result is None:
        assert info is None
    else:
        assert info is not None and info.bits_per_sample is None
        assert (info.sample_rate, info.channels) == (96000, 1)


def test_an_lpcm_entry_cut_short_is_not_read_as_pcm(tmp_path: Path) -> None:
    """Its size says it ends before its version 2 fields: the placeholders
    mutagen reads (a rate of 1 Hz) are no stream."""
    data = bytearray(fixture("tone_lpcm.mp4").read_bytes())
    at = _box_at(data, b"lpcm") - 8
    data[at:at + 4] = (8 + 40).to_bytes(4, "big")
    path = tmp_path / "cut.mp4"
    path.write_bytes(data)
    assert probe(path) is None


# --- one sample frame -------------------------------------------------------------

def test_a_wav_of_one_sample_frame_lasts_one_over_its_rate() -> None:
    info = probe(fixture("one_sample.wav"))
    assert info is not None and info.duration == 0.000125
    assert info.to_json()["duration"] == 0.000125


def test_a_wav_of_no_sample_frame_is_not_audio(tmp_path: Path) -> None:
    """The guard that a duration of 0 fails still holds: a header with an
    empty 'data' chunk is no stream."""
    data = bytearray(fixture("one_sample.wav").read_bytes())
    at = data.index(b"data") + 4
    data[at:at + 4] = bytes(4)
    data[4:8] = (len(data) - 2 - 8).to_bytes(4, "little")
    path = tmp_path / "empty.wav"
    path.write_bytes(data[:-2])
    assert probe(path) is None


# --- a sniff past long ID3 tags ---------------------------------------------------------

def test_sniff_file_sees_the_format_behind_a_tag_longer_than_the_head() -> None:
    path = fixture("id3_long_cut.flac")
    assert sniff_mime(path.read_bytes()[:64]) == "audio/mpeg"
    with path.open("rb") as f:
        assert audio.sniff_file(f) == "audio/flac"
    assert probe(path) is None      # damaged: only the type is known


@pytest.mark.parametrize("inner, mime", [("tone.flac", "audio/flac"),
                                         ("tone.wav", "audio/wav"),
                                         ("tone.aiff", "audio/aiff"),
                                         ("tone.ogg", "audio/mpeg"),   # not behind a tag
                                         ("not_audio.txt", "audio/mpeg")])
def test_sniff_file_reads_no_more_for_a_tag_of_megabytes(tmp_path: Path, inner: str,
                                                         mime: str) -> None:
    """A tag of 4 MiB (cover art) costs its header and 64 bytes after it."""
    body = 4 << 20
    tag = b"ID3\x03\x00\x00" + bytes([(body >> s) & 0x7F for s in (21, 14, 7, 0)])
    path = tmp_path / "cover.bin"
    path.write_bytes(tag + bytes(body) + fixture(inner).read_bytes())
    with _CountingFile(path) as f:
        assert audio.sniff_file(f) == mime
        assert f.bytes_read < 1024


@pytest.mark.parametrize("case", ["past-the-end", "stacked", "cut-header"])
def test_sniff_file_of_hostile_tags_is_mpeg(tmp_path: Path, case: str) -> None:
    """As the head's sniff says: a tag that claims more than the file, more
    tags than any file has, a header cut off."""
    huge = b"ID3\x03\x00\x00\x7f\x7f\x7f\x7f"
    small = b"ID3\x03\x00\x00\x00\x00\x00\x00"
    data = {"past-the-end": huge + fixture("tone.flac").read_bytes()[:100],
            "stacked": small * 100 + fixture("tone.flac").read_bytes()[:100],
            "cut-header": b"ID3\x03\x00"}[case]
    path = tmp_path / "tags.bin"
    path.write_bytes(data)
    with path.open("rb") as f:
        assert audio.sniff_file(f) == "audio/mpeg"
    assert probe(path) is None


# --- chained Ogg ------------------------------------------------------------------

def test_a_chain_longer_than_the_tail_has_no_duration(tmp_path: Path) -> None:
    """A link starts in the tail: the links before it cannot be timed
    without reading the file through, so neither the length nor the rate
    over it is given (it was the first link's 2.0 s, a 1 Mb/s rate)."""
    path = tmp_path / "radio.opus"
    path.write_bytes(fixture("long.opus").read_bytes() + fixture("tone.opus").read_bytes())
    assert path.stat().st_size > OGG_TAIL
    info = probe(path)
    assert info is not None and (info.duration, info.bitrate) == (None, None)
    assert (info.codec, info.channels) == ("opus", 1)


def test_a_chain_with_a_link_of_another_codec_has_no_duration(tmp_path: Path) -> None:
    data = fixture("chained.opus").read_bytes()
    second = data.index(b"OpusHead", data.index(b"OpusHead") + 1)
    path = tmp_path / "odd.opus"
    path.write_bytes(data[:second] + b"SpeexHed" + data[second + 8:])
    info = probe(path)
    assert info is not None and info.duration is None


@pytest.mark.parametrize("seed", range(20))
def test_damaged_chains_never_raise(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    data = bytearray(fixture(rng.choice(["chained.opus", "chained.ogg"])).read_bytes())
    for _ in range(rng.randrange(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    path = tmp_path / "damaged.ogg"
    path.write_bytes(data[:rng.randrange(len(data) // 2, len(data) + 1)])
    info = probe(path)
    assert info is None or info.duration is None or 0 < info.duration < 2

"""The audio fixtures in tests/fixtures/audio and what each one holds.

Shared by the probe tests (test_audio), the HTTP tests (test_describe) and
the browser test (test_player). The files were made by make.sh there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mutagen.ogg import OggPage

FIXTURES = Path(__file__).parent / "fixtures" / "audio"


@dataclass(frozen=True)
class Expected:
    mime: str
    codec: str
    duration: float          # seconds of audio generated
    sample_rate: int
    channels: int
    bitrate: tuple[int, int]  # plausible range, bits per second
    # The bit depth the header states (ffprobe's bits_per_raw_sample, else
    # its bits_per_sample); None for lossy and compressed codecs.
    bits_per_sample: int | None


AUDIO_FIXTURES = {
    "tone.mp3": Expected("audio/mpeg", "mp3", 2.0, 22050, 1, (31_000, 33_000), None),
    "tone.m4a": Expected("audio/mp4", "aac", 2.0, 44100, 2, (24_000, 40_000), None),
    "tone_mono.m4a": Expected("audio/mp4", "aac", 2.0, 44100, 1, (24_000, 40_000), None),
    # Lossless, so well under the uncompressed 128 kb/s mutagen reports.
    "tone_alac.m4a": Expected("audio/mp4", "alac", 2.0, 8000, 1, (8_000, 100_000), 16),
    "tone.3gp": Expected("audio/3gpp", "aac", 1.0, 8000, 1, (12_000, 24_000), None),
    "tone.3g2": Expected("audio/3gpp2", "aac", 0.5, 8000, 1, (12_000, 30_000), None),
    "tone.aac": Expected("audio/aac", "aac", 2.0, 22050, 1, (24_000, 40_000), None),
    "tone.ogg": Expected("audio/ogg", "vorbis", 2.0, 22050, 2, (16_000, 64_000), None),
    "tone.opus": Expected("audio/opus", "opus", 2.0, 48000, 2, (16_000, 48_000), None),
    # Longer than the tail read for its length: the bitrate is still the
    # whole file's (it was the tail's, 34.6 kb/s; found by review).
    "long.opus": Expected("audio/opus", "opus", 60.0, 48000, 1, (41_000, 46_000), None),
    "tone.flac": Expected("audio/flac", "flac", 2.0, 8000, 1, (20_000, 128_000), 16),
    "tone_flac.ogg": Expected("audio/ogg", "flac", 2.0, 8000, 1, (20_000, 128_000), 16),
    "tone.wav": Expected("audio/wav", "pcm", 1.5, 8000, 1, (128_000, 128_000), 16),
    "sweep.mp3": Expected("audio/mpeg", "mp3", 8.0, 22050, 1, (31_000, 33_000), None),
    # No header states its length: counted from its frames (mutagen alone
    # says 10.8 s, the file's size at the first, silent frame's 8 kb/s).
    "vbr_no_header.mp3": Expected("audio/mpeg", "mp3", 4.0, 22050, 1, (16_000, 32_000), None),
    # FLAC bytes under an .mp3 name: the bytes decide.
    "flac_named.mp3": Expected("audio/flac", "flac", 2.0, 8000, 1, (20_000, 128_000), 16),
    # Info/Duration says 0.508 s (as ffprobe), the Opus codec delay in it;
    # 0.500 s decode. The whole file's rate.
    "tone.webm": Expected("audio/webm", "opus", 0.5, 48000, 1, (24_000, 36_000), None),
    # As MediaRecorder writes it: no Duration, Segment and Cluster of
    # unknown size; timed from its last block (it was not audio, and
    # refused under require_audio).
    "recorded.webm": Expected("audio/webm", "opus", 0.5, 48000, 1, (24_000, 36_000), None),
    "tone_flac.mka": Expected("audio/matroska", "flac", 0.5, 8000, 1, (20_000, 128_000), 16),
    "tone.aiff": Expected("audio/aiff", "pcm", 0.3, 8000, 1, (128_000, 128_000), 16),
    # Sony Wave64 (sox), its own type. ffprobe: pcm_s16le, 0.300 s, 128 kb/s,
    # 16 bits.
    "tone.w64": Expected("audio/x-w64", "pcm", 0.3, 8000, 1, (128_000, 128_000), 16),
    # Raw AC-3 and E-AC-3 (they were application/octet-stream, not audio).
    # ffprobe: ac3, 0.313 s (its bytes at its bitrate, as blobd), 96 kb/s,
    # stereo; ac3 and eac3, 0.320 s, 192 kb/s, 6 channels (5.1(side)).
    "tone.ac3": Expected("audio/ac3", "ac3", 0.313, 44100, 2, (96_000, 96_000), None),
    "tone_51.ac3": Expected("audio/ac3", "ac3", 0.32, 48000, 6, (192_000, 192_000), None),
    "tone_51.eac3": Expected("audio/eac3", "eac3", 0.32, 48000, 6, (192_000, 192_000), None),
}
# Probed only: formats outside what the HTTP and browser tests exercise per
# fixture (Chromium plays no ADPCM).
PROBE_ONLY_FIXTURES = {
    # Four bits a sample in blocks of many: the 'fact' chunk says how long
    # (mutagen's block-align reckoning said 0.006 s; found by review). The
    # data's rate, ~32 kb/s; the header's byte rate claims 128.
    "adpcm.wav": Expected("audio/wav", "adpcm_ima", 1.02, 8000, 1, (30_000, 34_000), None),
    # WAVE_FORMAT_EXTENSIBLE whose SubFormat is IEEE float (it was "pcm").
    "float.wav": Expected("audio/wav", "pcm_float", 0.2, 8000, 1, (256_000, 256_000), 32),
    # MP3 in MP4: the sample entry says 2 channels, the frames 1 (it was 2).
    "mp3_mono.mp4": Expected("audio/mp4", "mp3", 1.0, 16000, 1, (7_000, 10_000), None),
    # FLAC in MP4: no esds states a bitrate (it was null), the bytes do.
    "flac.mp4": Expected("audio/mp4", "flac", 0.5, 8000, 1, (20_000, 128_000), 16),
    # Vorbis whose header states no bitrate (libvorbis at 96 kHz): the
    # file's, its 4 KB of codebooks included (it was null).
    "tone_96k.ogg": Expected("audio/ogg", "vorbis", 0.2, 96000, 1, (20_000, 400_000), None),
    # AIFF-C: 'sowt' is little-endian PCM, 'fl32' float (as WAVE names it).
    "tone_sowt.aifc": Expected("audio/aiff", "pcm", 0.3, 8000, 1, (128_000, 128_000), 16),
    "tone_float.aifc": Expected("audio/aiff", "pcm_float", 0.2, 8000, 1, (256_000, 256_000), 32),
    # 'ima4': COMM counts 34-byte packets of 64 samples, not samples (0.32 s
    # was 0.005 s; found by review against ffprobe).
    "tone_ima4.aifc": Expected("audio/aiff", "adpcm_ima", 0.32, 8000, 1, (33_000, 35_000), None),
    # Bit depths other than 16 (ffprobe agrees on each; see make.sh).
    "tone_u8.wav": Expected("audio/wav", "pcm", 0.1, 8000, 1, (64_000, 64_000), 8),
    # 8-bit codes of wider samples: no bit depth (ffprobe says 8, the code's).
    "tone_alaw.wav": Expected("audio/wav", "alaw", 0.1, 8000, 1, (64_000, 64_000), None),
    # WAVE_FORMAT_EXTENSIBLE: 24 valid bits in 32-bit containers. The valid
    # bits; ffmpeg 5.1's ffprobe takes the file for 24-bit float, 0.133 s.
    "tone_24in32.wav": Expected("audio/wav", "pcm", 0.1, 8000, 1, (256_000, 256_000), 24),
    "tone_24.flac": Expected("audio/flac", "flac", 0.1, 8000, 1, (20_000, 192_000), 24),
    "tone_24.aiff": Expected("audio/aiff", "pcm", 0.1, 8000, 1, (192_000, 192_000), 24),
    "tone_alac24.m4a": Expected("audio/mp4", "alac", 0.1, 8000, 1, (20_000, 256_000), 24),
    "tone_pcm24.mka": Expected("audio/matroska", "pcm", 0.1, 8000, 1, (192_000, 256_000), 24),
    # WAVE with 64-bit sizes (mutagen reads neither). ffprobe: pcm_s24le,
    # 0.300 s, 192 kb/s, 24 bits; adpcm_ima_wav, 1.0205 s (the ds64 sample
    # count: 'fact' says FFFFFFFF), the data's ~32.1 kb/s.
    "tone_rf64.wav": Expected("audio/wav", "pcm", 0.3, 8000, 1, (192_000, 192_000), 24),
    "adpcm_rf64.wav": Expected("audio/wav", "adpcm_ima", 1.02, 8000, 1, (32_000, 32_200), None),
    # Tracks after the Clusters, found through the SeekHead (it was not
    # audio). ffprobe: opus, 0.508 s, as tone.webm.
    "tracks_last.webm": Expected("audio/webm", "opus", 0.5, 48000, 1, (24_000, 36_000), None),
    # Behind a leading ID3v2 tag: the format after it, as ffprobe reads
    # each (the WAV and AIFF were not audio, and all three were sniffed as
    # audio/mpeg).
    "id3_tone.wav": Expected("audio/wav", "pcm", 0.1, 8000, 1, (128_000, 128_000), 16),
    "id3_tone.aiff": Expected("audio/aiff", "pcm", 0.1, 8000, 1, (128_000, 128_000), 16),
    "id3_tone.flac": Expected("audio/flac", "flac", 0.1, 8000, 1, (20_000, 800_000), 16),
    # Sony Wave64, its own type. ffprobe: adpcm_ima_wav, 1.0205 s (its
    # 64-bit 'fact').
    "adpcm.w64": Expected("audio/x-w64", "adpcm_ima", 1.02, 8000, 1, (32_000, 32_200), None),
    # Dolby 5.1 in MP4. E-AC-3's channels come from its 'dec3' box (the
    # sample entry's 2 were reported), its bitrate from the box's
    # data_rate (the file's 212.6 kb/s was); AC-3's 'dac3' was read right.
    # ffprobe: eac3 and ac3, 6 channels, 192 kb/s, 0.315 s (the file's).
    "tone_51_eac3.mp4": Expected("audio/mp4", "eac3", 0.315, 48000, 6, (192_000, 192_000), None),
    "tone_51_ac3.mp4": Expected("audio/mp4", "ac3", 0.315, 48000, 6, (192_000, 192_000), None),
    # QuickTime PCM sample entries in MP4 (codec 'in24', 'twos', 'fl32' and
    # bits_per_sample null were reported, the file's rate, and an 'lpcm'
    # entry was not audio: its placeholder rate is 1 Hz). ffprobe: pcm_s24le
    # 24 bits, pcm_s16be 16, pcm_f32le 32, pcm_s24le 24 at 96 kHz; the
    # samples' rate (192, 128, 256, 2304 kb/s).
    "tone_in24.mp4": Expected("audio/mp4", "pcm", 0.1, 8000, 1, (192_000, 192_000), 24),
    "tone_twos.mp4": Expected("audio/mp4", "pcm", 0.1, 8000, 1, (128_000, 128_000), 16),
    "tone_fl32.mp4": Expected("audio/mp4", "pcm_float", 0.1, 8000, 1, (256_000, 256_000), 32),
    "tone_lpcm.mp4": Expected("audio/mp4", "pcm", 0.02, 96000, 1, (2_304_000, 2_304_000), 24),
    # WavPack in Matroska: the BitDepth element (it was null, and the codec
    # "wavpack4"). ffprobe: wavpack, bits_per_raw_sample 16.
    "tone_wavpack.mka": Expected("audio/matroska", "wavpack", 0.1, 8000, 1, (20_000, 128_000), 16),
    # One sample frame: 1/8000 s, kept to the microsecond (rounded to
    # milliseconds it was 0, and the file not audio). ffprobe: 0.000125 s.
    "one_sample.wav": Expected("audio/wav", "pcm", 0.000125, 8000, 1, (128_000, 128_000), 16),
    # Chained Ogg: the links' lengths summed, as ffmpeg decodes them (0.80
    # s); it was the first link's (0.5 s). ffprobe says 0.3065 s and 0.300
    # s: the last link's, from the file's last page.
    "chained.opus": Expected("audio/opus", "opus", 0.8, 48000, 1, (20_000, 26_000), None),
    "chained.ogg": Expected("audio/ogg", "vorbis", 0.8, 22050, 1, (30_000, 50_000), None),
}
NOT_AUDIO_FIXTURES = ["not_audio.txt", "not_audio.png", "video_only.mp4", "video_only.webm"]
# What Chromium cannot play whatever the Content-Type: ALAC, AIFF, W64,
# and AC-3 and E-AC-3 (Dolby's codecs, outside its open-source builds).
CHROMIUM_CANNOT_PLAY = frozenset({"tone_alac.m4a", "tone.aiff", "tone.w64",
                                  "tone.ac3", "tone_51.ac3", "tone_51.eac3"})


def fixture(name: str) -> Path:
    return FIXTURES / name


def ogg_without_end(tmp_path: Path, filler_pages: int) -> Path:
    """tone.ogg with its end-of-stream flag cleared and `filler_pages` tiny
    pages after it, as a live recording cut off might look. mutagen then
    reads every page to find the stream's last one."""
    data = bytearray(fixture("tone.ogg").read_bytes())
    last = data.rindex(b"OggS")
    data[last + 5] &= ~0x04
    page = OggPage()
    with fixture("tone.ogg").open("rb") as f:
        page.serial = OggPage(f).serial
    page.position = 44_100   # 2.0 s at 22050 Hz, as the real last page
    page.packets = [b"x"]
    path = tmp_path / f"open-ended-{filler_pages}.ogg"
    path.write_bytes(bytes(data) + page.write() * filler_pages)
    return path

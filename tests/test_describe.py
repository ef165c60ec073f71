"""What blobd records about a blob at commit, against a real app and disk:
the content type from the bytes, the audio facts in /meta and the listing,
and the [audio] require_audio gate."""

from __future__ import annotations

import json
import os

import pytest

from audiofixtures import AUDIO_FIXTURES, PROBE_ONLY_FIXTURES, fixture, ogg_without_end
from conftest import Api, b3, blob_files, make_config, tmp_files
from rawhttp import RawConnection
from blobd import auth, index
from blobd.http.app import create_app
from blobd.http.keys import STORE
from blobd.sniff import AUDIO_MIME_TYPES

OCTET = "application/octet-stream"
TEXT = fixture("not_audio.txt").read_bytes()


async def meta_of(api: Api, digest: str) -> dict:
    resp = await api.request("GET", f"/blobs/{digest}/meta")
    assert resp.status == 200
    return await resp.json()


async def listing(api: Api) -> list[dict]:
    return (await (await api.request("GET", "/blobs")).json())["blobs"]


async def usage(api: Api) -> dict[str, int]:
    return await index.usage(api.store.db.reader, api.owner)


@pytest.mark.parametrize("name", sorted(AUDIO_FIXTURES))
async def test_each_format_is_probed_at_commit(alice, name):
    data, want = fixture(name).read_bytes(), AUDIO_FIXTURES[name]
    resp = await alice.request("POST", "/blobs", data=data,
                               headers={"Content-Type": OCTET})
    assert resp.status == 201
    assert (await resp.json())["content_type"] == want.mime
    audio = (await meta_of(alice, b3(data)))["audio"]
    assert set(audio) == {"duration", "bitrate", "sample_rate", "channels", "codec",
                          "bits_per_sample"}
    assert audio["bits_per_sample"] == want.bits_per_sample
    assert audio["duration"] == pytest.approx(want.duration, rel=0.10)
    assert (audio["sample_rate"], audio["channels"]) == (want.sample_rate, want.channels)
    assert audio["codec"] == want.codec
    assert want.bitrate[0] <= audio["bitrate"] <= want.bitrate[1]
    [item] = await listing(alice)
    assert item["audio"] == audio and item["content_type"] == want.mime
    # The extension in the URL is decoration; the type comes from the bytes.
    get = await alice.request("GET", f"/blobs/{b3(data)}.mp3")
    assert get.headers["Content-Type"] == want.mime
    assert await get.read() == data
    head = await alice.request("HEAD", f"/blobs/{b3(data)}.ogg")
    assert head.headers["Content-Type"] == want.mime


async def test_ac3_51_through_the_server(alice):
    """A 5.1 soundtrack from a rip, POSTed as a file manager sends it: read
    (it was application/octet-stream, audio null), served as audio/ac3,
    its LFE counted. ffprobe: ac3, 0.320 s, 192 kb/s, 48 kHz, 6 channels."""
    data = fixture("tone_51.ac3").read_bytes()
    resp = await alice.request("POST", "/blobs", data=data, headers={"Content-Type": OCTET})
    assert resp.status == 201 and (await resp.json())["content_type"] == "audio/ac3"
    meta = await meta_of(alice, b3(data))
    assert meta["content_type"] == "audio/ac3"
    assert meta["audio"] == {"duration": 0.32, "bitrate": 192_000, "sample_rate": 48000,
                             "channels": 6, "codec": "ac3", "bits_per_sample": None}
    get = await alice.request("GET", f"/blobs/{b3(data)}")
    assert get.headers["Content-Type"] == "audio/ac3" and await get.read() == data


@pytest.mark.parametrize("name,claim", [
    ("flac_named.mp3", "audio/mpeg"),     # mislabelled: FLAC bytes, an MP3 claim
    ("tone.mp3", "text/plain"),
    ("tone.opus", "audio/ogg"),
    ("tone.wav", "audio/x-wav"),
])
async def test_the_bytes_win_over_the_client(alice, name, claim):
    data = fixture(name).read_bytes()
    resp = await alice.put(data, headers={"Content-Type": claim})
    assert (await resp.json())["content_type"] == AUDIO_FIXTURES[name].mime
    get = await alice.request("GET", f"/blobs/{b3(data)}")
    assert get.headers["Content-Type"] == AUDIO_FIXTURES[name].mime


@pytest.mark.parametrize("name,served", [
    ("tone_rf64.wav", "audio/wav"),
    ("adpcm_rf64.wav", "audio/wav"),
    # A container of its own, whatever the client calls it.
    ("tone.w64", "audio/x-w64"),
])
async def test_a_64_bit_wave_declared_audio_wav_is_read(alice, name, served):
    """Recorders switch to RF64 past 4 GiB (and DAWs write W64); such a
    file was stored as application/octet-stream with no audio facts."""
    data = fixture(name).read_bytes()
    want = (AUDIO_FIXTURES | PROBE_ONLY_FIXTURES)[name]
    resp = await alice.put(data, headers={"Content-Type": "audio/wav"})
    assert resp.status == 201
    assert (await resp.json())["content_type"] == served
    meta = await meta_of(alice, b3(data))
    assert meta["content_type"] == served
    audio = meta["audio"]
    assert (audio["codec"], audio["sample_rate"], audio["channels"],
            audio["bits_per_sample"]) == (want.codec, 8000, 1, want.bits_per_sample)
    assert audio["duration"] == pytest.approx(want.duration, abs=0.001)
    assert want.bitrate[0] <= audio["bitrate"] <= want.bitrate[1]
    get = await alice.request("GET", f"/blobs/{b3(data)}.wav")
    assert get.headers["Content-Type"] == served
    assert await get.read() == data


# Text whose first 64 bytes pass for an AC-3 frame header (0B 77, then
# fscod 1, frmsizecod 0, bsid 8): no second frame follows where the first
# would end.
AC3_LOOKALIKE = b"\x0b\x77ho@@ reads this? " + TEXT * 20


@pytest.mark.parametrize("data,claim,served", [
    (TEXT, "text/plain; charset=utf-8", "text/plain"),
    # Not AC-3, with a claim or without, or with AC-3's.
    (AC3_LOOKALIKE, "text/plain", "text/plain"),
    (AC3_LOOKALIKE, None, OCTET),
    (AC3_LOOKALIKE, "audio/ac3", OCTET),
    (fixture("not_audio.png").read_bytes(), "image/png", "image/png"),
    (TEXT, None, OCTET),
    (TEXT, "application/x-www-form-urlencoded", OCTET),
    # Text whose first word is "ID3": no ID3 header (found by review: it
    # was served as audio/mpeg).
    (b"ID3 tags, a short guide.\n" + TEXT, None, OCTET),
    # Audio types blobd recognises, claimed for bytes that are not that audio.
    (TEXT, "audio/mpeg", OCTET),
    (os.urandom(5000), "audio/flac", OCTET),
    # A generic MP4 brand is no proof of audio: a video keeps its claim
    # (found in review: it was served as audio/mp4).
    (fixture("video_only.mp4").read_bytes(), "video/mp4", "video/mp4"),
    (fixture("video_only.webm").read_bytes(), "video/webm", "video/webm"),
    # A film with no sound track, sent without a type, is no audio: its
    # magic's audio/mp4 or audio/webm was wrong.
    (fixture("video_only.mp4").read_bytes(), None, OCTET),
    (fixture("video_only.webm").read_bytes(), None, OCTET),
    (fixture("video_only.webm").read_bytes(), "audio/webm", OCTET),
])
async def test_unknown_bytes_keep_only_a_believable_claim(alice, data, claim, served):
    headers = {"Content-Type": claim} if claim else {}
    resp = await alice.request("POST", "/blobs", data=data, headers=headers)
    assert resp.status == 201
    assert (await resp.json())["content_type"] == served
    meta = await meta_of(alice, b3(data))
    assert meta["content_type"] == served and meta["audio"] is None
    assert (await listing(alice))[0]["audio"] is None
    get = await alice.request("GET", f"/blobs/{b3(data)}")
    assert get.headers["Content-Type"] == served


@pytest.mark.parametrize("name,claim,served", [
    # found by review: it was served as audio/mp4
    ("video_sound.mp4", "video/mp4", "video/mp4"),
    ("video_sound.mp4", None, "audio/mp4"),           # the bytes alone cannot tell
    ("video_sound.webm", None, "audio/webm"),
    ("video_sound.mp4", "text/plain", "audio/mp4"),   # a film, not text
    # Sound alone, in a generic-brand MP4 as phones record it, is audio
    # whatever a file picker calls it.
    ("fragmented.m4a", "video/mp4", "audio/mp4"),
    ("mp3_mono.mp4", "video/mp4", "audio/mp4"),
])
async def test_a_video_with_sound_keeps_a_video_claim(alice, name, claim, served):
    data = fixture(name).read_bytes()
    resp = await alice.request("POST", "/blobs", data=data,
                               headers={"Content-Type": claim} if claim else {})
    assert (await resp.json())["content_type"] == served
    meta = await meta_of(alice, b3(data))
    assert meta["content_type"] == served and meta["audio"]["codec"] in ("aac", "mp3", "opus")


async def test_a_truncated_mp3_is_stored_with_what_is_left(alice):
    data = fixture("truncated.mp3").read_bytes()
    resp = await alice.put(data)
    assert resp.status == 201
    assert (await resp.json())["content_type"] == "audio/mpeg"
    audio = (await meta_of(alice, b3(data)))["audio"]
    # Half of a 2 s tone; its header alone would claim the whole length.
    assert 0.7 < audio["duration"] < 1.3 and audio["codec"] == "mp3"


async def test_a_header_without_a_stream_is_sniffed_but_not_audio(alice):
    """A broken file never fails the upload: the magic still names the
    type, the probe finds no stream, the facts are null."""
    data = fixture("tone.mp3").read_bytes()[:200] + TEXT * 20
    resp = await alice.put(data)
    assert resp.status == 201
    assert (await resp.json())["content_type"] == "audio/mpeg"
    assert (await meta_of(alice, b3(data)))["audio"] is None


async def test_a_damaged_file_behind_a_long_id3_tag_is_typed_by_what_follows(alice):
    """The tag (10 + 213 bytes) runs past the 64 bytes sniffed at upload;
    the FLAC behind it is cut inside its STREAMINFO, so the probe reads
    nothing. Its type is FLAC's (it was audio/mpeg, the tag's)."""
    data = fixture("id3_long_cut.flac").read_bytes()
    resp = await alice.request("POST", "/blobs", data=data, headers={"Content-Type": OCTET})
    assert resp.status == 201 and (await resp.json())["content_type"] == "audio/flac"
    meta = await meta_of(alice, b3(data))
    assert (meta["content_type"], meta["audio"]) == ("audio/flac", None)
    # A specific claim of something else still loses to the bytes' type.
    other = data + b"\0"
    resp = await alice.request("POST", "/blobs", data=other, headers={"Content-Type": "text/plain"})
    assert (await resp.json())["content_type"] == "audio/flac"


async def test_a_wav_of_one_sample_frame_is_audio(alice):
    """1/8000 s: audio, its duration to the microsecond (it was null)."""
    data = fixture("one_sample.wav").read_bytes()
    resp = await alice.put(data)
    assert resp.status == 201 and (await resp.json())["content_type"] == "audio/wav"
    assert (await meta_of(alice, b3(data)))["audio"] == {
        "duration": 0.000125, "bitrate": 128_000, "sample_rate": 8000, "channels": 1,
        "codec": "pcm", "bits_per_sample": 16}


async def test_a_slow_probe_gives_up_and_the_upload_succeeds(server, tmp_path):
    # ~12 MB of Ogg pages with no end: the probe reads its last 256 KiB,
    # thousands of pages, ~15 ms; 1 ms is not enough.
    data = ogg_without_end(tmp_path, 400_000).read_bytes()
    login = await server(audio={"probe_timeout_seconds": 0.001})
    alice = await login()
    resp = await alice.request("POST", "/blobs", data=data)
    assert resp.status == 201
    assert (await resp.json())["content_type"] == "audio/ogg"   # from the magic
    assert (await meta_of(alice, b3(data)))["audio"] is None


async def test_a_stored_blob_is_not_probed_again(server):
    """A second upload of known bytes takes the index row as it is. The row
    here is made to look like one written before blobd probed audio."""
    login = await server()
    alice, bob = await login("alice"), await login("bob")
    data = fixture("tone.mp3").read_bytes()
    await alice.put(data)
    async with alice.store.write() as tx:
        await tx.conn.execute("UPDATE blobs SET audio = NULL,"
                              " content_type = 'audio/x-unprobed' WHERE hash = ?",
                              (b3(data),))
    resp = await bob.request("POST", "/blobs", data=data,
                             headers={"Content-Type": "audio/mpeg"})
    assert resp.status == 200
    assert (await resp.json())["content_type"] == "audio/x-unprobed"
    assert (await meta_of(bob, b3(data)))["audio"] is None


@pytest.mark.parametrize("name", ["tone_24in32.wav", "tone_24.flac", "tone_alac24.m4a",
                                  "tone_alaw.wav"])
async def test_bit_depth_is_in_meta_and_the_listing(alice, name):
    data, want = fixture(name).read_bytes(), PROBE_ONLY_FIXTURES[name]
    assert (await alice.put(data)).status == 201
    audio = (await meta_of(alice, b3(data)))["audio"]
    assert (audio["codec"], audio["bits_per_sample"]) == (want.codec, want.bits_per_sample)
    [item] = await listing(alice)
    assert item["audio"] == audio


async def test_a_row_stored_before_bits_per_sample_serves_it_null(server):
    """An index row written before the probe reported bit depths (or
    brought back by a restore of an older backup) keeps its facts and
    serves the new key as null, to its first uploader and to one who
    uploads the same bytes later (a known blob is not probed again)."""
    login = await server()
    alice, bob = await login("alice"), await login("bob")
    data = fixture("tone_24.flac").read_bytes()
    await alice.put(data)
    async with alice.store.write() as tx:
        await tx.conn.execute("UPDATE blobs SET audio = json_remove(audio, '$.bits_per_sample')"
                              " WHERE hash = ?", (b3(data),))
    [(stored,)] = await alice.store.db.reader.execute_fetchall(
        "SELECT audio FROM blobs WHERE hash = ?", (b3(data),))
    assert "bits_per_sample" not in json.loads(stored)
    want = {"duration": 0.1, "sample_rate": 8000, "channels": 1, "codec": "flac",
            "bits_per_sample": None}
    audio = (await meta_of(alice, b3(data)))["audio"]
    assert {key: audio[key] for key in want} == want
    [item] = await listing(alice)
    assert item["audio"] == audio
    assert (await bob.put(data)).status == 200
    assert (await meta_of(bob, b3(data)))["audio"] == audio


# -- [audio] require_audio ----------------------------------------------------

REQUIRE = {"require_audio": True}


async def test_require_audio_accepts_every_recognised_format(server):
    login = await server(audio=REQUIRE)
    alice = await login()
    for name in sorted(AUDIO_FIXTURES) + ["truncated.mp3"]:
        resp = await alice.put(fixture(name).read_bytes())
        assert resp.status in (200, 201), name   # flac_named.mp3 is tone.flac
    assert {b["content_type"] for b in await listing(alice)} == AUDIO_MIME_TYPES


@pytest.mark.parametrize("name,codec", [("streamed.flac", "flac"), ("fragmented.m4a", "aac")])
async def test_audio_that_does_not_say_its_length_is_still_audio(server, name, codec):
    """A FLAC written to a pipe and a fragmented MP4 play fine; they just do
    not state a duration up front. Audio, with a null duration."""
    login = await server(audio=REQUIRE)
    alice = await login()
    data = fixture(name).read_bytes()
    resp = await alice.put(data)
    assert resp.status == 201, await resp.text()
    meta = await (await alice.request("GET", f"/blobs/{b3(data)}/meta")).json()
    assert meta["audio"]["duration"] is None and meta["audio"]["codec"] == codec
    assert meta["audio"]["sample_rate"] in (8000, 44100)


async def assert_nothing_stored(api: Api) -> None:
    assert blob_files(api.data_dir) == [] and tmp_files(api.data_dir) == []
    assert await usage(api) == {"used_bytes": 0, "used_blobs": 0, "used_refs": 0,
                                "reserved_bytes": 0, "reserved_blobs": 0,
                                "monthly_upload_bytes": 0}
    assert await listing(api) == []


@pytest.mark.parametrize("method", ["PUT", "POST"])
@pytest.mark.parametrize("data", [
    TEXT,
    fixture("not_audio.png").read_bytes(),
    os.urandom(20_000),
    fixture("tone.mp3").read_bytes()[:200] + TEXT * 20,   # an MP3 header, no stream
], ids=["text", "png", "random", "header-only"])
async def test_require_audio_refuses_the_rest_and_stores_nothing(server, method, data):
    login = await server(audio=REQUIRE)
    alice = await login()
    path = f"/blobs/{b3(data)}" if method == "PUT" else "/blobs"
    resp = await alice.request(method, path, data=data,
                               headers={"Content-Type": "audio/mpeg"})
    assert resp.status == 415
    body = await resp.json()
    assert body["error"] == "unsupported_media_type" and "audio" in body["message"]
    await assert_nothing_stored(alice)
    assert (await alice.request("GET", f"/blobs/{b3(data)}/meta")).status == 404


async def test_allowed_types_narrow_the_gate(server):
    login = await server(audio={**REQUIRE, "allowed_types": ["audio/mpeg", "audio/ogg"]})
    alice = await login()
    for name in ("tone.flac", "flac_named.mp3", "tone.opus"):
        resp = await alice.put(fixture(name).read_bytes())
        assert resp.status == 415, name
        message = (await resp.json())["message"]
        assert AUDIO_FIXTURES[name].mime in message and "audio/ogg" in message
    await assert_nothing_stored(alice)
    for name in ("tone.mp3", "tone.ogg"):
        assert (await alice.put(fixture(name).read_bytes())).status == 201


async def test_require_audio_refuses_a_dedup_of_a_stored_non_audio_blob(
        aiohttp_client, tmp_path):
    """Bytes stored before require_audio was switched on: the row says they
    are not audio, so no new upload may reference them."""
    before = await aiohttp_client(create_app(make_config(tmp_path)))
    alice = await _login(before, "alice")
    assert (await alice.put(TEXT)).status == 201
    await before.close()

    after = await aiohttp_client(create_app(make_config(tmp_path, audio=REQUIRE)))
    alice, bob = await _login(after, "alice"), await _login(after, "bob")
    alice_usage = await usage(alice)
    for api in (alice, bob):
        resp = await api.put(TEXT, headers={"Blob-Ref": "again"})
        assert resp.status == 415
        assert (await api.request("POST", "/blobs", data=TEXT)).status == 415
    # With Expect: 100-continue the answer comes before the body is sent.
    conn = await RawConnection.open(after.host, after.port)
    await conn.send_head("PUT", f"/blobs/{b3(TEXT)}", bob.headers({
        "Content-Length": str(len(TEXT)), "Expect": "100-continue"}))
    answer = await conn.read_response()
    await conn.close()
    assert answer.status == 415 and answer.json()["error"] == "unsupported_media_type"
    assert await usage(alice) == alice_usage
    assert await listing(bob) == [] and (await usage(bob))["used_blobs"] == 0
    assert (await meta_of(alice, b3(TEXT)))["refcount"] == 1
    assert (await alice.request("GET", "/refs/again")).status == 404
    assert len(blob_files(alice.data_dir)) == 1 and tmp_files(alice.data_dir) == []


async def test_require_audio_still_skips_the_upload_of_stored_audio(server):
    login = await server(audio=REQUIRE)
    alice, bob = await login("alice"), await login("bob")
    data = fixture("tone.m4a").read_bytes()
    assert (await alice.put(data)).status == 201
    conn = await RawConnection.open(bob.client.host, bob.client.port)
    await conn.send_head("PUT", f"/blobs/{b3(data)}", bob.headers({
        "Content-Length": str(len(data)), "Expect": "100-continue"}))
    answer = await conn.read_response()   # no body was sent
    await conn.close()
    assert answer.status == 200 and answer.json()["content_type"] == "audio/mp4"


async def _login(client, owner: str) -> Api:
    async with client.app[STORE].write() as tx:
        _, token = await auth.create_token(tx.conn, owner, auth.parse_scopes("read,write"))
    return Api(client, token, owner)


async def test_utf16_text_is_not_mp3_because_of_its_byte_order_mark(alice):
    """FF FE passes for an MPEG frame header; the probe finds no stream, and
    the client's specific type stands."""
    text = "\ufeffWindows Registry Editor Version 5.00\r\n".encode("utf-16-le") * 20
    resp = await alice.put(text, headers={"Content-Type": "text/plain; charset=utf-16"})
    assert (await resp.json())["content_type"] == "text/plain"


@pytest.mark.parametrize("name,codec", [("recorded.webm", "opus"), ("tone.aiff", "pcm"),
                                        ("tone_flac.mka", "flac")])
async def test_require_audio_takes_a_browser_recording(server, name, codec):
    """A MediaRecorder WebM (no Duration, sizes unknown) as a LAN web app
    uploads it, with the type the browser gives it; AIFF and Matroska
    likewise. They were not audio, and refused with 415."""
    login = await server(audio=REQUIRE)
    alice = await login()
    data = fixture(name).read_bytes()
    resp = await alice.request("POST", "/blobs", data=data,
                               headers={"Content-Type": "audio/webm;codecs=opus"})
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["content_type"] == AUDIO_FIXTURES[name].mime
    audio = (await meta_of(alice, b3(data)))["audio"]
    assert audio["codec"] == codec and audio["duration"] == pytest.approx(
        AUDIO_FIXTURES[name].duration, rel=0.05)


@pytest.mark.parametrize("name,claim", [("tone.3gp", "video/3gpp"), ("tone.3g2", "video/3gpp2")])
async def test_require_audio_takes_a_phone_recording(server, name, claim):
    """A voice memo in 3GP, sent as an Android file picker names any .3gp
    (video/3gpp): sound alone, so audio. It was not audio, and refused."""
    login = await server(audio=REQUIRE)
    alice = await login()
    data = fixture(name).read_bytes()
    resp = await alice.request("POST", "/blobs", data=data, headers={"Content-Type": claim})
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["content_type"] == AUDIO_FIXTURES[name].mime
    audio = (await meta_of(alice, b3(data)))["audio"]
    assert audio["codec"] == "aac" and audio["channels"] == 1
    assert audio["duration"] == pytest.approx(AUDIO_FIXTURES[name].duration, rel=0.05)


@pytest.mark.parametrize("claim,served", [("video/webm", "video/webm"), (None, "audio/webm")])
async def test_a_webm_film_keeps_a_video_claim(alice, claim, served):
    """As an MP4 film does: its sound's facts are recorded. A WebM with no
    sound at all keeps the claim too (its magic does not say audio)."""
    data = fixture("video_sound.webm").read_bytes()
    resp = await alice.request("POST", "/blobs", data=data,
                               headers={"Content-Type": claim} if claim else {})
    assert (await resp.json())["content_type"] == served
    audio = (await meta_of(alice, b3(data)))["audio"]
    assert audio["codec"] == "opus" and audio["sample_rate"] == 48000
    silent = fixture("video_only.webm").read_bytes()
    resp = await alice.request("POST", "/blobs", data=silent,
                               headers={"Content-Type": "video/webm"})
    assert (await resp.json())["content_type"] == "video/webm"
    assert (await meta_of(alice, b3(silent)))["audio"] is None

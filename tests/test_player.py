"""A real browser plays blobs: headless Chromium, a real `blobd serve`
process, and a web page of another origin with an <audio> element.

The page is served by a tiny aiohttp app of the test's own; the audio comes
straight from blobd (anonymous_read, since an <audio> element cannot send a
Bearer token). The page plays the blob, seeks to the middle, plays on, and
reports duration and currentTime.

Chromium forgives a server that ignores Range: it reads from the start
until it reaches the point sought, so a seek "works" either way. The tests
therefore also read the browser's own network log: its media requests must
carry Range and be answered 206, and for a stream too big to read whole,
the seek must fetch the middle of the blob by range.

Needs the Debian packages chromium and chromium-driver; see tests/chromium.py
for when the test skips and when it fails instead.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest
from aiohttp import web

import chromium
from audiofixtures import AUDIO_FIXTURES, CHROMIUM_CANNOT_PLAY, fixture
from blobd.sniff import mpeg_frame_length
from serverproc import BlobdServer

# Runs inside the page. `window.playerReport` settles with what the page saw.
SEEK_SCRIPT = """
const player = document.getElementById("player");
function facts(extra) {
  const s = player.seekable;
  return Object.assign({duration: player.duration, currentTime: player.currentTime,
    seekable: s.length ? [s.start(0), s.end(s.length - 1)] : null,
    error: player.error && player.error.code}, extra);
}
function once(name) {
  return new Promise((resolve, reject) => {
    const failed = () => reject(new Error("media error " + player.error.code));
    player.addEventListener(name, () => {
      player.removeEventListener("error", failed);
      resolve();
    }, {once: true});
    player.addEventListener("error", failed, {once: true});
  });
}
window.playerReport = (async () => {
  if (player.readyState < HTMLMediaElement.HAVE_METADATA) await once("loadedmetadata");
  await player.play();
  const seeked = once("seeked");
  player.currentTime = player.duration / 2;
  await seeked;
  const atSeek = facts({});
  // Playing on from the middle shows the bytes there were fetched and decoded.
  while (player.currentTime < atSeek.currentTime + 0.3) await once("timeupdate");
  return facts({seekedTo: atSeek.currentTime, seekable: atSeek.seekable});
})().catch((e) => facts({failure: String(e)}));
"""

LOAD_SCRIPT = """
window.playerReport = Promise.all([...document.querySelectorAll("audio")].map(
  (player) => new Promise((resolve) => {
    const report = () => resolve({id: player.id, duration: player.duration,
      readyState: player.readyState, error: player.error && player.error.code});
    player.addEventListener("canplay", report, {once: true});
    player.addEventListener("error", report, {once: true});
  })));
"""

AWAIT_REPORT = """
const done = arguments[arguments.length - 1];
window.playerReport.then(done, (e) => done({failure: String(e)}));
"""


def page(body: str, script: str) -> str:
    return (f"<!doctype html><html><head><meta charset=utf-8><title>blobd player"
            f"</title></head><body>{body}<script>{script}</script></body></html>")


@pytest.fixture
def browser_tools() -> None:
    chromium.require()   # skip or fail before starting anything


@pytest.fixture
def blobd(tmp_path: Path, browser_tools) -> Iterator[BlobdServer]:
    config = {"auth": {"anonymous_read": True}, "storage": {"fsync": False}}
    with BlobdServer(tmp_path / "blobd", config) as server:
        yield server


@pytest.fixture
async def pages(aiohttp_server) -> Callable[[str, str], str]:
    """`pages(path, html)` serves `html` at `path` and returns its URL; the
    page's origin differs from blobd's (another port)."""
    html_by_path: dict[str, str] = {}

    async def serve(request: web.Request) -> web.Response:
        html = html_by_path.get(request.path)
        if html is None:
            raise web.HTTPNotFound()
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    server = await aiohttp_server(app, host="127.0.0.1")

    def add(path: str, html: str) -> str:
        html_by_path[path] = html
        return f"http://127.0.0.1:{server.port}{path}"
    return add


@pytest.fixture
async def browser(tmp_path: Path, browser_tools) -> AsyncIterator[chromium.Chromium]:
    async with chromium.Chromium(tmp_path / "chromium") as browser:
        yield browser


def upload(server: BlobdServer, token: str, data: bytes) -> dict:
    request = urllib.request.Request(
        f"{server.url}/blobs", data=data, method="POST",
        headers={"Authorization": f"Bearer {token}",
                 "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.load(resp)


def meta(server: BlobdServer, digest: str) -> dict:
    """GET /meta with no token: anonymous_read serves it too."""
    with urllib.request.urlopen(f"{server.url}/blobs/{digest}/meta", timeout=30) as resp:
        return json.load(resp)


def long_mp3(repeats: int) -> bytes:
    """sweep.mp3's audio frames `repeats` times over, without its ID3 tag and
    Info frame: a constant-bitrate stream far larger than what a browser
    reads for its metadata."""
    data = fixture("sweep.mp3").read_bytes()
    start = 10 + ((data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9])
    first_audio = start + mpeg_frame_length(data[start:start + 4])
    return data[first_audio:] * repeats


def ranged_responses(exchanges: list[chromium.Exchange]) -> list[tuple[int, str]]:
    """(first byte asked for, Content-Range) of each 206 answer to a
    request that carried a Range header."""
    found = []
    for exchange in exchanges:
        asked = re.fullmatch(r"bytes=(\d+)-(\d*)", exchange.request_headers.get("range", ""))
        if asked and exchange.status == 206:
            found.append((int(asked[1]), exchange.response_headers["content-range"]))
    return found


async def play_and_seek(blobd: BlobdServer, pages, browser: chromium.Chromium,
                        digest: str, preload: str) -> tuple[dict, list[tuple[int, str]]]:
    """Load the player page for a blob; the page plays it, seeks to the
    middle and plays on. Returns its report and the ranged 206 answers."""
    src = f"{blobd.url}/blobs/{digest}.mp3"
    url = pages("/player.html", page(
        f'<audio id="player" preload="{preload}" src="{src}"></audio>', SEEK_SCRIPT))
    await browser.open(url)
    report = await browser.run_async(AWAIT_REPORT)
    assert "failure" not in report and report["error"] is None, report
    return report, ranged_responses(await browser.exchanges(src))


async def test_chromium_plays_a_blob_and_seeks_to_the_middle(blobd, pages, browser):
    data = fixture("sweep.mp3").read_bytes()
    digest = upload(blobd, blobd.token(), data)["hash"]
    report, ranged = await play_and_seek(blobd, pages, browser, digest, "auto")

    duration = report["duration"]
    assert duration == pytest.approx(8.0, abs=0.15)
    assert duration == pytest.approx(meta(blobd, digest)["audio"]["duration"], abs=0.15)
    assert report["seekable"] == pytest.approx([0.0, duration], abs=0.05)
    assert report["seekedTo"] == pytest.approx(4.0, abs=0.1)
    assert report["currentTime"] >= report["seekedTo"] + 0.3
    # Chromium asks media servers for ranges from the start; blobd's own
    # access log agrees that it answered 206.
    assert ranged and all(cr.endswith(f"/{len(data)}") for _, cr in ranged), ranged
    partial = re.compile(rf"GET /blobs/{digest}\.mp3 206 ")
    assert partial.search(Path(blobd.stderr_path).read_text()), blobd.stderr_tail()


async def test_a_seek_fetches_the_middle_by_range(blobd, pages, browser):
    """A stream too big to be read whole for its metadata: the seek makes
    Chromium ask for the middle of the blob, and blobd sends just that."""
    data = long_mp3(200)   # 6.5 MB, 27 minutes at 32 kb/s
    digest = upload(blobd, blobd.token(), data)["hash"]
    report, ranged = await play_and_seek(blobd, pages, browser, digest, "metadata")

    duration = report["duration"]
    assert duration == pytest.approx(len(data) * 8 / 32_000, rel=0.01)
    assert duration == pytest.approx(meta(blobd, digest)["audio"]["duration"], rel=0.01)
    assert report["seekedTo"] == pytest.approx(duration / 2, abs=0.5)
    assert report["currentTime"] >= report["seekedTo"] + 0.3
    middle = [(first, cr) for first, cr in ranged if first > len(data) // 4]
    assert middle, ranged
    first, content_range = middle[0]
    assert content_range == f"bytes {first}-{len(data) - 1}/{len(data)}"
    assert len(data) // 4 < first < len(data) * 3 // 4


async def test_chromium_loads_every_format_by_its_content_type(blobd, pages, browser):
    token = blobd.token()
    # Chromium has no ALAC or AIFF decoder, whatever the Content-Type.
    names = sorted(n for n in AUDIO_FIXTURES if n not in CHROMIUM_CANNOT_PLAY)
    players = []
    for i, name in enumerate(names):
        digest = upload(blobd, token, fixture(name).read_bytes())["hash"]
        players.append(f'<audio id="p{i}" preload="auto"'
                       f' src="{blobd.url}/blobs/{digest}"></audio>')
    await browser.open(pages("/formats.html", page("".join(players), LOAD_SCRIPT)))
    reports = await browser.run_async(AWAIT_REPORT)

    assert "failure" not in reports, reports
    for name, report in zip(names, reports):
        assert report["error"] is None, (name, report)
        assert report["readyState"] >= 3, (name, report)   # HAVE_FUTURE_DATA
        if name in ("vbr_no_header.mp3", "recorded.webm"):
            # Nothing in them states their length: Chromium guesses an MP3's
            # from the first frames' bitrate (8.7 s, as ffprobe does), and
            # calls a WebM without a Duration infinite until played through;
            # blobd's probe counts the MP3's frames and reads the WebM's
            # last block (test_audio).
            continue
        assert report["duration"] == pytest.approx(AUDIO_FIXTURES[name].duration,
                                                   rel=0.1), (name, report)


def test_missing_chromium_skips_with_a_hint_and_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))   # no chromium, no chromedriver
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium chromium-driver"):
        chromium.require()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        chromium.require()

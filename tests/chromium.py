"""Headless Chromium for tests, driven by chromedriver over the W3C WebDriver
HTTP protocol with aiohttp's client (no Selenium).

    async with Chromium(workdir) as browser:
        await browser.open("http://127.0.0.1:PORT/page.html")
        result = await browser.run_async("arguments[0](document.title)")
        requests = await browser.exchanges("http://127.0.0.1:PORT/")

`find()` says whether the Debian packages `chromium` and `chromium-driver`
are installed; `require()` turns their absence into a skip that says how to
install them, or, under CI (the CI environment variable), into a failure.

The browser is kept on the loopback interface: every host name except
127.0.0.1 fails to resolve, and the flags below switch off its background
traffic (updates, sync, metrics). Leaving the block deletes the session and
then kills whatever is left of the process group chromedriver was started
in, the browser's processes included.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

BROWSERS = ("chromium", "chromium-browser")
DRIVER = "chromedriver"
INSTALL_HINT = ("the browser test needs Chromium and chromedriver: install the"
                " Debian packages with `apt-get install chromium chromium-driver`"
                " (tests/run.sh does so when run as root)")

# --headless, --no-sandbox (root, containers), --disable-gpu and
# --disable-background-networking are what the project asks for; the rest
# keep a fresh profile quiet and offline, and let <audio> play without a
# user gesture and without a sound card.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--no-first-run", "--no-default-browser-check", "--disable-component-update",
    "--disable-sync", "--disable-default-apps", "--disable-breakpad",
    "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--metrics-recording-only", "--no-pings", "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--autoplay-policy=no-user-gesture-required", "--mute-audio",
)
_STARTED = re.compile(r"ChromeDriver was started successfully on port (\d+)")


def find() -> tuple[str, str] | None:
    """(browser, chromedriver) executables, or None if either is missing."""
    browser = next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = shutil.which(DRIVER)
    return (browser, driver) if browser and driver else None


def require() -> tuple[str, str]:
    """The executables, or skip the test (fail it under CI) saying why."""
    found = find()
    if found is not None:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so this test must run, but {INSTALL_HINT}")
    pytest.skip(INSTALL_HINT)


class WebDriverError(Exception):
    pass


@dataclass
class Exchange:
    """One request the browser sent, with header names in lower case;
    status None when no response arrived."""

    url: str
    request_headers: dict[str, str]
    status: int | None
    response_headers: dict[str, str]


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


class Chromium:
    """One chromedriver process and one browser session."""

    def __init__(self, workdir: Path, *, startup_timeout: float = 30.0) -> None:
        self.browser, self.driver = require()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "chromedriver.log"
        self.startup_timeout = startup_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.http: aiohttp.ClientSession | None = None
        self.base = ""

    async def __aenter__(self) -> "Chromium":
        try:
            await self._start_driver()
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
            await self._new_session()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start_driver(self) -> None:
        with open(self.log_path, "wb") as log:
            # Its own process group, so the browser it launches can be
            # killed with it; a log file, not a pipe nobody drains.
            self.proc = await asyncio.create_subprocess_exec(
                self.driver, "--port=0", stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            text = await asyncio.to_thread(self.log_path.read_text, errors="replace")
            match = _STARTED.search(text)
            if match:
                self.base = f"http://127.0.0.1:{match[1]}"
                return
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise WebDriverError(f"chromedriver did not start:\n{self.log_tail()}")

    async def _new_session(self) -> None:
        profile = self.workdir / "profile"
        options = {"binary": self.browser,
                   "args": [*FLAGS, f"--user-data-dir={profile}"]}
        body = await self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options,
            "goog:loggingPrefs": {"performance": "ALL"},
            "timeouts": {"script": 60_000, "pageLoad": 30_000}}}})
        self.base += f"/session/{body['sessionId']}"

    async def _call(self, method: str, path: str, payload: Any = None) -> Any:
        assert self.http is not None
        async with self.http.request(method, self.base + path, json=payload) as resp:
            body = await resp.json(content_type=None)
        value = body.get("value") if isinstance(body, dict) else None
        if resp.status != 200:
            error = value.get("error") if isinstance(value, dict) else body
            message = value.get("message") if isinstance(value, dict) else ""
            raise WebDriverError(f"{method} {path}: {resp.status} {error}: {message}\n"
                                 f"{self.log_tail()}")
        return value

    async def open(self, url: str) -> None:
        """Navigate and wait for the page's load event."""
        await self._call("POST", "/url", {"url": url})

    async def run_async(self, script: str, *args: Any) -> Any:
        """Run `script` in the page; it reports by calling its last argument
        (WebDriver "execute async script"), within the 60 s script timeout."""
        return await self._call("POST", "/execute/async", {"script": script,
                                                           "args": list(args)})

    async def exchanges(self, url_prefix: str) -> list[Exchange]:
        """The HTTP requests the browser made to URLs starting with
        `url_prefix` since the last call, and their responses, from its own
        network log (the DevTools Network events chromedriver records)."""
        entries = await self._call("POST", "/se/log", {"type": "performance"})
        found: dict[str, Exchange] = {}
        for entry in entries:
            event = json.loads(entry["message"])["message"]
            params = event.get("params", {})
            if event["method"] == "Network.requestWillBeSent":
                request = params["request"]
                if request["url"].startswith(url_prefix):
                    found[params["requestId"]] = Exchange(
                        request["url"], _lower(request["headers"]), None, {})
            elif event["method"] == "Network.responseReceived":
                exchange = found.get(params["requestId"])
                if exchange is not None:
                    exchange.status = params["response"]["status"]
                    exchange.response_headers = _lower(params["response"]["headers"])
        return list(found.values())

    async def close(self) -> None:
        if self.http is not None:
            if "/session/" in self.base:
                try:
                    await self._call("DELETE", "")
                except (WebDriverError, aiohttp.ClientError, asyncio.TimeoutError):
                    pass   # the process group is killed below either way
            await self.http.close()
            self.http = None
        if self.proc is not None:
            await _stop_group(self.proc)
            self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no chromedriver log)"
        return "\n".join(text.splitlines()[-lines:])


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to chromedriver, then SIGKILL to its whole process group
    (the browser and its helpers), which this helper created."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.returncode is None:
        await proc.wait()

"""Log lines for journald: ``<N>`` priority prefixes and no timestamps when
stderr is the journal stream systemd announced, plain lines otherwise."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from blobd.logs import priority, setup_logging
from serverproc import blobd_env, free_port, to_toml

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR|DEBUG) ")


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("aiosqlite").level
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    logging.getLogger("aiosqlite").setLevel(saved[2])


def journal_id(path: Path) -> str:
    stat = os.stat(path)
    return f"{stat.st_dev}:{stat.st_ino}"


@pytest.mark.parametrize("level, expected", [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3),
    (logging.CRITICAL, 2), (25, 6), (5, 7),
])
def test_priority(level: int, expected: int):
    assert priority(level) == expected


def test_journal_lines_carry_priority_on_every_line(tmp_path: Path, monkeypatch,
                                                    restore_logging):
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", journal_id(path))
        setup_logging("info", stream)
        log = logging.getLogger("blobd.test")
        log.debug("not shown at info")
        log.info("hello %s", "journal")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("it failed")
    lines = path.read_text().splitlines()
    assert lines[0] == "<6>blobd.test: hello journal"
    assert lines[1] == "<3>blobd.test: it failed"
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines[1:])
    assert lines[-1] == "<3>RuntimeError: boom"


@pytest.mark.parametrize("journal_stream", [None, "1:1"], ids=["unset", "other-file"])
def test_plain_lines_elsewhere(tmp_path: Path, monkeypatch, restore_logging, journal_stream):
    """Outside the journal (or with stderr redirected away from it) lines
    carry a timestamp and level name instead."""
    if journal_stream is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream)
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        setup_logging("warning", stream)
        logging.getLogger("blobd.test").info("not shown at warning")
        logging.getLogger("blobd.test").warning("careful")
    (line,) = path.read_text().splitlines()
    assert TIMESTAMP.match(line) and line.endswith(" WARNING blobd.test: careful")


def test_serve_under_the_journal(tmp_path: Path):
    """``blobd serve`` whose stderr is the announced journal stream."""
    port = free_port()
    config = tmp_path / "blobd.toml"
    config.write_text(to_toml({"server": {"port": port, "data_dir": str(tmp_path / "data")},
                               "storage": {"fsync": False}}))
    stderr = tmp_path / "stderr"
    stderr.touch()
    env = {**blobd_env(), "JOURNAL_STREAM": journal_id(stderr)}
    with open(stderr, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "blobd", "serve", "-c", str(config)],
                                env=env, stderr=err, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not _healthy(f"http://127.0.0.1:{port}/healthz"):
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
    lines = stderr.read_text().splitlines()
    assert lines[0].startswith("<6>blobd.daemon: blobd ") and f":{port}" in lines[0]
    assert "<6>blobd.access: GET /healthz 200 " in stderr.read_text()
    assert lines[-1] == "<6>blobd.daemon: stopped"
    assert all(re.match(r"<[0-7]>\S+: ", line) for line in lines), lines


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_start_up_failure_under_the_journal_is_an_error(tmp_path: Path):
    config = tmp_path / "blobd.toml"
    config.write_text("[server]\nport = 99999\n")
    stderr = tmp_path / "stderr"
    stderr.touch()
    env = {**blobd_env(), "JOURNAL_STREAM": journal_id(stderr)}
    with open(stderr, "wb") as err:
        code = subprocess.run([sys.executable, "-m", "blobd", "serve", "-c", str(config)],
                              env=env, stderr=err, timeout=30).returncode
    assert code != 0
    assert stderr.read_text().splitlines() == [
        "<3>blobd: error: server.port: expected 1-65535"]

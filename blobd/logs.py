"""Log set-up: one line per event on stderr, shaped for journald when it is there.

Under systemd, stderr is a stream into journald, which stamps every line
with the time, unit and pid itself. What it cannot know is the severity, so
each line then starts with a syslog priority prefix, ``<6>`` for info or
``<3>`` for an error (sd-daemon(3)); journald strips it and records
``PRIORITY=``, so ``journalctl -p warning -u blobd`` works. systemd sets
``$JOURNAL_STREAM`` to the device and inode of that stream, and it counts
only while stderr is still that very file (systemd.exec(5)): run by hand, or
with stderr redirected, blobd logs with timestamps and level names instead.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

# sd-daemon(3) / syslog(3) priorities for Python's levels.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))
_DEBUG_PRIORITY = 7

# aiosqlite logs every statement at DEBUG; under --log-level debug that would
# drown blobd's own lines, so it stays at INFO.
_QUIET_AT_DEBUG = ("aiosqlite",)


def priority(levelno: int) -> int:
    """The syslog priority for a logging level (7 for anything below INFO)."""
    for threshold, value in _PRIORITIES:
        if levelno >= threshold:
            return value
    return _DEBUG_PRIORITY


def stream_is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journald stream systemd connected us to."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


class JournalFormatter(logging.Formatter):
    """``<N>name: message``, the prefix repeated on every line of a
    traceback, so each line journald stores has the right priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr)."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    if stream_is_journal(stream):
        handler.setFormatter(JournalFormatter(JOURNAL_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _QUIET_AT_DEBUG:
        logging.getLogger(name).setLevel(max(root.level, logging.INFO))

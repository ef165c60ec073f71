"""Process-tree helpers read straight from /proc: descendants, RSS, stopping by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def children(pid: int) -> list[int]:
    """Direct children of pid, over all its threads (a child belongs to the thread that forked it)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every process below pid (not pid itself), depth first."""
    out: list[int] = []
    stack = children(pid)
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(children(child))
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of one process; 0 when it has already gone."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0
    return int(fields[1]) * PAGE_SIZE


def tree_rss_bytes(pid: int) -> int:
    """RSS of pid plus all its descendants (shared pages are counted once per process)."""
    return sum(rss_bytes(p) for p in [pid, *descendants(pid)])


def pss_bytes(pid: int) -> int:
    """Proportional set size: pages shared with other processes (a forked
    worker's copy-on-write pages) count once over all sharers; 0 when gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def tree_pss_bytes(pid: int) -> int:
    """PSS of pid plus all its descendants: the tree's share of memory."""
    return sum(pss_bytes(p) for p in [pid, *descendants(pid)])


def stop_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process, SIGKILL it after grace_s, then SIGKILL any descendant left behind.

    Descendants are listed before the parent is signalled: once it is gone
    they are re-parented and can no longer be found from its PID.
    """
    if proc.poll() is not None:
        return
    leftovers = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 2.0
    for pid in leftovers:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"

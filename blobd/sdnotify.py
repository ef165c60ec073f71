"""The systemd service-manager protocols, in pure Python.

Two small protocols, both driven by environment variables that systemd sets
for the service's main process (see sd_notify(3) and sd_listen_fds(3)):

* **Notification** — ``$NOTIFY_SOCKET`` names a Unix datagram socket; the
  service sends newline-separated ``KEY=VALUE`` assignments to it
  (``READY=1``, ``STOPPING=1``, ``STATUS=...``, ``WATCHDOG=1``). The value is
  a filesystem path (``/run/systemd/notify``) or, when it starts with ``@``,
  a Linux abstract socket name (the ``@`` stands for the leading NUL byte).
* **Socket activation** — systemd opens the listening sockets itself and
  passes them as file descriptors 3, 4, ... with ``$LISTEN_FDS`` (how many)
  and ``$LISTEN_PID`` (which process they are meant for).

Outside systemd none of these variables exist and every call here is a
cheap no-op, so the daemon calls them unconditionally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)

# sd_listen_fds(3): passed descriptors start right after stdin/stdout/stderr.
SD_LISTEN_FDS_START = 3

_LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _notify_address(value: str) -> str | None:
    """Map a $NOTIFY_SOCKET value to a socket address, or None if unusable.

    Python's AF_UNIX addresses take an abstract name as a str starting with
    NUL, which is exactly what systemd's '@' prefix stands for.
    """
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(message: str) -> bool:
    """Send one sd_notify message; True if it was handed to systemd.

    False means nothing was delivered: not running under systemd (no
    $NOTIFY_SOCKET), an address form we do not speak, or a send error (logged,
    never raised: a service must not die because its supervisor went away).

    The socket is a non-blocking Unix *datagram* socket, so calling this from
    the event loop is safe: the send is a local copy into the receiver's
    queue, never a network round trip, and if that queue were full the kernel
    answers EAGAIN at once instead of stalling the loop.
    """
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = _notify_address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a path or abstract socket", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode("utf-8"), address)
    except OSError as exc:
        log.warning("sd_notify %r to %s failed: %s", message, value, exc)
        return False
    return True


class Notifier:
    """The messages blobd sends to systemd over its life.

    ``Type=notify`` units wait for ``ready()`` before ordering dependants
    after us; ``stopping()`` marks a graceful shutdown in ``systemctl status``;
    with ``WatchdogSec=`` set, ``run_watchdog`` must keep pinging or systemd
    kills and restarts the service.
    """

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (listening, index open)."""
        if status is None:
            return notify("READY=1")
        return notify(f"READY=1\nSTATUS={_one_line(status)}")

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd a graceful shutdown has begun."""
        if status is None:
            return notify("STOPPING=1")
        return notify(f"STOPPING=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """Set the free-form line shown by ``systemctl status``."""
        return notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Send one watchdog keep-alive."""
        return notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None if no watchdog is armed.

        Like sd_watchdog_enabled(3): $WATCHDOG_USEC must be a positive
        integer, and when $WATCHDOG_PID is set it must name this process
        (a child that inherited the environment must not ping for us).
        """
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec:
            return None
        pid = os.environ.get("WATCHDOG_PID")
        if pid and _parse_int(pid, "WATCHDOG_PID") != os.getpid():
            return None
        value = _parse_int(usec, "WATCHDOG_USEC")
        return value / 1_000_000 if value > 0 else None

    async def run_watchdog(self, interval: float) -> None:
        """Ping the watchdog every ``interval / 2`` seconds until cancelled.

        Half the timeout, as sd_watchdog_enabled(3) recommends, so one late
        tick never trips it. The pings come from the event loop on purpose:
        if the loop is wedged (something blocking it), pings stop and
        systemd restarts a server that could no longer answer anyway.
        """
        if interval <= 0:
            raise ValueError(f"watchdog interval must be positive, got {interval}")
        period = interval / 2
        while True:
            self.watchdog()
            await asyncio.sleep(period)


def listen_fds() -> list[socket.socket]:
    """The sockets systemd passed by socket activation, in order; [] if none.

    Implements sd_listen_fds(unset_environment=1): the variables are removed
    from os.environ whether or not they applied, so child processes never
    mistake the descriptors for their own. The descriptors are marked
    close-on-exec, as sd_listen_fds does. Each socket is returned exactly as
    systemd made it (already bound and listening, blocking mode); asyncio
    switches it to non-blocking when it is handed to a server
    (``aiohttp.web.SockSite``).

    Raises ValueError when $LISTEN_PID or $LISTEN_FDS is malformed.
    """
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    for name in _LISTEN_ENV:
        os.environ.pop(name, None)
    if not pid or not count:
        return []
    if _parse_int(pid, "LISTEN_PID") != os.getpid():
        return []
    n = _parse_int(count, "LISTEN_FDS")
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        # With only fileno given, Python asks the kernel for family and type.
        sockets.append(socket.socket(fileno=fd))
    return sockets


def _parse_int(value: str, name: str) -> int:
    # Digits only: int() would also take " 12", "+12" and "1_2".
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"{name} must be a non-negative decimal integer, got {value!r}")
    return int(value)


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return " ".join(text.splitlines())

"""Config values older blobd versions took, read as they read them.

A check added to :mod:`blobd.config` must not stop an upgraded server on a
value it used to run with, when that value meant something and was safe:
such a value is taken again, with the meaning it had, and a note (logged
once by ``blobd serve``) says how to write it now. Each reader here gives
``(value as it is used now, note or None)``. Values that never worked, or
were unsafe, stay refused by the config's checks, whose messages say what
to write instead.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata

from . import tomltext

# S3 takes no single PUT above this (see blobd.storage.s3).
S3_MAX_SINGLE_PUT = 5 << 30


def host(value: str) -> tuple[str, str | None]:
    """``server.host`` of digits and dots that is no plain IPv4 address:
    older versions handed it to the resolver, which reads it as
    inet_aton(3) does ("0" is 0.0.0.0, "127.1" is 127.0.0.1, a leading 0
    octal), and listened there. The same address is listened on now."""
    if not re.fullmatch(r"[0-9.]+", value) or _is_address(value):
        return value, None
    try:
        address = socket.inet_ntoa(socket.inet_aton(value))
    except OSError:
        # The resolver refused it too: it never listened; the checks say why.
        return value, None
    return address, (f"server.host = {value!r} is read as {address}, as older versions"
                     f" read it; write \"{address}\"")


def multipart_threshold(value: int) -> tuple[int, str | None]:
    """A threshold over S3's largest single upload: older versions sent
    every blob up to it in one PUT, which S3 refused (and the mirror
    retried for ever) for a blob over 5 GiB, and took for any smaller one.
    As 5 GiB, every blob that went up before goes up the same way, and a
    bigger one goes up in parts instead of never."""
    if value <= S3_MAX_SINGLE_PUT:
        return value, None
    return S3_MAX_SINGLE_PUT, (f"mirror.multipart_threshold = {value}: older versions sent"
                               " a blob up to it in one PUT, which S3 refuses over 5GiB;"
                               " it is taken as \"5GiB\": write that")


def prefix_note(prefix: str) -> str | None:
    """An empty segment ("a//b") or a control character in ``mirror.prefix``
    (NUL aside, which no store takes): the keys older versions wrote with
    it are the ones written now (:func:`blobd.layout.mirror_key` never
    changed), so the objects they mirrored stay found. Changing the prefix
    would orphan them on a store that keeps such keys as sent."""
    inner = prefix.strip("/")
    controls = [c for c in prefix if unicodedata.category(c) == "Cc" and c != "\0"]
    if inner and "" in inner.split("/"):
        folded = "/".join(s for s in inner.split("/") if s)
        return (f"mirror.prefix = {prefix!r} has an empty segment ('//'); its keys are"
                f" written as older versions wrote them ({inner}/ab/cd/<hash>), so keep"
                f" it for this bucket. A store that folds '//' (SeaweedFS) keeps them"
                f" under {folded}/ and lists nothing under {inner}/ (mirror sync,"
                f" restore): on such a store, write prefix = {tomltext.string(folded)}")
    if controls:
        return (f"mirror.prefix = {prefix!r} has a control character"
                f" ({', '.join(sorted({repr(c) for c in controls}))}); its keys are"
                " written as older versions wrote them, so keep it for this bucket")
    return None


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True

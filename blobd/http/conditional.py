"""Conditional requests on ``/blobs/<address>`` (RFC 9110 section 13): the
one place that reads ``If-Match``, ``If-Unmodified-Since``,
``If-None-Match``, ``If-Modified-Since`` and ``If-Range``.

A blob's validators: the strong ETag ``"<hash>"`` and ``Last-Modified``,
the second it was first stored. Both stay put as long as the blob lives,
so every comparison here is against values that cannot change under it.

Callers evaluate the preconditions only once the request would otherwise
succeed (section 13.2.1): an unknown blob's GET stays 404, a DELETE of a
blob the caller holds no reference to stays 404. Where the answer changes
something (PUT, DELETE) they evaluate them again inside the transaction
that makes the change, so that a failed precondition changes nothing, and
a PUT evaluates them once more before it invites the body.
"""

from __future__ import annotations

import datetime
import email.utils
import time
from dataclasses import dataclass
from typing import Mapping

from ..errors import BlobdError

PRECONDITIONS = ("If-Match", "If-Unmodified-Since", "If-None-Match", "If-Modified-Since")
_SAFE = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class Selected:
    """The representation preconditions are compared with: a blob as the
    caller sees it (None where it sees none)."""
    etag: str
    modified_at: int  # whole seconds, as Last-Modified says it

    @classmethod
    def of_blob(cls, digest: str, created_at: float) -> "Selected":
        return cls(f'"{digest}"', int(created_at))


def has_preconditions(headers: Mapping[str, str]) -> bool:
    return any(name in headers for name in PRECONDITIONS)


def evaluate(headers: Mapping[str, str], method: str, selected: Selected | None) -> bool:
    """The preconditions of a request, in the order of RFC 9110 section
    13.2.2. True: go on with the method. False: answer 304 Not Modified
    (only ever for GET and HEAD). A false precondition on another method
    raises 412 ``precondition_failed``."""
    if_match = headers.get("If-Match")
    if if_match is not None:
        # Section 13.1.1: strong comparison; "*" is true when it exists.
        if not _matches(if_match, selected, weak=False):
            raise _failed("If-Match")
    elif selected is not None:
        # Section 13.1.4: only without If-Match, only with a valid date and
        # a representation that has a modification date.
        since = _date(headers.get("If-Unmodified-Since"))
        if since is not None and selected.modified_at > since:
            raise _failed("If-Unmodified-Since")
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        # Section 13.1.2: weak comparison; false means "you have it".
        if _matches(if_none_match, selected, weak=True):
            if method in _SAFE:
                return False
            raise _failed("If-None-Match")
    elif method in _SAFE and selected is not None:
        # Section 13.1.3: only without If-None-Match, only for GET and HEAD.
        since = _date(headers.get("If-Modified-Since"))
        if since is not None and selected.modified_at <= since:
            return False
    return True


def range_applies(headers: Mapping[str, str], selected: Selected) -> bool:
    """If-Range (RFC 9110 section 13.1.5): true for the strong ETag, or for
    an HTTP-date that is exactly Last-Modified when that is a strong
    validator (section 8.8.2.2: at least a second before the answer's
    Date, so nothing else can have been stored under it in that second).
    False for anything else, weak ETags and non-dates included: the whole
    blob goes out."""
    if_range = headers.get("If-Range")
    if if_range is None:
        return True
    if_range = if_range.strip()
    if if_range.startswith('"'):
        return if_range == selected.etag
    date = _date(if_range)
    return (date is not None and date == selected.modified_at
            and selected.modified_at < int(time.time()))


def _matches(header: str, selected: Selected | None, *, weak: bool) -> bool:
    """Whether an If-Match/If-None-Match list names the representation
    (section 8.8.3.2): a strong comparison ignores weak tags, a weak one
    drops ``W/``; ``*`` alone matches any current representation."""
    if selected is None:
        return False
    if header.strip() == "*":
        return True
    for tag in header.split(","):
        tag = tag.strip()
        if weak:
            tag = tag.removeprefix("W/")
        if tag == selected.etag:
            return True
    return False


def _date(value: str | None) -> int | None:
    """An HTTP-date as whole seconds since the epoch; None when absent or
    not a valid date, which the conditions then ignore (sections 13.1.3,
    13.1.4)."""
    if value is None or value.count(",") > 1:
        return None  # absent, or a list of dates
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        # asctime() dates name no zone; every HTTP-date is in GMT.
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    try:
        return int(parsed.timestamp())
    except (OverflowError, OSError, ValueError):
        return None


def _failed(header: str) -> BlobdError:
    return BlobdError("precondition_failed", f"the {header} precondition is false")

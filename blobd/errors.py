"""The error codes of the HTTP contract and the one exception every layer raises.

The JSON body ``{"error": code, "message": text}`` and the status come from
here alone; the HTTP error middleware renders a :class:`BlobdError` and
nothing else builds error responses.
"""

from __future__ import annotations

from typing import Any, Mapping

# code -> HTTP status: those API.md lists, and the ones it leaves to the
# project (405, 412, 417, 423, 503), each with its own status.
STATUS: dict[str, int] = {
    "invalid_hash": 400,
    "digest_mismatch": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "precondition_failed": 412,
    "too_large": 413,
    "unsupported_media_type": 415,
    "bad_range": 416,
    "expectation_failed": 417,
    "locked": 423,
    "internal": 500,
    "unavailable": 503,
    "quota_exceeded": 507,
    "insufficient_storage": 507,
}


class BlobdError(Exception):
    """A failure with a contract error code.

    ``extra`` fields are merged into the JSON body (e.g. ``missing`` for an
    incomplete upload); ``headers`` are added to the response (e.g.
    ``Content-Range`` on 416). ``status`` overrides the code's usual status
    for protocols that need their own (tus answers 460 on checksum mismatch).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        if code not in STATUS:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})
        self.status = status or STATUS[code]

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class BodyStalled(BlobdError):
    """No byte of a request body came for ``[uploads] idle_timeout_seconds``:
    a client whose network vanished without a FIN (or one that holds a
    connection open on purpose) would otherwise hold it, and what it
    reserved, until TCP gave up, hours later."""

    def __init__(self, idle: float, advice: str = "send it again") -> None:
        super().__init__("bad_request", f"no bytes of the body came for {idle:g} s; {advice}")


class BodyTakenOver(BlobdError):
    """Another request for the same part of an upload asked this one to let
    go: a client resuming after its network vanished mid-body, whose old
    request would otherwise hold the upload until its idle timeout (longer
    than stock tus clients retry)."""

    def __init__(self) -> None:
        super().__init__("conflict", "another request for this upload took it over;"
                         " what had arrived of this one is kept where it can be")


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first failure of a TaskGroup's exception group (nested groups
    unwrapped), to raise as itself: callers and the CLI's one-line errors
    handle a BlobdError or an OSError, not a group. The others failed at
    about the same moment, mostly for the same reason."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


class ConfigError(Exception):
    """A configuration problem; the message names the offending key."""

"""What can go wrong talking to the mirror, as one exception type."""

from __future__ import annotations

from typing import Any

# Error codes a later attempt may get past; any 5xx and 429 are retryable too.
_RETRYABLE_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
     "Throttling", "ThrottlingException", "RequestTimeTooSkewed"}
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
# 5xx answers that say "not now" (a gateway without its backend, an
# overloaded server), not "this object is broken".
_UNAVAILABLE_STATUSES = frozenset({502, 503, 504})


class S3Error(Exception):
    """Any failure talking to the mirror. `retryable` says whether the same
    request may succeed later (connection trouble, 5xx, throttling); `code`
    is the S3 error code when the server gave one; `status` the HTTP status
    of the server's error answer, 0 when there was none (no connection, a
    timeout, a body cut short); `cut_at`, for a body that ended before its
    Content-Length, the bytes received."""

    def __init__(self, message: str, retryable: bool, code: str | None = None,
                 status: int = 0, cut_at: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code
        self.status = status
        self.cut_at = cut_at

    @property
    def not_found(self) -> bool:
        return self.code in _NOT_FOUND_CODES

    @property
    def server_fault(self) -> bool:
        """The server answered with an error of its own side: 500 and the
        like, not 502/503/504, which a gateway or an overloaded server
        answers while the store is away. A store that finds its copy of an
        object damaged answers so (SeaweedFS: 500 InternalError when a
        needle fails its CRC); one that is down never does."""
        return self.status >= 500 and self.status not in _UNAVAILABLE_STATUSES


def client_error(action: str, error: Any) -> S3Error:
    """A botocore ClientError (the server answered with an error) as S3Error."""
    details = error.response.get("Error", {})
    status = status_of(error)
    code = str(details.get("Code") or status)
    retryable = status >= 500 or status == 429 or code in _RETRYABLE_CODES
    message = details.get("Message") or ""
    return S3Error(f"{action}: {code} {message}".rstrip(), retryable, code=code,
                   status=status)


def status_of(error: Any) -> int:
    """The HTTP status of a botocore ClientError; 0 when there was none."""
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)

"""What can go wrong talking to the mirror, as one exception type."""

from __future__ import annotations

from typing import Any

# Error codes a later attempt may get past; any 5xx and 429 are retryable too.
_RETRYABLE_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
     "Throttling", "ThrottlingException", "RequestTimeTooSkewed"}
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})


class S3Error(Exception):
    """Any failure talking to the mirror. `retryable` says whether the same
    request may succeed later (connection trouble, 5xx, throttling); `code`
    is the S3 error code when the server gave one."""

    def __init__(self, message: str, retryable: bool, code: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code

    @property
    def not_found(self) -> bool:
        return self.code in _NOT_FOUND_CODES


def client_error(action: str, error: Any) -> S3Error:
    """A botocore ClientError (the server answered with an error) as S3Error."""
    details = error.response.get("Error", {})
    status = status_of(error)
    code = str(details.get("Code") or status)
    retryable = status >= 500 or status == 429 or code in _RETRYABLE_CODES
    message = details.get("Message") or ""
    return S3Error(f"{action}: {code} {message}".rstrip(), retryable, code=code)


def status_of(error: Any) -> int:
    """The HTTP status of a botocore ClientError; 0 when there was none."""
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)

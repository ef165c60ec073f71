"""Blob addresses: the only gate between a client string and a blob.

An address is a BLAKE3-256 digest in hex, or ``sha256:<hex>`` for clients
that can only compute SHA-256, optionally followed by a file extension that
players like (``<hash>.mp3``). Everything else is ``invalid_hash`` before any
lookup or path is built, so no client string ever reaches the file system.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BlobdError

_ADDRESS = re.compile(
    r"(?P<sha>sha256:)?(?P<hex>[0-9a-fA-F]{64})(?:\.[A-Za-z0-9]{1,16})?"
)
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Address:
    """A parsed address; ``digest`` is lower-case hex."""

    algorithm: str  # "blake3" or "sha256"
    digest: str

    @property
    def is_blake3(self) -> bool:
        return self.algorithm == "blake3"

    def __str__(self) -> str:
        return self.digest if self.is_blake3 else f"sha256:{self.digest}"


def parse_address(text: str) -> Address:
    match = _ADDRESS.fullmatch(text)
    if match is None:
        raise BlobdError(
            "invalid_hash",
            "address must be 64 hex characters of BLAKE3 (or sha256:<64 hex>), "
            "optionally with a file extension",
        )
    algorithm = "sha256" if match["sha"] else "blake3"
    return Address(algorithm, match["hex"].lower())


def is_blake3_hex(text: str) -> bool:
    """True for a canonical (lower-case) 64-hex digest, as stored in the index."""
    return _HEX64.fullmatch(text) is not None


_REF_NAME = re.compile(r"[A-Za-z0-9._:@-]{1,256}")


def parse_ref_name(text: str) -> str:
    """A reference name: 1-256 characters from ``A-Z a-z 0-9 . _ - : @``."""
    if not _REF_NAME.fullmatch(text):
        raise BlobdError("bad_request",
                         "a reference name is 1-256 characters from A-Z a-z 0-9 . _ - : @")
    return text

"""What a blob is: its content type (and, later, audio metadata).

Bytes win over the client's claim when they identify a known audio format;
otherwise a specific client type is kept and a generic or absent one becomes
``application/octet-stream``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .audio import sniff_mime
from .files import Digests
from .store import Store

GENERIC_TYPES = frozenset({
    "", "application/octet-stream", "application/x-www-form-urlencoded",
    "binary/octet-stream",
})
FALLBACK_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class Description:
    content_type: str
    audio: dict[str, Any] | None = None


def normalise_type(value: str | None) -> str:
    """The media type without parameters, lower case ('' when absent)."""
    return (value or "").split(";", 1)[0].strip().lower()


async def describe(store: Store, path: Path, digests: Digests,
                   client_type: str | None) -> Description:
    claimed = normalise_type(client_type)
    sniffed = sniff_mime(digests.head)
    if sniffed is not None:
        return Description(sniffed)
    if claimed not in GENERIC_TYPES:
        return Description(claimed)
    return Description(FALLBACK_TYPE)

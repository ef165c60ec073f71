"""What fsck found and what it did about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# kind -> what it means, in the order the summary lists them.
KINDS = {
    "tmp": "leftover temp file",
    "upload": "upload session file without its session, or session without its file",
    "short": "upload session file shorter than its length (its room never allocated)",
    "ahead": "deferred-length upload holding room past its offset (a PATCH cut off)",
    "missing": "indexed blob without its file",
    "size": "blob file of the wrong size",
    "corrupt": "blob file whose content does not match its hash",
    "sha256": "index row with a wrong SHA-256",
    "misplaced": "blob file in the wrong shard directory",
    "orphan": "blob file the index does not know",
    "stray": "entry in the blob tree blobd never makes",
    "unreadable": "file or directory fsck could not read (its blobs not checked)",
    "refcount": "reference count that differs from the references",
    "holdings": "per-owner holding that differs from the references",
    "usage": "owner usage that differs from its references",
    "reserved": "owner reservation that differs from its open upload sessions",
    "quarantined": "file in quarantine/ for you to inspect (not a problem of the store)",
}
# Kinds reported for the owner's attention that leave the store sound: the
# scrub or --repair moved these files out of it (their blobs, when still
# without a good file, are reported as missing), so fsck does not fail on them.
NOTICES = frozenset({"quarantined"})

# Kinds whose subject is the digest of a blob lacking its sound file.
DAMAGED_BLOB_KINDS = frozenset({"missing", "size", "corrupt"})


@dataclass
class Problem:
    kind: str
    subject: str          # a digest, "owner/digest", an owner, or a path
    detail: str
    repaired: bool = False
    action: str = ""      # what --repair did, or why it could not
    # What the problem was judged on (file identity, digests, path), for
    # re-checking under the lock and for the repair.
    evidence: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind

    def line(self) -> str:
        text = f"{self.kind}: {self.subject}: {self.detail}"
        return f"{text} -> {self.action}" if self.action else text


@dataclass
class Report:
    live: bool = False            # a server was running: tmp/, uploads/ left alone
    verified: bool = False
    blobs: int = 0                # index rows compared with the disk
    files: int = 0                # blob files found in their right place
    bytes_verified: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def remaining(self) -> list[Problem]:
        return [p for p in self.problems if not p.repaired and p.kind not in NOTICES]

    @property
    def ok(self) -> bool:
        return not self.remaining

    def damaged_blobs(self) -> list[str]:
        """Digests of the blobs still without a sound file (missing, or of
        the wrong size or content): a mirror's copy would fix them."""
        return list(dict.fromkeys(p.subject for p in self.remaining
                                  if p.kind in DAMAGED_BLOB_KINDS))

    def counts(self) -> dict[str, tuple[int, int]]:
        """kind -> (found, repaired), for the kinds that were found."""
        out: dict[str, tuple[int, int]] = {}
        for kind in KINDS:
            found = [p for p in self.problems if p.kind == kind]
            if found:
                out[kind] = (len(found), sum(p.repaired for p in found))
        return out

    def summary(self) -> list[str]:
        mode = ("beside a running server (tmp/ and uploads/ not checked)" if self.live
                else "offline")
        lines = [f"checked {self.blobs} indexed blobs and {self.files} blob files {mode}"
                 f" in {self.seconds:.1f}s"
                 + (f"; re-hashed {self.bytes_verified} bytes" if self.verified else "")]
        for kind, (found, repaired) in self.counts().items():
            fixed = f", {repaired} repaired" if repaired else ""
            lines.append(f"  {KINDS[kind]}: {found}{fixed}")
        if all(p.kind in NOTICES for p in self.problems):
            lines.append("  no problems found")
        elif self.remaining:
            lines.append(f"  {len(self.remaining)} problem(s) remain")
        else:
            lines.append("  every problem was repaired")
        return lines

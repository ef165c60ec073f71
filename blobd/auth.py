"""Bearer tokens: creation, storage (hashed) and checking (constant time).

A token is ``bd_<id>_<secret>``; the index keeps only the SHA-256 of the
whole token. The lookup is by that digest, and the stored digest is compared
again with :func:`hmac.compare_digest`, so neither the lookup nor the
comparison leaks how much of a guessed token was right.

Every request carries a token, so a server keeps the tokens it has just
seen valid in a :class:`TokenCache` (``Store.tokens``) for
``TOKEN_CACHE_SECONDS``. Code that revokes a token inside a server process
clears that cache, so the revocation holds at once there; a token revoked
by another process (``blobd token revoke``, another worker) is still
accepted for at most that long, which is why the CLI waits that long before
it says the token is revoked. Unknown tokens are never cached, so a new
token works at once and guessing cannot fill the cache.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import aiosqlite

from .errors import BlobdError
from .ttlcache import TtlCache

SCOPES = ("read", "write", "admin")
TOKEN_CACHE_SECONDS = 1.0
TOKEN_CACHE_SIZE = 1024
_OWNER = re.compile(r"[A-Za-z0-9._@-]{1,64}")
MAX_LABEL = 200


@dataclass(frozen=True)
class Principal:
    owner: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class TokenCache(TtlCache[str, Principal]):
    """Token digest -> the principal it authenticated, for a short while."""

    def __init__(self, ttl: float = TOKEN_CACHE_SECONDS,
                 size: int = TOKEN_CACHE_SIZE) -> None:
        super().__init__(ttl, size)


def check_owner(owner: str) -> str:
    if not _OWNER.fullmatch(owner):
        raise BlobdError("bad_request",
                         "an owner is 1-64 characters from A-Z a-z 0-9 . _ @ -")
    return owner


def check_label(label: str) -> str:
    """A token's label: one line of printable text, so `token list`'s table
    and the admin API's listing show it as it was meant."""
    if len(label) > MAX_LABEL or not label.isprintable():
        raise BlobdError("bad_request", f"label: printable text of at most {MAX_LABEL}"
                         " characters, on one line")
    return label


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = scopes - set(SCOPES)
    if not scopes or unknown:
        raise BlobdError("bad_request",
                         f"scopes must be a comma-separated subset of {','.join(SCOPES)}")
    return scopes


def token_digest(token: str) -> str:
    # surrogateescape: aiohttp hands header bytes that are not UTF-8 over as
    # surrogates; such a token matches nothing, and must say so (401).
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


async def create_token(conn: aiosqlite.Connection, owner: str, scopes: frozenset[str],
                       label: str = "") -> tuple[str, str]:
    """Store a new token; returns (id, token). The token is shown only once."""
    check_owner(owner)
    check_label(label)
    token_id = secrets.token_hex(4)
    token = f"bd_{token_id}_{secrets.token_urlsafe(32)}"
    ordered = ",".join(s for s in SCOPES if s in scopes)
    await conn.execute(
        "INSERT INTO tokens (id, token_hash, owner, scopes, label, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (token_id, token_digest(token), owner, ordered, label, time.time()))
    return token_id, token


async def list_tokens(conn: aiosqlite.Connection, owner: str | None = None) -> list[dict]:
    sql = "SELECT id, owner, scopes, label, created_at FROM tokens"
    params: tuple = ()
    if owner is not None:
        sql, params = sql + " WHERE owner = ?", (owner,)
    async with conn.execute(sql + " ORDER BY created_at", params) as cur:
        return [dict(row) for row in await cur.fetchall()]


async def revoke_token(conn: aiosqlite.Connection, token_id: str) -> bool:
    cur = await conn.execute("DELETE FROM tokens WHERE id = ?", (token_id,))
    return cur.rowcount == 1


async def authenticate(conn: aiosqlite.Connection, token: str,
                       cache: TokenCache | None = None) -> Principal | None:
    digest = token_digest(token)
    found = cache.get(digest) if cache is not None else None
    if found is not None:
        return found
    rows = await conn.execute_fetchall("SELECT token_hash, owner, scopes FROM tokens"
                                       " WHERE token_hash = ?", (digest,))
    row = rows[0] if rows else None
    if row is None or not hmac.compare_digest(row["token_hash"], digest):
        return None
    found = Principal(row["owner"], frozenset(row["scopes"].split(",")))
    if cache is not None:
        cache.put(digest, found)
    return found


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()

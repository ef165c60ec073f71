"""The token cache (blobd/auth.py): a valid token is looked up once per
``TOKEN_CACHE_SECONDS``; revocation in the same store drops it at once, and
in another process takes effect within the cache's lifetime, which
``blobd token revoke`` waits out before it returns."""

from __future__ import annotations

import asyncio
import time

from blobd import auth
from blobd.http.keys import STORE

P = auth.Principal("alice", frozenset({"read"}))


def test_entries_expire_and_the_oldest_make_room() -> None:
    cache = auth.TokenCache(ttl=0.05, size=2)
    cache.put("a", P)
    assert cache.get("a") == P
    time.sleep(0.06)
    assert cache.get("a") is None
    for key in "xyz":
        cache.put(key, P)
    assert cache.get("x") is None and cache.get("y") == P and cache.get("z") == P
    cache.clear()
    assert cache.get("z") is None


async def test_a_cached_token_outlives_a_revocation_elsewhere_until_it_expires(server) -> None:
    login = await server()
    alice = await login("alice")
    store = alice.client.app[STORE]
    store.tokens.ttl = 0.3
    assert (await alice.request("GET", "/blobs")).status == 200
    # Revoked behind the cache's back, as another process would.
    async with store.write() as tx:
        await tx.conn.execute("DELETE FROM tokens")
    assert (await alice.request("GET", "/blobs")).status == 200
    await asyncio.sleep(0.35)
    assert (await alice.request("GET", "/blobs")).status == 401
    # Unknown tokens are not cached: one created now works at once.
    async with store.write() as tx:
        _, token = await auth.create_token(tx.conn, "alice", frozenset({"read"}))
    alice.token = token
    assert (await alice.request("GET", "/blobs")).status == 200


async def test_clearing_the_cache_revokes_at_once(server) -> None:
    login = await server()
    alice = await login("alice")
    store = alice.client.app[STORE]
    assert (await alice.request("GET", "/blobs")).status == 200
    async with store.write() as tx:
        await tx.conn.execute("DELETE FROM tokens")
    store.tokens.clear()
    assert (await alice.request("GET", "/blobs")).status == 401

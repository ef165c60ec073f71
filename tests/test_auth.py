"""Bearer tokens, scopes and anonymous reads."""

from __future__ import annotations

import pytest

from conftest import Api, b3


async def test_missing_and_invalid_tokens_are_401(alice):
    anonymous = Api(alice.client, None, "")
    for method, path in (("GET", f"/blobs/{b3(b'x')}"), ("PUT", f"/blobs/{b3(b'x')}"),
                         ("GET", "/blobs"), ("GET", "/refs")):
        resp = await anonymous.request(method, path)
        assert resp.status == 401 and (await resp.json())["error"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    forged = Api(alice.client, alice.token[:-2] + "xx", "")
    assert (await forged.request("GET", "/blobs")).status == 401


async def test_scopes(server):
    login = await server()
    reader = await login("alice", "read")
    writer = await login("alice", "write")
    admin = await login("root", "admin")
    resp = await reader.put(b"data")
    assert resp.status == 403 and (await resp.json())["error"] == "forbidden"
    assert (await writer.put(b"data")).status == 201
    assert (await writer.request("GET", f"/blobs/{b3(b'data')}")).status == 403
    assert (await reader.request("GET", f"/blobs/{b3(b'data')}")).status == 200
    assert (await admin.put(b"admin data")).status == 201
    assert (await admin.request("GET", f"/blobs/{b3(b'admin data')}")).status == 200


async def test_anonymous_read(server):
    login = await server(auth={"anonymous_read": True})
    alice = await login("alice")
    await alice.put(b"public")
    anonymous = Api(alice.client, None, "")
    assert (await anonymous.request("GET", f"/blobs/{b3(b'public')}")).status == 200
    assert (await anonymous.request("HEAD", f"/blobs/{b3(b'public')}")).status == 200
    assert (await anonymous.request("GET", f"/blobs/{b3(b'public')}/meta")).status == 200
    assert (await anonymous.put(b"nope")).status == 401
    assert (await anonymous.request("GET", "/blobs")).status == 401
    # A token that is present but wrong is still refused.
    forged = Api(alice.client, "bd_x_y", "")
    assert (await forged.request("GET", f"/blobs/{b3(b'public')}")).status == 401


@pytest.mark.parametrize("anonymous_read", [True, False])
async def test_a_credential_of_another_scheme_counts_as_no_token(server, anonymous_read):
    """Documented (docs/api.md, Authentication): a reverse proxy with Basic
    auth in front of blobd forwards the browser's Basic credentials, and
    anonymous reads must still work behind it. A bearer token, though, is
    always checked."""
    login = await server(auth={"anonymous_read": anonymous_read})
    alice = await login("alice")
    await alice.put(b"public")
    blob = f"/blobs/{b3(b'public')}"
    for path in (blob, f"{blob}/meta"):
        basic = await alice.client.get(path, headers={"Authorization": "Basic dTpw"})
        assert basic.status == (200 if anonymous_read else 401), path
        junk = await alice.client.get(path, headers={"Authorization": "Bearer junk"})
        assert junk.status == 401 and (await junk.json())["error"] == "unauthorized"
    # Never more than anonymous: Basic is no token on routes that need one.
    listing = await alice.client.get("/blobs", headers={"Authorization": "Basic dTpw"})
    assert listing.status == 401


async def test_tokens_are_stored_hashed(alice):
    rows = await alice.store.db.fetchall("SELECT * FROM tokens")
    assert rows and all(alice.token not in tuple(map(str, tuple(r))) for r in rows)


async def test_healthz_needs_no_token(alice):
    resp = await Api(alice.client, None, "").request("GET", "/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}


async def test_admin_api_creates_lists_and_revokes_tokens(server):
    login = await server()
    admin = await login("root", "admin")
    resp = await admin.request("POST", "/admin/tokens", json={
        "owner": "bob", "scopes": ["read"], "label": "kitchen speaker"})
    assert resp.status == 201
    created = await resp.json()
    assert created["owner"] == "bob" and created["scopes"] == ["read"]
    assert created["label"] == "kitchen speaker"
    assert resp.headers["Location"] == f"/admin/tokens/{created['id']}"
    bob = {"Authorization": f"Bearer {created['token']}"}
    assert (await admin.client.get("/quota", headers=bob)).status == 200
    assert (await admin.client.post("/blobs", data=b"x", headers=bob)).status == 403

    listing = await (await admin.request("GET", "/admin/tokens?owner=bob")).json()
    assert [t["id"] for t in listing["tokens"]] == [created["id"]]
    assert "token" not in listing["tokens"][0]
    everyone = await (await admin.request("GET", "/admin/tokens")).json()
    assert {t["owner"] for t in everyone["tokens"]} == {"root", "bob"}

    gone = await admin.request("DELETE", f"/admin/tokens/{created['id']}")
    assert gone.status == 204
    assert (await admin.client.get("/quota", headers=bob)).status == 401
    again = await admin.request("DELETE", f"/admin/tokens/{created['id']}")
    assert again.status == 404


@pytest.mark.parametrize("body", [
    {}, {"owner": "no spaces"}, {"owner": "bob", "scopes": ["root"]},
    {"owner": "bob", "scopes": []}, {"owner": "bob", "label": "x" * 201},
    {"owner": "bob", "secret": "mine"}, {"owner": 7},
])
async def test_admin_token_creation_refuses_bad_fields(server, body):
    login = await server()
    admin = await login("root", "admin")
    resp = await admin.request("POST", "/admin/tokens", json=body)
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"
    listing = await (await admin.request("GET", "/admin/tokens")).json()
    assert len(listing["tokens"]) == 1  # the admin's own


async def test_only_admins_manage_tokens(alice):
    assert (await alice.request("GET", "/admin/tokens")).status == 403
    resp = await alice.request("POST", "/admin/tokens", json={"owner": "alice"})
    assert resp.status == 403

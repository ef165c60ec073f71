"""GET /metrics: Prometheus text, bounded labels, figures from the store."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from blobd.http.takeover import MIN_SIZE
from conftest import b3

DATA = os.urandom(50_000)
ROUTES = {"/blobs/{address}", "/blobs/{address}/meta", "/blobs", "/blobs/{tail}",
          "/refs/{name}", "/refs", "/quota", "/admin/owners/{owner}/quota", "/stats",
          "/metrics", "/healthz", "(unmatched)"}


async def scrape(api) -> dict[tuple[str, tuple], float]:
    resp = await api.request("GET", "/metrics")
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_requests_latency_and_bytes_by_route(server):
    login = await server()
    admin, alice = await login("root", "admin"), await login("alice")
    digest = b3(DATA)
    assert (await alice.put(DATA)).status == 201
    assert (await alice.put(DATA)).status == 200
    assert len(await (await alice.request("GET", f"/blobs/{digest}")).read()) == len(DATA)
    ranged = await alice.request("GET", f"/blobs/{digest}", headers={"Range": "bytes=0-999"})
    assert len(await ranged.read()) == 1000
    assert (await alice.request("HEAD", f"/blobs/{digest}")).status == 200
    assert (await alice.request("GET", f"/blobs/{b3(b'none')}")).status == 404
    s = await scrape(admin)
    route = "/blobs/{address}"
    for method, status, count in (("PUT", "201", 1), ("PUT", "200", 1), ("GET", "200", 1),
                                  ("GET", "206", 1), ("HEAD", "200", 1), ("GET", "404", 1)):
        assert value(s, "blobd_http_requests_total", route=route, method=method,
                     status=status) == count, (method, status)
    assert value(s, "blobd_http_request_duration_seconds_count", route=route,
                 method="GET") == 3
    assert value(s, "blobd_http_received_bytes_total", route=route) == 2 * len(DATA)
    # sendfile'd bodies are counted as sent; HEAD sends none.
    assert value(s, "blobd_http_sent_bytes_total", route=route) >= len(DATA) + 1000
    assert value(s, "blobd_http_sent_bytes_total", route=route) < len(DATA) + 2000


async def test_large_bodies_read_off_the_socket_are_counted(server):
    """Bodies of 8 MiB and more bypass aiohttp's stream (sockbody.py):
    most audio files. Their bytes count all the same."""
    login = await server()
    admin, alice = await login("root", "admin"), await login("alice")
    big = os.urandom(MIN_SIZE + 12345)
    assert (await alice.put(big)).status == 201
    s = await scrape(admin)
    assert value(s, "blobd_http_received_bytes_total", route="/blobs/{address}") == len(big)


async def test_labels_stay_bounded_whatever_the_paths(server):
    login = await server()
    admin, alice = await login("root", "admin"), await login("alice")
    for i in range(30):
        await alice.request("GET", f"/blobs/{b3(str(i).encode())}")
        await alice.request("GET", f"/no/such/path/{i}")
        await alice.request("GET", f"/refs/name-{i}")
        await alice.request("PROPFIND", f"/blobs/{'0' * 64}")
    s = await scrape(admin)
    routes = {dict(labels).get("route") for (_, labels) in s if dict(labels).get("route")}
    assert routes <= ROUTES, routes - ROUTES
    methods = {dict(labels).get("method") for (_, labels) in s} - {None}
    assert methods <= {"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "other"}
    assert value(s, "blobd_http_requests_total", route="(unmatched)", method="GET",
                 status="404") == 30
    assert value(s, "blobd_http_requests_total", route="/blobs/{tail}", method="other",
                 status="405") == 30


async def test_store_figures(server):
    login = await server()
    admin, alice, bob = await login("root", "admin"), await login("alice"), await login("bob")
    await alice.put(DATA)
    await bob.put(DATA)
    await bob.put(b"small")
    with sqlite3.connect(admin.data_dir / "index.sqlite3") as conn:
        conn.execute("INSERT INTO mirror_queue (hash, op, enqueued_at) VALUES (?, 'put', ?)",
                     ("a" * 64, time.time() - 600))
        conn.execute("INSERT INTO uploads (id, owner, protocol, size, chunk_size, created_at,"
                     " expires_at) VALUES ('s1', 'alice', 'native', 10, 10, 0, 9e9)")
    s = await scrape(admin)
    assert value(s, "blobd_blobs") == 2
    assert value(s, "blobd_stored_bytes") == len(DATA) + 5
    assert value(s, "blobd_logical_bytes") == 2 * len(DATA) + 5
    assert value(s, "blobd_puts_total") == 3
    assert value(s, "blobd_dedup_hits_total") == 1
    assert value(s, "blobd_upload_sessions_open") == 1
    assert value(s, "blobd_mirror_queue_depth") == 1
    assert 600 <= value(s, "blobd_mirror_oldest_pending_seconds") < 660
    assert value(s, "blobd_disk_free_bytes") > 0


@pytest.mark.parametrize("anonymous, scopes, status", [
    (False, None, 401), (False, "read,write", 403), (False, "admin", 200),
    (True, None, 200), (True, "read", 403),
])
async def test_who_may_scrape(server, anonymous, scopes, status):
    login = await server(auth={"anonymous_metrics": anonymous})
    api = await login("someone", scopes or "read")
    if scopes is None:
        api.token = None
    assert (await api.request("GET", "/metrics")).status == status
    # anonymous_metrics opens /metrics only, nothing else admin.
    if scopes is None:
        assert (await api.request("GET", "/stats")).status == 401

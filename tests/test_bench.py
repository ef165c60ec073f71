"""The benchmark's own machinery (bench/), at toy sizes: what it measures
must stay what it claims to measure. No figure is timed here; the real
runs are `python bench/run.py`, outside the test suite."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from bench import report
from bench.index_scale import index_scale
from bench.workloads import Bench, Settings

from serverproc import REPO_ROOT, BlobdServer, blobd_env, http


async def test_index_scale_fills_the_current_schema_and_reads_it_back(tmp_path: Path) -> None:
    """populate.py writes rows into whatever schema blobd made; a schema
    change it cannot fill must fail the workload, not measure nothing.
    Both sizes are measured, each server stopped and removed afterwards."""
    settings = dataclasses.replace(Settings.for_mode(True), index_sizes=(300, 600),
                                   index_samples=20)
    async with aiohttp.ClientSession() as session:
        bench = Bench(settings, tmp_path, session)
        figures = await index_scale(bench)
    assert set(figures) == {f"{name}@{n}" for n in (300, 600) for name in (
        "index_startup_s", "index_head_p50_ms", "index_head_p99_ms", "index_get_p50_ms")}
    assert all(value > 0 for value in figures.values())
    assert not list(tmp_path.glob("index-*"))  # its servers stopped, its files gone


def test_load_generator_sends_only_unique_bodies(tmp_path: Path) -> None:
    """Every upload of bench.load is new content: no server can answer one
    from its deduplication, so the small-PUT figures compare stores."""
    with BlobdServer(tmp_path, {"storage": {"fsync": False}}) as server:
        token = server.token("bench", "read,write,admin")
        done = subprocess.run(
            [sys.executable, "-m", "bench.load", "--base-url", server.url, "--method", "POST",
             "--path", "/blobs", "--header", f"Authorization: Bearer {token}",
             "--connections", "4", "--duration", "1", "--body-size", "4096"],
            cwd=REPO_ROOT, env=blobd_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        load = json.loads(done.stdout.splitlines()[-1])
        status, body = http("GET", f"{server.url}/stats", token)
    assert status == 200
    stats = json.loads(body)
    assert load["errors"] == 0 and load["requests"] > 0
    assert len(load["latencies_ms"]) == load["requests"]
    # Requests finishing after the window are stored but not counted.
    assert stats["puts"] >= load["requests"]
    assert stats["put_dedup_hits"] == 0
    assert stats["blobs"] == stats["puts"]


def _results(**samples: dict[str, list[float]]) -> report.Results:
    results = report.Results()
    for key, columns in samples.items():
        for column, values in columns.items():
            for value in values:
                results.add(column, {key: value})
    return results


def _target(metric: str) -> report.Target:
    return next(t for t in report.TARGETS if t.metric == metric)


def test_targets_compare_medians_and_peaks_with_their_reference() -> None:
    results = _results(
        small_put_rps={report.BLOBD: [900, 1300, 1100], "seaweedfs": [1000, 1200, 1150]},
        small_put_p99_ms={report.BLOBD: [40, 90, 45], "seaweedfs": [50, 50, 50]},
        rss_peak_mb={report.BLOBD: [60, 101, 70]},
    )
    # Medians: 1100 < 1150 req/s, 45 <= 50 ms.
    assert _target("small_put_rps").check(results) == (1100, 1150, False)
    assert _target("small_put_p99_ms").check(results) == (45, 50, True)
    # A peak is the maximum over repetitions, against a fixed bound.
    assert _target("rss_peak_mb").check(results) == (101, 100, False)


def test_a_target_without_its_reference_is_undecided() -> None:
    results = _results(small_get_rps={report.BLOBD: [5000]})
    assert _target("small_get_rps").check(results) == (5000, None, None)


@pytest.mark.parametrize(("head_1m", "passed"), [(0.55, True), (0.56, False)])
def test_head_at_a_million_is_held_to_ten_percent_of_a_thousand(head_1m: float,
                                                                passed: bool) -> None:
    results = _results(**{"index_head_p50_ms@1000": {report.BLOBD: [0.5]},
                          "index_head_p50_ms@1000000": {report.BLOBD: [head_1m]}})
    report.add_index_metrics(results, (1_000, 1_000_000))
    value, threshold, ok = _target("index_head_p50_ms@1000000").check(results)
    assert value == head_1m and threshold == pytest.approx(0.55) and ok is passed

"""Results of a run: samples per metric and server, the targets, the table, the JSON."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from bench.workloads import METRICS, Metric, index_metric_keys

BLOBD = "blobd(fsync)"
BLOBD_NOFSYNC = "blobd(nofsync)"
SERVER_COLUMNS = [BLOBD, BLOBD_NOFSYNC, "nginx", "seaweedfs"]
MACHINE = "machine"
ONE_MILLION, ONE_THOUSAND = 1_000_000, 1_000


class Results:
    """Samples per (metric, column), failures per (workload, column), and why a column is n/a."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.failures: dict[tuple[str, str], str] = {}
        self.unavailable: dict[str, str] = {}       # column -> reason (server failed to start...)
        self.not_available: dict[str, str] = {}     # workload -> reason (e.g. ImportError)
        self.metrics: dict[str, Metric] = dict(METRICS)
        self.selected: list[str] = []               # workloads this run attempts: their rows are shown

    def add(self, column: str, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.samples[key][column].append(value)

    def fail(self, workload: str, column: str, message: str) -> None:
        self.failures.setdefault((workload, column), message)

    def value(self, key: str, column: str) -> float | None:
        samples = self.samples.get(key, {}).get(column)
        if not samples:
            return None
        metric = self.metrics[key]
        return max(samples) if metric.aggregate == "max" else statistics.median(samples)


@dataclass(frozen=True)
class Target:
    """blobd(fsync)'s `metric` compared (op) with factor x the reference (a fixed number if ref is None)."""

    name: str
    metric: str
    ref: tuple[str, str] | None     # (column, metric)
    factor: float
    op: str                         # ">=", "<=", "<"

    def check(self, results: Results, column: str = BLOBD) -> tuple[float | None, float | None, bool | None]:
        value = results.value(self.metric, column)
        base = 1.0 if self.ref is None else results.value(self.ref[1], self.ref[0])
        if value is None or base is None:
            return value, None, None
        threshold = self.factor * base
        passed = {">=": value >= threshold, "<=": value <= threshold, "<": value < threshold}[self.op]
        return value, threshold, passed


TARGETS = [
    Target("large GET >= 0.95x nginx", "large_get_mb_s", ("nginx", "large_get_mb_s"), 0.95, ">="),
    Target("large PUT (fsync) >= 0.9x dd conv=fsync", "large_put_mb_s", (MACHINE, "dd_fsync_mb_s"), 0.9, ">="),
    Target("small GET req/s >= 1.0x SeaweedFS", "small_get_rps", ("seaweedfs", "small_get_rps"), 1.0, ">="),
    Target("small GET p99 <= SeaweedFS", "small_get_p99_ms", ("seaweedfs", "small_get_p99_ms"), 1.0, "<="),
    Target("small PUT req/s >= 1.0x SeaweedFS", "small_put_rps", ("seaweedfs", "small_put_rps"), 1.0, ">="),
    Target("small PUT p99 <= SeaweedFS", "small_put_p99_ms", ("seaweedfs", "small_put_p99_ms"), 1.0, "<="),
    Target("peak RSS <= 100 MB (8 parallel PUTs)", "rss_peak_mb", None, 100.0, "<="),
    Target("start-up with 1M blobs < 1 s", f"index_startup_s@{ONE_MILLION}", None, 1.0, "<"),
    Target("HEAD p50 at 1M within 10% of 1k", f"index_head_p50_ms@{ONE_MILLION}",
           (BLOBD, f"index_head_p50_ms@{ONE_THOUSAND}"), 1.1, "<="),
]


# ---------------------------------------------------------------- the table


def fmt(value: float | None) -> str:
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def applies(workload: str, column: str) -> bool:
    """Limits are the machine's; the index-scale workload runs blobd with fsync only."""
    if workload == "limits":
        return column == MACHINE
    if workload == "index_scale":
        return column == BLOBD
    return column != MACHINE


def cell(results: Results, key: str, column: str, workload: str) -> str:
    if not applies(workload, column):
        return ""
    value = results.value(key, column)
    if value is not None:
        return fmt(value)
    if column in results.unavailable:
        return "n/a"
    if (workload, column) in results.failures:
        return "ERR"
    if workload in results.not_available and column == BLOBD:
        return "not avail."
    return ""


def ratio_cell(results: Results, key: str, other: str) -> str:
    parts = []
    for column in (BLOBD, BLOBD_NOFSYNC):
        mine, theirs = results.value(key, column), results.value(key, other)
        parts.append(f"{mine / theirs:.2f}" if mine is not None and theirs else "-")
    return "" if parts == ["-", "-"] else " / ".join(parts)


def target_cell(results: Results, key: str) -> str:
    for target in TARGETS:
        if target.metric == key:
            value, threshold, passed = target.check(results)
            verdict = {True: "PASS", False: "FAIL", None: "?"}[passed]
            bound = "" if threshold is None else f" {target.op} {fmt(threshold)}"
            return f"{verdict}{bound}"
    return ""


def rows(results: Results) -> list[list[str]]:
    out = []
    for key, metric in results.metrics.items():
        workload = metric.workload
        if workload not in results.selected:
            continue
        cells = [cell(results, key, c, workload) for c in [*SERVER_COLUMNS, MACHINE]]
        per_server = workload not in ("limits",)
        cells += [ratio_cell(results, key, "nginx") if per_server else "",
                  ratio_cell(results, key, "seaweedfs") if per_server else "",
                  target_cell(results, key)]
        out.append([f"{metric.label} ({metric.unit})", *cells])
    return out


def render_table(results: Results) -> str:
    header = ["workload", *SERVER_COLUMNS, MACHINE, "blobd÷nginx", "blobd÷seaweedfs", "target (blobd fsync)"]
    body = rows(results)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    sep = "-" * (sum(widths) + 2 * (len(widths) - 1))
    notes = ["ratios: blobd(fsync) / blobd(nofsync) over the other server; targets use blobd(fsync).",
             "MB = 10^6 bytes; values are medians over repetitions (peak RSS: maximum)."]
    return "\n".join([line(header), sep, *(line(r) for r in body), sep, *notes])


def add_index_metrics(results: Results, sizes: tuple[int, ...]) -> None:
    for n in sizes:
        results.metrics.update(index_metric_keys(n))


# ---------------------------------------------------------------- JSON


def to_json(results: Results, meta: dict, servers: dict[str, dict]) -> dict:
    metrics = {}
    for key, metric in results.metrics.items():
        if key not in results.samples:
            continue
        metrics[key] = {
            "label": metric.label, "unit": metric.unit, "higher_is_better": metric.higher_is_better,
            "aggregate": metric.aggregate,
            "values": {col: {"value": results.value(key, col), "samples": s}
                       for col, s in results.samples[key].items()},
        }
    targets = []
    for target in TARGETS:
        for column in (BLOBD, BLOBD_NOFSYNC):
            value, threshold, passed = target.check(results, column)
            targets.append({"target": target.name, "server": column, "value": value,
                            "threshold": threshold, "op": target.op, "passed": passed})
    return {
        "meta": meta, "servers": servers, "metrics": metrics, "targets": targets,
        "failures": [{"workload": w, "server": c, "message": m} for (w, c), m in results.failures.items()],
        "not_available": results.not_available,
    }

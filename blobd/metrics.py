"""Prometheus metrics: one registry per application.

Request metrics are recorded by :func:`metrics_middleware`, labelled with the
route's canonical path (``/blobs/{address}``), never the raw path, so the
number of series stays bounded whatever clients ask for. Store figures
(blobs, bytes, dedup hits, open sessions, mirror queue) are read from the
index when ``/metrics`` is scraped (:meth:`Metrics.render`), through the
same :func:`blobd.stats.figures` as ``/stats``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from datetime import datetime
from typing import Any, Awaitable, Callable, Iterator

from aiohttp import web
import prometheus_client
from prometheus_client import (CollectorRegistry, Counter, Histogram,
                               disable_created_metrics, generate_latest, mmap_dict,
                               multiprocess, values)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import stats
from .http import takeover
from .store import Store

log = logging.getLogger(__name__)

# The *_created series double every counter's output and nobody graphs them.
disable_created_metrics()
# prometheus_client's multiprocess mode: each process keeps its request
# metrics in files in this directory, and a scrape sums them all.
SHARED_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_between_processes(path: str) -> None:
    """For ``[server] workers = N``, in the supervisor before it forks: a
    scrape lands on one worker, which must answer for all of them, or the
    counters would jump between the workers' own figures from one scrape
    to the next (and never add up). A dead worker's files stay, so the
    sums never go down when it is replaced."""
    os.environ[SHARED_DIR_ENV] = path
    if _allocation_fits():
        # The one name MultiProcessValue opens its files with.
        values.MmapedDict = _AllocatedDict
    else:
        log.warning("prometheus_client %s keeps its metrics files otherwise than "
                    "blobd knows: they stay sparse, and a full data disk can stop "
                    "the workers", getattr(prometheus_client, "__version__", "?"))
    # Chosen by prometheus_client when it was imported, before the config
    # was read; no metric value exists yet (they are made in the workers).
    values.ValueClass = values.MultiProcessValue()


class _AllocatedDict(mmap_dict.MmapedDict):
    """prometheus_client's file of one process's values, with its blocks
    allocated before they are mapped.

    prometheus_client sizes (and grows) the file with truncate, which
    leaves it sparse: on a full disk the first store through the map into a
    page the disk has no block for is SIGBUS. The files live in the data
    dir, so a full data disk killed every worker at its next request, GETs
    and DELETEs included, and each replacement at its first. With the
    blocks allocated first, a full disk is an OSError the request's
    metrics can do without (:meth:`Metrics.observe`).
    """

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            _allocate(filename, mmap_dict._INITIAL_MMAP_SIZE)
        super().__init__(filename, read_mode)

    def _init_value(self, key: str) -> None:
        # The entry's length as the parent packs it: int32 length, key
        # padded to 8 bytes, two doubles.
        encoded = len(key.encode("utf-8"))
        needed = self._used + 4 + encoded + (8 - (encoded + 4) % 8) + 16
        capacity = self._capacity
        while needed > capacity:
            capacity *= 2
        if capacity != self._capacity:
            _allocate(self._fname, capacity, new=False)
        super()._init_value(key)


def _allocation_fits() -> bool:
    """Whether prometheus_client's file class is still the one
    :class:`_AllocatedDict` extends (its private parts are what it sizes)."""
    cls = mmap_dict.MmapedDict
    return (hasattr(mmap_dict, "_INITIAL_MMAP_SIZE") and hasattr(cls, "_init_value")
            and getattr(values, "MmapedDict", None) in (cls, _AllocatedDict)
            and {"_used", "_capacity", "_fname"} <= set(cls.__init__.__code__.co_names))


def _allocate(filename: str, size: int, *, new: bool = True) -> None:
    # A descriptor of its own: the parent's is O_APPEND, which glibc's
    # fallback for a file system without fallocate refuses.
    fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if new and os.fstat(fd).st_size:
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return  # nothing to allocate with: sparse, as before
            if new:
                # An empty file would break every scrape's reading of the
                # directory; the next value made tries again.
                os.unlink(filename)
            raise
    finally:
        os.close(fd)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Uploads of big recordings take minutes; the default buckets stop at 10 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 300.0)
UNMATCHED = "(unmatched)"
METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"})
# nginx's code for "the client closed the connection before the answer".
CLIENT_GONE = "499"


class StoreCollector(Collector):
    """Exposes the last snapshot of :func:`stats.figures`."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        if s is None:
            return
        gauges = [
            ("blobd_blobs", "Blobs somebody references", s["blobs"]),
            ("blobd_stored_bytes", "Bytes of referenced blobs, each once", s["stored_bytes"]),
            ("blobd_references", "References over all owners", s["references"]),
            ("blobd_logical_bytes", "Bytes the references would take without dedup",
             s["logical_bytes"]),
            ("blobd_grace_blobs", "Unreferenced blobs waiting for their grace period",
             s["grace"]["blobs"]),
            ("blobd_upload_sessions_open", "Resumable upload sessions neither completed nor expired",
             s["sessions_open"]),
            ("blobd_mirror_queue_depth", "Mirror operations waiting", s["mirror"]["pending"]),
            ("blobd_mirror_failing", "Mirror operations that have failed at least once",
             s["mirror"]["failed"]),
            ("blobd_mirror_oldest_pending_seconds",
             "Seconds since the oldest waiting mirror operation was queued (0: none)",
             s["mirror"]["oldest_pending_seconds"]),
            ("blobd_disk_free_bytes", "Free bytes on the data directory's file system",
             s["disk"]["free_bytes"]),
            ("blobd_disk_total_bytes", "Size of the data directory's file system",
             s["disk"]["total_bytes"]),
        ]
        scrub = s["scrub"]
        if scrub["last_pass_ended"] is not None:
            ended = datetime.fromisoformat(scrub["last_pass_ended"]).timestamp()
            gauges.append(("blobd_scrub_last_pass_end_timestamp_seconds",
                           "When the scrub last finished reading every blob file", ended))
        if scrub["missing"] is not None:
            gauges.append(("blobd_scrub_missing_files",
                           "Blobs the last completed scrub pass left without their file "
                           "(missing, or quarantined and not healed)", scrub["missing"]))
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=value)
        yield CounterMetricFamily("blobd_puts", "Blob stores (PUT, POST, sessions)",
                                  value=s["puts"])
        yield CounterMetricFamily("blobd_dedup_hits",
                                  "Blob stores whose content was already stored",
                                  value=s["put_dedup_hits"])
        yield CounterMetricFamily("blobd_scrub_blobs", "Blob files the scrub checked",
                                  value=scrub["blobs_checked"])
        yield CounterMetricFamily("blobd_scrub_bytes", "Bytes the scrub read and hashed",
                                  value=scrub["bytes_checked"])
        yield CounterMetricFamily("blobd_scrub_damaged",
                                  "Blob files the scrub found damaged and moved to quarantine",
                                  value=scrub["damaged"])


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("blobd_http_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("blobd_http_request_duration_seconds",
                                 "Time from request to answer", ["route", "method"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.received = Counter("blobd_http_received_bytes",
                                "Request body bytes read", ["route"], registry=self.registry)
        self.sent = Counter("blobd_http_sent_bytes", "Response body bytes sent",
                            ["route"], registry=self.registry)
        self.store = StoreCollector()
        self.registry.register(self.store)
        # A request's metrics could not be recorded (see observe).
        self.uncounted = False

    def observe(self, route: str, method: str, status: str, seconds: float,
                received: int, sent: int) -> None:
        try:
            self.requests.labels(route, method, status).inc()
            self.latency.labels(route, method).observe(seconds)
            if received:
                self.received.labels(route).inc(received)
            if sent:
                self.sent.labels(route).inc(sent)
        except OSError as exc:
            # workers = N: no room on the data disk for a new series; the
            # answer matters more than its count. Said once, not for every
            # request on a disk that has no room for a log either.
            if not self.uncounted:
                log.warning("requests not counted in the metrics: %s", exc)
            self.uncounted = True
            return
        if self.uncounted:
            log.info("requests counted in the metrics again")
            self.uncounted = False

    async def render(self, store: Store) -> bytes:
        self.store.snapshot = await stats.figures(store)
        shared = os.environ.get(SHARED_DIR_ENV)
        if not shared:
            return generate_latest(self.registry)
        every = CollectorRegistry()
        multiprocess.MultiProcessCollector(every, shared)
        every.register(self.store)  # from the index: the same in every worker
        return await asyncio.to_thread(generate_latest, every)


METRICS = web.AppKey("metrics", Metrics)
# Set by handlers that send a body themselves (sendfile), so the middleware
# counts what actually went out rather than what was announced.
BODY_BYTES_SENT = web.RequestKey("body_bytes_sent", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def _body_bytes(request: web.Request, response: web.StreamResponse | None) -> int:
    if BODY_BYTES_SENT in request:
        return request[BODY_BYTES_SENT]
    if response is None or request.method == "HEAD" or response.status in (204, 304):
        return 0
    return response.content_length or 0


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: sees every answer, errors included."""
    started = time.perf_counter()
    response: web.StreamResponse | None = None
    status = "500"
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    except web.HTTPException as exc:
        status = str(exc.status)
        raise
    except (asyncio.CancelledError, ConnectionError):
        # Gone mid-answer (a download dropped): no status reached anyone.
        status = CLIENT_GONE
        raise
    finally:
        method = request.method if request.method in METHODS else "other"
        request.app[METRICS].observe(
            route_label(request), method, status,
            time.perf_counter() - started, takeover.received_bytes(request),
            _body_bytes(request, response))

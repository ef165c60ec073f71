"""Background jobs that run on an interval until cancelled."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(interval: float, job: Callable[[], Awaitable[int]], done: str,
                *, at_start: bool = False) -> None:
    """Run ``job`` every ``interval`` seconds (first at once if ``at_start``);
    log ``done % count`` when it did something. A failing run is logged
    and retried next time: background work must never die quietly."""
    if not at_start:
        await asyncio.sleep(interval)
    while True:
        try:
            count = await job()
            if count:
                log.info(done, count)
        except Exception:
            log.exception("background job failed (%s); will retry", done.split(" %", 1)[0])
        await asyncio.sleep(interval)

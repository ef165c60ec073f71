"""The mirror inside a running server: one bucket client, the queue worker,
the scheduled index backups, and the healer GET calls on."""

from __future__ import annotations

import asyncio
import logging

from ..config import MirrorConfig
from ..store import Store
from . import abandoned, backup
from .common import check_bucket, make_target
from .heal import Healer
from .worker import MirrorWorker

log = logging.getLogger(__name__)


class Mirror:
    """Built with the app (no connection is made until :meth:`start`);
    raises ConfigError at once when aiobotocore is missing."""

    def __init__(self, store: Store, config: MirrorConfig) -> None:
        self.config = config
        self.target = make_target(config)
        self.worker = MirrorWorker(store, self.target, config)
        # A GET waits for a heal only so long (see blobd.mirror.heal).
        self.healer = Healer(store, self.target, config, deadline=config.heal_timeout_seconds)
        self._store = store
        self._tasks: list[asyncio.Task[object]] = []

    async def start(self, background: bool = True) -> None:
        """After the store is open: start draining the queue and backing up
        (only in the process that runs the background work; the others of
        ``[server] workers = N`` only heal on GET)."""
        await self.target.open()
        if not background:
            return
        self._tasks = [
            # In the background: a mirror that hangs must not hold the start.
            asyncio.create_task(check_bucket(self.target), name="blobd-mirror-check"),
            asyncio.create_task(self.worker.run(), name="blobd-mirror-worker"),
            asyncio.create_task(backup.run_scheduled(self._store, self.target, self.config),
                                name="blobd-mirror-backup"),
            asyncio.create_task(abandoned.sweep_at_start(self.target, self.config),
                                name="blobd-mirror-abandoned"),
        ]
        for task in self._tasks:
            task.add_done_callback(_report_crash)
        log.info("mirroring to %s", self.target.url(self.config.prefix))

    async def stop(self) -> None:
        """Before the store closes; whatever is unfinished stays queued."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.healer.close()
        await self.target.close()


def _report_crash(task: asyncio.Task[object]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped", task.get_name(), exc_info=task.exception())

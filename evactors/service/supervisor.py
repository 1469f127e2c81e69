"""Supervision: every actor runs under ``Supervisor.supervise``. An exception restarts it
with exponential backoff; too many within a window stop the service (exit 1). The channel
ends an actor sends on are closed only when it is finished for good, so a restart keeps
its channels and a normal end cascades downstream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from evactors.core.config import Config
from evactors.ops import logs, metrics

log = logging.getLogger("evactors.supervisor")


class StartupError(Exception):
    """The service cannot start (data dir in use, a part will not come up)."""


class ActorFailed(Exception):
    """An actor crashed too often: the service stops (exit 1)."""


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.failures: dict[str, list[float]] = {}
        self.states: dict[str, str] = {}  # actor → running | restarting | finished | failed
        self.restarts: dict[str, int] = {}

    async def supervise(self, name: str, actor: Callable[..., Awaitable[None]], *args: Any,
                        closes: tuple[Any, ...] = ()) -> None:
        """Run ``actor(*args)`` until it returns; restart it when it raises."""
        sup = self.config.supervisor
        delay = sup.backoff_initial_seconds
        logs.actor.set(name)  # this task's context: everything the actor logs names it
        self.states[name] = "running"
        try:
            while True:
                started = time.monotonic()
                try:
                    await actor(*args)
                    self.states[name] = "finished"
                    return
                except Exception as e:
                    now = time.monotonic()
                    if now - started > sup.restart_window_seconds:
                        delay = sup.backoff_initial_seconds  # it ran well for a while
                    recent = [t for t in self.failures.get(name, []) if now - t < sup.restart_window_seconds]
                    recent.append(now)
                    self.failures[name] = recent
                    metrics.ACTOR_RESTARTS.labels(name).inc()
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    if len(recent) > sup.max_restarts:
                        self.states[name] = "failed"
                        log.critical("actor %s crashed %d times in %.0fs; stopping the service",
                                     name, len(recent), sup.restart_window_seconds, exc_info=e)
                        raise ActorFailed(name) from e
                    log.error("actor %s crashed (%s: %s); restarting in %.2fs", name,
                              type(e).__name__, e, delay, exc_info=e)
                    self.states[name] = "restarting"
                    await trio.sleep(delay)
                    self.states[name] = "running"
                    delay = min(delay * 2, sup.backoff_max_seconds)
        finally:
            for channel in closes:
                channel.close()

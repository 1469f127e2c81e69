"""The HTTP listener: hypercorn's trio worker serving the ASGI app until shutdown, its
graceful stop a fraction of the drain deadline."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from evactors.core.config import Config
from evactors.service.supervisor import StartupError


def hypercorn_config(config: Config) -> hypercorn.config.Config:
    hconfig = hypercorn.config.Config()
    hconfig.bind = [config.server.listen]
    hconfig.accesslog = None
    hconfig.errorlog = logging.getLogger("evactors.http")
    hconfig.graceful_timeout = max(1.0, config.supervisor.drain_seconds / 3)
    # One rule for slow and idle clients: nothing received for this long closes it.
    hconfig.keep_alive_timeout = config.server.read_timeout_seconds
    hconfig.read_timeout = config.server.read_timeout_seconds  # type: ignore[assignment]
    hconfig.h11_max_incomplete_size = 64 * 1024
    return hconfig


async def serve_http(app: Any, config: Config, shutdown: trio.Event,
                     task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` until ``shutdown``; started once it listens (the bound addresses).
    A bind that fails is a ``StartupError``."""
    listening = False

    def started(binds: list[str]) -> None:
        nonlocal listening
        listening = True
        task_status.started(binds)

    try:
        status: Any = SimpleNamespace(started=started)
        await hypercorn.trio.serve(app, hypercorn_config(config), shutdown_trigger=shutdown.wait,
                                   task_status=status)
    except* OSError as group:  # hypercorn reports a failed bind inside a group
        if listening:
            raise
        e = group.exceptions[0]
        reason = getattr(e, "strerror", None) or e
        raise StartupError(f"cannot listen on {config.server.listen}: {reason}") from None

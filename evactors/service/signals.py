"""Signals and the drain: SIGTERM/SIGINT start a graceful stop, a second one stops at
once, SIGHUP reloads what can change live (write keys, the GeoIP database); the drain
deadline bounds a graceful stop, as hypercorn bounds its own with a cancel scope."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from evactors.core.config import Config
from evactors.enrichment.geoip import GeoIP
from evactors.service.credentials import WriteKeys, load_or_create_write_key

log = logging.getLogger("evactors.supervisor")


async def watch_signals(shutdown: trio.Event, hard_stop: trio.CancelScope,
                        reload: Callable[[], Awaitable[None]]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await reload()
            elif not shutdown.is_set():
                log.info("%s: stopping; draining in-flight events", signal.Signals(signum).name)
                shutdown.set()
            else:
                log.warning("second signal: stopping at once (unflushed events stay in Redis)")
                hard_stop.cancel()
                return


async def drain_deadline(shutdown: trio.Event, seconds: float, cancel: trio.CancelScope) -> None:
    """Once a stop has begun, give the pipeline ``seconds`` to drain, then cancel it: what
    is left stays durable in Redis for the next start."""
    await shutdown.wait()
    await trio.sleep(seconds)
    log.warning("drain deadline (%.0fs) reached; what is left stays durable in Redis", seconds)
    cancel.cancel()


def reloader(write_keys: WriteKeys, geoip: GeoIP, reload_config: Callable[[], Config] | None,
             reconfigure: Callable[[Config], None] | None = None,
             data_dir: Path | None = None) -> Callable[[], Awaitable[None]]:
    """What SIGHUP does: new write keys from the configuration (and ``reconfigure``: the
    allowed origins, OpenPanel's clients), and a changed GeoIP file. No write keys at all:
    as at start, only the generated one (in ``data_dir``)."""

    async def reload() -> None:
        if reload_config is not None:
            try:
                fresh = reload_config()
            except Exception as e:  # a bad file (or unreadable, …): keep running as we are
                log.error("SIGHUP: configuration not reloaded, the running one stays: %s", e)
                return
            if fresh.write_keys:
                write_keys.replace(fresh.write_keys)
                log.info("SIGHUP: %d write keys loaded", len(fresh.write_keys))
            elif data_dir is not None:  # what a restart would do: configured keys go, the generated one serves
                key, project, _made = load_or_create_write_key(data_dir)
                write_keys.replace({key: project})
                log.warning("SIGHUP: no write keys configured: every configured key is revoked; "
                            "only the generated key in %s (project %r) is accepted, as at start",
                            data_dir / "write_key", project)
            if reconfigure is not None:
                reconfigure(fresh)
        reloaded = await geoip.reload_if_changed()
        log.info("SIGHUP: geoip database %s", "reloaded" if reloaded else "unchanged")

    return reload

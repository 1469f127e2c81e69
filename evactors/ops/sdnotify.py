"""systemd's notification protocol (``Type=notify``): one datagram per state change on the
socket named by ``$NOTIFY_SOCKET``. No-op when not started by systemd."""

from __future__ import annotations

import logging
import os
import socket

import trio

log = logging.getLogger("evactors.sdnotify")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 else 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *states: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(states).encode(), self.address)
        except OSError as e:  # systemd gone: nothing to tell
            log.debug("sd_notify failed: %s", e)

    async def watchdog(self) -> None:
        """Ping at half the interval systemd expects (``WatchdogSec=``) while the loop runs."""
        if not self.address or not self.watchdog_seconds:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_seconds / 2)

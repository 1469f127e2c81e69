"""The live keys and how they are read: who is live (a sorted set per project, profile →
last seen) and a profile's last screen view. The publisher writes them; the live hub, the
admin status and ``bin/evactors live`` read them through these functions, so the window
that makes a visitor "live" is decided in one place."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec

from evactors.store.keys import Keys

LIVE_WINDOW_MS = 5 * 60 * 1000  # a visitor seen within it is live
LAST_SCREEN_VIEW_TTL = 31 * 60  # seconds a profile's last screen view stays readable


def count_live(client: Any, keys: Keys, projects: Sequence[str]) -> list[int]:
    """Live visitors of each project, in one round trip (``client``: a sync redis-py
    client; call it from a worker thread under trio)."""
    since = int(time.time() * 1000) - LIVE_WINDOW_MS
    pipe = client.pipeline(transaction=False)
    for project in projects:
        pipe.zcount(keys.live(project), since, "+inf")
    return [int(count) for count in pipe.execute()]


def live_visitors(client: Any, keys: Keys, project: str) -> int:
    """Visitors of a project seen in the last 5 minutes."""
    return count_live(client, keys, [project])[0]


def last_screen_view(client: Any, keys: Keys, project: str, profile: str) -> dict[str, Any] | None:
    """The last screen view of a profile (31 minutes), as the ``events`` row."""
    raw = client.get(keys.last_screen_view(project, profile))
    return msgspec.json.decode(raw) if raw else None

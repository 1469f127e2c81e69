"""What is in flight: the ingest entries handed to the pipeline and not yet acknowledged
by every shard. Ingest and the replayer add entries, the acker removes them; the replayer
re-feeds only entries in flight for too long (an actor crashed while holding them), and a
re-map waits until what came before it has left.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("evactors.replay")


class InFlight:
    """Ingest entries handed to the pipeline and not yet acknowledged, with when they
    were handed over. Ingest and the replayer add, the acker removes."""

    def __init__(self) -> None:
        self.since: dict[str, float] = {}

    def add(self, entry_ids: list[str]) -> None:
        now = time.monotonic()
        for entry_id in entry_ids:
            self.since[entry_id] = now

    def done(self, entry_ids: list[str]) -> None:
        for entry_id in entry_ids:
            self.since.pop(entry_id, None)

    def lost(self, entry_id: str, older_than: float) -> bool:
        since = self.since.get(entry_id)
        return since is None or time.monotonic() - since > older_than

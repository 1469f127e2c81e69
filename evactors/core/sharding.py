"""Shard placement: the one rule that decides which session shard owns a (project,
device). It decides where state lives in Redis, so every place that routes or reads by
shard calls this function: a second copy that drifted would split a visitor's state."""

from __future__ import annotations

import zlib


def shard_of(project_id: str, device_id: str, shards: int) -> int:
    """Stable across processes, restarts and machines (unlike ``hash``)."""
    return zlib.crc32(f"{project_id}\x00{device_id}".encode()) % shards

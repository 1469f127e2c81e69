"""Replayer: feeds ingest entries that are still in Redis back into the pipeline.

At start-up that is everything a previous run accepted but did not finish (a crash, a
drain deadline). While running, an entry older than ``stale_after`` seconds was lost in
flight (an actor crashed with it) and is fed again. Re-feeding is always safe: the session
actors drop what was already committed, by messageId.
"""

from __future__ import annotations

import functools
import logging
import time

import msgspec
import trio

from . import metrics
from .messages import IngestBatch, Receipt
from .model import Incoming
from .redis_io import Keys, RedisIO, retrying

log = logging.getLogger("evactors.replay")

_decode = msgspec.msgpack.Decoder(list[Incoming]).decode
PAGE = 64


def entry_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


async def replay_older_than(redis: RedisIO, keys: Keys, cutoff_ms: int | None,
                            outbox: trio.MemorySendChannel[IngestBatch]) -> int:
    """Feed entries whose id time is before ``cutoff_ms`` (all when None); count them."""
    start = "-"
    fed = 0
    while True:
        entries = await retrying("replay read", redis.run, functools.partial(
            redis.client.xrange, keys.ingest, start, "+", count=PAGE))
        if not entries:
            return fed
        batch = IngestBatch([], [])
        for entry_id, fields in entries:
            if cutoff_ms is not None and entry_ms(entry_id) >= cutoff_ms:
                entries = []
                break
            events = _decode(fields[b"e"])
            batch.receipts.append(Receipt(entry_id.decode(), len(events)))
            batch.events.extend(events)
        if batch.receipts:
            await outbox.send(batch)
            fed += len(batch.receipts)
            metrics.REPLAYED.inc(len(batch.receipts))
        if len(entries) < PAGE:
            return fed
        start = "(" + entries[-1][0].decode()


async def replayer(redis: RedisIO, keys: Keys, outbox: trio.MemorySendChannel[IngestBatch],
                   shutdown: trio.Event, stale_after: float = 120.0) -> None:
    fed = await replay_older_than(redis, keys, None, outbox)
    if fed:
        log.info("replaying %d ingest entries left by an earlier run", fed)
    while not shutdown.is_set():
        with trio.move_on_after(stale_after / 2):
            await shutdown.wait()
        if shutdown.is_set():
            return
        cutoff = int((time.time() - stale_after) * 1000)
        fed = await replay_older_than(redis, keys, cutoff, outbox)
        if fed:
            log.warning("re-fed %d ingest entries older than %.0fs (lost in flight)", fed, stale_after)

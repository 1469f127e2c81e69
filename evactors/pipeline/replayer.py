"""Replayer: feeds ingest entries that are still in Redis back into the pipeline.

At start-up that is everything a previous run accepted but did not finish (a crash, a
drain deadline). While running, an entry that has been in flight for longer than
``stale_after`` seconds was lost (an actor crashed while holding it) and is fed again.
Re-feeding is always safe: the session actors drop what was already committed, by
messageId. An entry that cannot be decoded is moved to the dead-letter stream, with the
error, instead of failing the replayer again and again.
"""

from __future__ import annotations

import functools
import logging
import time

import msgspec
import trio

from evactors.core.messages import IngestBatch, Receipt
from evactors.core.model import Incoming
from evactors.ops import metrics
from evactors.pipeline.deadletters import DeadLetters
from evactors.pipeline.inflight import InFlight
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO, retrying

log = logging.getLogger("evactors.replay")


_decode = msgspec.msgpack.Decoder(list[Incoming]).decode


PAGE = 64


class Replayer:
    def __init__(self, redis: RedisIO, keys: Keys, in_flight: InFlight,
                 outbox: trio.MemorySendChannel[IngestBatch], stale_after: float,
                 dead_letters: DeadLetters) -> None:
        self.redis = redis
        self.keys = keys
        self.in_flight = in_flight
        self.outbox = outbox
        self.stale_after = stale_after
        self.dead_letters = dead_letters

    async def feed(self, last: str, shutdown: trio.Event, only_lost: bool) -> int:
        """Feed entries up to id ``last`` (all, or only those lost in flight)."""
        start, fed = "-", 0
        while not shutdown.is_set():
            entries = await retrying("replay read", self.redis.run, functools.partial(
                self.redis.client.xrange, self.keys.ingest, start, last, count=PAGE))
            batch = IngestBatch([], [])
            for raw_id, fields in entries:
                entry_id = raw_id.decode()
                if only_lost and not self.in_flight.lost(entry_id, self.stale_after):
                    continue
                try:
                    events = _decode(fields[b"e"])
                except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as e:
                    await self.dead_letters.bury_ingest_entry(entry_id, fields, e)
                    continue
                batch.receipts.append(Receipt(entry_id, len(events)))
                batch.events.extend(events)
            if batch.receipts:
                self.in_flight.add([r.entry_id for r in batch.receipts])
                await self.outbox.send(batch)
                fed += len(batch.receipts)
                metrics.REPLAYED.inc(len(batch.receipts))
            if len(entries) < PAGE:
                break
            start = "(" + entries[-1][0].decode()
        return fed

    async def last_id(self) -> str | None:
        newest = await retrying("replay read", self.redis.run, functools.partial(
            self.redis.client.xrevrange, self.keys.ingest, "+", "-", count=1))
        return newest[0][0].decode() if newest else None


async def replayer(replay: Replayer, shutdown: trio.Event, started: trio.Event) -> None:
    """At start, feed what an earlier run left; then, now and then, what got lost."""
    if not started.is_set():
        last = await replay.last_id()  # new entries after this one belong to this run
        if last is not None:
            fed = await replay.feed(last, shutdown, only_lost=False)
            log.info("replayed %d ingest entries left by an earlier run", fed)
        started.set()
    while not shutdown.is_set():
        with trio.move_on_after(replay.stale_after / 2):
            await shutdown.wait()
        if shutdown.is_set():
            return
        cutoff = f"{int((time.time() - replay.stale_after) * 1000)}-0"
        fed = await replay.feed(cutoff, shutdown, only_lost=True)
        if fed:
            log.warning("re-fed %d ingest entries lost in flight for over %.0fs", fed,
                        replay.stale_after)

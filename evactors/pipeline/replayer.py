"""Replayer: feeds ingest entries that are still in Redis back into the pipeline.

At start-up that is everything a previous run accepted but did not finish (a crash, a
drain deadline). While running, an entry that has been in flight for longer than
``stale_after`` seconds was lost (an actor crashed while holding it) and is fed again.
Re-feeding is always safe: the session actors drop what was already committed, by
messageId. An entry that cannot be decoded is moved to the dead-letter stream, with the
error, instead of failing the replayer again and again.
"""

from __future__ import annotations

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
from evactors.store.redis_io import RedisIO, retrying, stream_entries

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

    async def feed(self, last: dict[int, str], shutdown: trio.Event, only_lost: bool) -> int:
        """Feed each lane's entries up to its id in ``last`` (all, or only those lost in
        flight)."""
        fed = 0
        for lane, until in last.items():
            fed += await self._feed_lane(lane, until, shutdown, only_lost)
        return fed

    async def _feed_lane(self, lane: int, last: str, shutdown: trio.Event, only_lost: bool) -> int:
        start, fed = "-", 0
        stream = self.keys.lanes[lane].stream
        while not shutdown.is_set():
            (entries,) = await retrying("replay read", self.redis.execute,
                                        [["XRANGE", stream, start, last, "COUNT", PAGE]], True)
            batch = IngestBatch([], [])
            for entry_id, fields in stream_entries(entries):
                receipt = Receipt(entry_id.decode(), int(fields.get(b"n", b"0")), lane=lane)
                if only_lost and not self.in_flight.lost(receipt.key, self.stale_after):
                    continue
                try:
                    events = _decode(fields[b"e"])
                except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as e:
                    await self.dead_letters.bury_ingest_entry(self.keys.lanes[lane], receipt.entry_id, fields, e)
                    continue
                receipt.events = len(events)
                batch.receipts.append(receipt)
                batch.events.extend(events)
            if batch.receipts:
                self.in_flight.add([r.key for r in batch.receipts])
                await self.outbox.send(batch)
                fed += len(batch.receipts)
                metrics.REPLAYED.inc(len(batch.receipts))
            if len(entries) < PAGE:
                break
            start = "(" + entries[-1][0].decode()
        return fed

    async def last_ids(self) -> dict[int, str]:
        """Each lane's newest entry (lanes with none are left out)."""
        newest = await retrying("replay read", self.redis.execute,
                                [["XREVRANGE", lane.stream, "+", "-", "COUNT", 1] for lane in self.keys.lanes], True)
        return {lane: entries[0][0].decode() for lane, entries in enumerate(newest) if entries}


async def replayer(replay: Replayer, shutdown: trio.Event, started: trio.Event) -> None:
    """At start, feed what an earlier run left; then, now and then, what got lost."""
    if not started.is_set():
        last = await replay.last_ids()  # new entries after these belong to this run
        if last:
            fed = await replay.feed(last, shutdown, only_lost=False)
            log.info("replayed %d ingest entries left by an earlier run", fed)
        started.set()
    while not shutdown.is_set():
        with trio.move_on_after(replay.stale_after / 2):
            await shutdown.wait()
        if shutdown.is_set():
            return
        cutoff = f"{int((time.time() - replay.stale_after) * 1000)}-0"
        fed = await replay.feed(dict.fromkeys(range(len(replay.keys.lanes)), cutoff), shutdown, only_lost=True)
        if fed:
            log.warning("re-fed %d ingest entries lost in flight for over %.0fs", fed,
                        replay.stale_after)

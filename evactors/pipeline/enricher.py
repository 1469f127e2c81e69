"""The enricher actor (a pool of them): gathers the requests waiting (and those arriving
within a few milliseconds) into one unit, enriches it (``enrichment.enrich``), cuts it by
shard and sends each part to its session shard; events whose enrichment raises go to the
dead letters, and receipts with no part left go straight to the acker.

The unit is where per-request costs end: everything after it (the frame to the session
worker, the shard's commit, the acker's call) is paid once per unit, so a stream of
one-event requests costs about what one request of hundreds of events does.
"""

from __future__ import annotations

import logging
import time

import trio

from evactors.core.channels import gather
from evactors.core.messages import IngestBatch, Receipt, ShardBatch, settle
from evactors.enrichment.enrich import Enricher
from evactors.pipeline.deadletters import DeadLetters

log = logging.getLogger("evactors.enrich")

# A batch of costly events (long user agents, none cached) is enriched in slices: after
# this long on the event loop, /health/live, the acks and other requests get a turn.
BUDGET_SECONDS = 0.005


async def enricher(work: Enricher, shards: int,
                   to_enrich: trio.MemoryReceiveChannel[IngestBatch],
                   to_shard: list[trio.MemorySendChannel[ShardBatch]],
                   receipts: trio.MemorySendChannel[list[Receipt]],
                   dead_letters: DeadLetters, unit_events: int = 2000, linger: float = 0.0) -> None:
    """One task of the pool. Poison events are dead-lettered before their receipts can
    complete; receipts with no part left go straight to the acker."""
    async for first in to_enrich:
        taken = await gather(to_enrich, first, unit_events, linger, size=lambda b: len(b.events))
        batch = taken[0] if len(taken) == 1 else IngestBatch(
            [r for b in taken for r in b.receipts], [e for b in taken for e in b.events])
        steps = work.split_steps(batch, shards)
        slice_end = time.perf_counter() + BUDGET_SECONDS
        while True:
            try:
                next(steps)
            except StopIteration as result:
                parts, poison = result.value
                break
            if time.perf_counter() > slice_end:  # a long batch: others get the loop between slices
                await trio.sleep(0)
                slice_end = time.perf_counter() + BUDGET_SECONDS
        if poison:
            await dead_letters.bury_events(poison)
        finished = settle([r for r in batch.receipts if r.remaining == 0])
        for shard, part in parts.items():
            await to_shard[shard].send(part)
        if finished:
            await receipts.send(finished)

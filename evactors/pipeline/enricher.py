"""The enricher actor (a pool of them): enriches whole batches (``enrichment.enrich``),
cuts them by shard and sends each part to its session shard; events whose enrichment
raises go to the dead letters, and receipts with no part left go straight to the acker.
"""

from __future__ import annotations

import logging
import time

import trio

from evactors.core.messages import IngestBatch, Receipt, ShardBatch
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
                   dead_letters: DeadLetters) -> None:
    """One task of the pool. Poison events are dead-lettered before their receipts can
    complete; receipts with no part left go straight to the acker."""
    async for batch in to_enrich:
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
        finished = [r for r in batch.receipts if r.remaining == 0]
        for shard, part in parts.items():
            await to_shard[shard].send(part)
        if finished:
            await receipts.send(finished)

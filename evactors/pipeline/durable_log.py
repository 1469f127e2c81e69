"""The durable ingest log: a request's events are in the ingest stream (with the backlog
counter, atomically) before the request is answered ``200``, and then handed to the
pipeline.

Group commit: requests that arrive while a write is in flight are written together by the
next write, as **one** stream entry (one command, one round trip, ``WAITAOF`` once in
``strict`` durability) and handed on as one batch with one receipt. What a stream entry,
its acknowledgement and its bookkeeping cost is then paid per group, not per request:
under a stream of one-event requests, per dozens of them. A write that fails fails the
whole group: none of its requests is answered ``200``.

With other instances live (``pipeline.answer``), an answer also waits until the group's
receipt is settled: every shard committed its part, or left it in the inbox of the instance
that owns it. A visitor's next request, sent after that answer, then reaches its shard after this
one, whichever instance takes it: that is what keeps sessions exact without affinity. A
commit later than ``pipeline.answer_wait_seconds`` is answered 503 (``CommitLate``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from evactors.core.messages import IngestBatch, Receipt
from evactors.core.model import Incoming
from evactors.core.segment import RequestError
from evactors.ops import metrics
from evactors.pipeline.inflight import InFlight
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO
from evactors.store.scripts import APPEND

log = logging.getLogger("evactors.ingest")


def msgpack_array(items: list[bytes], count: int) -> bytes:
    """A msgpack array of ``count`` items already encoded (joined, no second pass)."""
    header = (bytes([0x90 | count]) if count < 16 else b"\xdc" + count.to_bytes(2, "big") if count < 65536
              else b"\xdd" + count.to_bytes(4, "big"))
    return header + b"".join(items)


class CommitLate(RequestError):
    """The events are durable but their shards did not commit them in time: answered 503, not
    200, so that a 200 still means "in order" (the client's retry is deduplicated)."""

    def __init__(self, waited: float) -> None:
        super().__init__(503, "commit_late", f"the events are stored durably but were not committed within "
                         f"{waited:g}s (pipeline.answer_wait_seconds); retry: a retry is deduplicated")


class _Append:
    """One request waiting in a group commit: its outcome, and its turn."""

    __slots__ = ("done", "encoded", "error", "events", "receipt", "size", "turn")

    def __init__(self, events: list[Incoming], encoded: list[bytes]) -> None:
        self.events, self.encoded = events, encoded
        self.size = sum(map(len, encoded))
        self.turn = trio.Event()  # set when this request's outcome is known, or it is to lead
        self.done = False
        self.error: BaseException | None = None
        self.receipt: Receipt | None = None


class DurableLog:
    """Appends accepted events to the ingest stream, returns once Redis has them, and hands
    them to the pipeline (``outbox``).

    No background task: the first waiting request leads the next group, so a group is never
    left without a writer. The write is shielded like the thread call it replaces (which
    could not be interrupted either): a leader is never lost to a cancelled request. The
    leader then hands the group's batch on, outside the shield: a full pipeline slows the
    answers of the requests that lead, and through them the rest. A batch that never makes
    it (its leader cancelled) is durable and in flight: the replayer feeds it again."""

    MAX_GROUP = 256  # requests in one entry
    MAX_GROUP_BYTES = 1 << 20  # encoded events in one entry (a request alone may exceed it)

    def __init__(self, redis: RedisIO, keys: Keys, wait_aof: bool,
                 outbox: trio.MemorySendChannel[IngestBatch], in_flight: InFlight,
                 answer_wait: float = 5.0, answers_committed: Callable[[], bool] = lambda: False) -> None:
        self.redis = redis
        self.keys = keys
        self.wait_aof = wait_aof
        self.outbox = outbox
        self.in_flight = in_flight
        self.script = APPEND
        self._queue: list[_Append] = []
        self._busy = False
        self._writes = 0  # groups written: each takes the next lane
        # Answer only once the events are committed by their shards (or in their owners'
        # inboxes), not merely durable: while other instances are live (pipeline.answer)
        self.answers_committed = answers_committed
        self.answer_wait = answer_wait

    async def append(self, events: list[Incoming], encoded: list[bytes]) -> None:
        """Store ``events`` (``encoded``: each one's msgpack) durably, then hand them on.
        Raises (and hands nothing on) when Redis did not take them. In strict mode WAITAOF
        follows the write on the same connection, so it waits for *this* write."""
        item = _Append(events, encoded)
        self._queue.append(item)
        batch: IngestBatch | None = None
        with trio.CancelScope(shield=True):
            if self._busy:
                await item.turn.wait()  # a result, or the lead of the next group
            if not item.done:
                self._busy = True
                group = self._take_group()
                try:
                    batch = await self._write(group)
                finally:
                    for waiting in group:
                        if batch is None and waiting.error is None:  # never a 200 unwritten
                            waiting.error = TimeoutError("the group commit was interrupted")
                        waiting.done = True
                        waiting.turn.set()
                    if self._queue:
                        self._queue[0].turn.set()  # not done: it leads the next group
                    else:
                        self._busy = False
        if item.error is not None:
            raise item.error
        if batch is not None:
            await self.outbox.send(batch)
        settled = item.receipt.settled if item.receipt is not None else None
        if settled is not None:
            with trio.move_on_after(self.answer_wait) as waited:
                await settled.wait()
            if waited.cancelled_caught:
                metrics.COMMITS_LATE.inc()
                log.warning("events durable but not committed in time, answering 503")
                raise CommitLate(self.answer_wait)

    def _take_group(self) -> list[_Append]:
        size, n = 0, 0
        for n, waiting in enumerate(self._queue[:self.MAX_GROUP], 1):
            size += waiting.size
            if size > self.MAX_GROUP_BYTES and n > 1:
                n -= 1
                break
        group, self._queue = self._queue[:n], self._queue[n:]
        return group

    async def _write(self, group: list[_Append]) -> IngestBatch | None:
        """One entry for the group; the batch to hand on, or None (each item has the error).
        An EVALSHA refused with NOSCRIPT (a restarted Redis) ran nothing: written again."""
        events = [e for item in group for e in item.events]
        blob = msgpack_array([b for item in group for b in item.encoded], len(events))
        extra = [["WAITAOF", 1, 0, 5000]] if self.wait_aof else []
        lane = self._writes % len(self.keys.lanes)
        self._writes += 1
        stream, counter, _dead = self.keys.lanes[lane]
        try:
            replies: list[Any] = await self.redis.scripts(
                self.script, [([stream, counter], [len(events), blob])], extra, wait=True)
            if self.wait_aof:
                fsynced = replies.pop()
                if isinstance(fsynced, Exception):
                    raise fsynced
                if int(fsynced[0]) < 1:
                    raise TimeoutError("redis did not fsync the events in time (WAITAOF)")
            if isinstance(replies[0], Exception):
                raise replies[0]
        except Exception as e:  # the connection, a refusal, no fsync: none of the group is answered 200
            for item in group:
                item.error = e
            return None
        receipt = Receipt(replies[0].decode(), len(events), lane=lane,
                          settled=trio.Event() if self.answers_committed() else None)
        for item in group:
            item.receipt = receipt
        self.in_flight.add([receipt.key])
        return IngestBatch([receipt], events)

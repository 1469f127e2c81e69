"""The durable ingest log: a request's events become one entry of the ingest stream (with
the backlog counter, atomically) before the request is answered ``200``.

Requests that arrive while a write is in flight are written together (group commit: one
pipeline, one round trip, ``WAITAOF`` once at its end in ``strict`` durability), each still
as its own entry and answered from its own command's reply.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from evactors.core.messages import Receipt
from evactors.core.model import Incoming
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO
from evactors.store.scripts import APPEND

log = logging.getLogger("evactors.ingest")


class _Append:
    """One request's entry waiting in a group commit: its outcome, and its turn."""

    __slots__ = ("blob", "done", "entry_id", "error", "events", "turn")

    def __init__(self, events: list[Incoming], blob: bytes) -> None:
        self.events, self.blob = events, blob
        self.turn = trio.Event()  # set when this entry's outcome is known, or it is to lead
        self.done = False
        self.entry_id = ""
        self.error: BaseException | None = None


class DurableLog:
    """Appends accepted events to the ingest stream; returns once Redis has them.

    Group commit: requests that arrive while a write is in flight are written together
    by the next one, in one pipeline (one thread hop, one round trip), each still as its
    own stream entry, and each request is answered from its own command's reply. No
    background task: the first waiting request leads the next group, so a group is never
    left without a writer. Waiting is shielded like the thread call it replaces (which
    could not be interrupted either): a leader is never lost to a cancelled request."""

    MAX_GROUP = 64  # requests (≤ 500 KB each) in one pipeline: bounded work per round trip

    def __init__(self, redis: RedisIO, keys: Keys, wait_aof: bool) -> None:
        self.redis = redis
        self.keys = keys
        self.wait_aof = wait_aof
        self.script = APPEND
        self._queue: list[_Append] = []
        self._busy = False

    async def append(self, events: list[Incoming], blob: bytes) -> Receipt:
        """Store ``events`` (``blob``: their msgpack array) as one stream entry. In strict
        mode WAITAOF ends the group's pipeline: on the same connection, so it waits for
        *these* writes (WAITAOF waits for the writes of its own connection)."""
        item = _Append(events, blob)
        self._queue.append(item)
        with trio.CancelScope(shield=True):
            if self._busy:
                await item.turn.wait()  # a result, or the lead of the next group
            if not item.done:
                self._busy = True
                group, self._queue = self._queue[:self.MAX_GROUP], self._queue[self.MAX_GROUP:]
                try:
                    await self._write(group)
                finally:
                    for waiting in group:
                        if not waiting.entry_id and waiting.error is None:  # never a 200 unwritten
                            waiting.error = TimeoutError("the group commit was interrupted")
                        waiting.done = True
                        waiting.turn.set()
                    if self._queue:
                        self._queue[0].turn.set()  # not done: it leads the next group
                    else:
                        self._busy = False
        if item.error is not None:
            raise item.error
        return Receipt(item.entry_id, len(events))

    async def _write(self, group: list[_Append]) -> None:
        """One pipeline for the group; every entry gets its own id or error. An EVALSHA
        refused with NOSCRIPT (a restarted Redis) ran nothing: those are written again."""
        keys = [self.keys.ingest, self.keys.ingest_count]
        calls = [(keys, [len(item.events), item.blob]) for item in group]
        extra = [["WAITAOF", 1, 0, 5000]] if self.wait_aof else []

        async def go() -> list[Any]:
            replies = await self.redis.scripts(self.script, calls, extra, wait=True)
            if self.wait_aof:
                fsynced = replies.pop()
                if isinstance(fsynced, Exception):
                    raise fsynced
                if int(fsynced[0]) < 1:
                    raise TimeoutError("redis did not fsync the events in time (WAITAOF)")
            return replies

        try:
            replies = await go()
        except Exception as e:  # the connection, or no fsync: none of the group is answered 200
            for item in group:
                item.error = e
            return
        for item, reply in zip(group, replies, strict=True):
            if isinstance(reply, Exception):
                item.error = reply
            else:
                item.entry_id = reply.decode()

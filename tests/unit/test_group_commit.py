"""Ingest's group commit against a real Valkey: requests written together still get one
stream entry each, answered from their own reply; a restarted server's empty script cache
(NOSCRIPT) and a refused write are handled per request, never as a 200 for nothing."""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from evactors.core.model import Context, Incoming
from evactors.pipeline.durable_log import DurableLog
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO


def _events(tag: str, n: int) -> list[Incoming]:
    return [Incoming("p", "track", f"{tag}-{i}", "a", "", "E", {}, {}, Context(), 1, 1, "", "", "", "")
            for i in range(n)]


async def test_concurrent_appends_are_grouped_but_each_is_its_own_entry(valkey: Any) -> None:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("gc")
    log = DurableLog(redis, keys, wait_aof=False)
    hops = 0
    run = redis.run

    async def counting_run(fn: Any, *args: Any) -> Any:
        nonlocal hops
        hops += 1
        return await run(fn, *args)

    redis.run = counting_run  # type: ignore[method-assign]
    receipts: dict[str, Any] = {}

    async def send(i: int) -> None:
        events = _events(f"r{i}", i % 5 + 1)
        receipts[f"r{i}"] = (await log.append(events, msgspec.msgpack.encode(events)), events)

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(send, i)
    assert hops < 100  # written in groups, not one round trip per request
    ids = {r.entry_id for r, _ in receipts.values()}
    assert len(ids) == 100
    client: Any = redis.client  # redis-py's reply types are unions of every protocol
    stored = {entry_id.decode(): fields for entry_id, fields in client.xrange(keys.ingest)}
    assert set(stored) == ids
    for receipt, events in receipts.values():  # each request's reply names its own entry
        fields = stored[receipt.entry_id]
        assert msgspec.msgpack.decode(fields[b"e"], type=list[Incoming]) == events
        assert int(fields[b"n"]) == receipt.events == len(events)
    assert int(client.get(keys.ingest_count)) == sum(len(e) for _, e in receipts.values())
    redis.close()


async def test_noscript_is_written_again_and_a_refusal_is_that_requests_alone(valkey: Any) -> None:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("gc2")
    log = DurableLog(redis, keys, wait_aof=False)
    events = _events("x", 3)
    redis.client.script_flush()  # as after a restart of Redis
    receipt = await log.append(events, msgspec.msgpack.encode(events))
    assert redis.client.xlen(keys.ingest) == 1 and receipt.events == 3
    # a write Redis refuses (here: the counter is not a number) fails that request only
    redis.client.set(keys.ingest_count, "not-a-number")
    errors: list[BaseException] = []

    async def send() -> None:
        try:
            await log.append(events, msgspec.msgpack.encode(events))
        except Exception as e:
            errors.append(e)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(send)
    assert len(errors) == 5  # each refused request gets its own error, none a 200
    redis.close()

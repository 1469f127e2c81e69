"""Ingest's group commit against a real Valkey: requests that arrive together are written
as one stream entry and handed on as one batch; a restarted server's empty script cache
(NOSCRIPT) is written again, and a refused write is never a 200 nor handed on."""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from evactors.core.messages import IngestBatch
from evactors.core.model import Context, Incoming
from evactors.pipeline.durable_log import DurableLog, msgpack_array
from evactors.pipeline.inflight import InFlight
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO

_encode = msgspec.msgpack.Encoder().encode


def _events(tag: str, n: int) -> list[Incoming]:
    return [Incoming("p", "track", f"{tag}-{i}", "a", "", "E", {}, {}, Context(), 1, 1, "", "", "", "")
            for i in range(n)]


def _log(redis: RedisIO, keys: Keys, capacity: int = 1000) -> tuple[
        DurableLog, trio.MemoryReceiveChannel[IngestBatch], InFlight]:
    tx, rx = trio.open_memory_channel[IngestBatch](capacity)
    in_flight = InFlight()
    return DurableLog(redis, keys, False, tx, in_flight), rx, in_flight


def test_msgpack_array_header_for_every_size() -> None:
    for n in (0, 1, 15, 16, 65535, 65536):
        items = [_encode(i % 7) for i in range(n)]
        assert msgspec.msgpack.decode(msgpack_array(items, n)) == [i % 7 for i in range(n)]


async def test_concurrent_requests_become_one_entry_per_group_and_one_batch_each(valkey: Any) -> None:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("gc")
    log, batches, in_flight = _log(redis, keys)
    sent: dict[str, list[Incoming]] = {}

    async def send(i: int) -> None:
        events = _events(f"r{i}", i % 5 + 1)
        await log.append(events, [_encode(e) for e in events])
        sent[f"r{i}"] = events  # answered: durable and handed on

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(send, i)
    assert len(sent) == 100
    client: Any = redis.client  # redis-py's reply types are unions of every protocol
    stored = {entry_id.decode(): fields for entry_id, fields in client.xrange(keys.ingest)}
    assert 1 < len(stored) < 100  # written in groups: the first alone, then what waited
    handed = []
    while True:
        try:
            handed.append(batches.receive_nowait())
        except trio.WouldBlock:
            break
    assert len(handed) == len(stored)
    seen: list[str] = []
    for batch in handed:  # one receipt per entry, naming it, with the entry's events
        (receipt,) = batch.receipts
        fields = stored[receipt.entry_id]
        assert msgspec.msgpack.decode(fields[b"e"], type=list[Incoming]) == batch.events
        assert int(fields[b"n"]) == receipt.events == len(batch.events)
        assert receipt.key in in_flight.since
        seen += [e.message_id for e in batch.events]
    every = [e.message_id for events in sent.values() for e in events]
    assert sorted(seen) == sorted(every)  # each request's events once, none lost or doubled
    for events in sent.values():  # a request's events stay together and in order
        ids = [e.message_id for e in events]
        at = seen.index(ids[0])
        assert seen[at:at + len(ids)] == ids
    assert int(client.get(keys.ingest_count)) == len(every)
    redis.close()


async def test_a_group_never_exceeds_its_byte_bound(valkey: Any) -> None:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("gcb")
    log, _batches, _ = _log(redis, keys)
    log.MAX_GROUP_BYTES = 2000
    big = [Incoming("p", "track", f"b-{i}", "a", "", "E", {"x": "y" * 900}, {}, Context(), 1, 1, "", "", "", "")
           for i in range(20)]

    async def send(i: int) -> None:
        await log.append([big[i]], [_encode(big[i])])

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(send, i)
    client: Any = redis.client
    sizes = [len(fields[b"e"]) for _, fields in client.xrange(keys.ingest)]
    assert sum(int(f[b"n"]) for _, f in client.xrange(keys.ingest)) == 20
    assert max(sizes) <= 2000 + 8 and len(sizes) > 2
    redis.close()


async def test_noscript_is_written_again_and_a_refused_group_is_not_answered_nor_handed_on(
        valkey: Any) -> None:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("gc2")
    log, batches, in_flight = _log(redis, keys)
    events = _events("x", 3)
    redis.client.script_flush()  # as after a restart of Redis
    await log.append(events, [_encode(e) for e in events])
    assert redis.client.xlen(keys.ingest) == 1 and len(batches.receive_nowait().events) == 3
    # a write Redis refuses (here: the counter is not a number) fails every request of it
    redis.client.set(keys.ingest_count, "not-a-number")
    errors: list[BaseException] = []

    async def send() -> None:
        try:
            await log.append(events, [_encode(e) for e in events])
        except Exception as e:
            errors.append(e)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(send)
    assert len(errors) == 5  # each refused request gets an error, none a 200
    try:
        batches.receive_nowait()
        raise AssertionError("a refused write must not reach the pipeline")
    except trio.WouldBlock:
        pass
    assert len(in_flight.since) == 1  # only the first, written entry
    redis.close()


async def test_a_full_pipeline_slows_the_answer_of_the_leader(valkey: Any) -> None:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    log, batches, _ = _log(redis, Keys("gc3"), capacity=0)
    events = _events("s", 1)
    answered = trio.Event()

    async def send() -> None:
        await log.append(events, [_encode(e) for e in events])
        answered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.sleep(0.2)
        assert not answered.is_set()  # durable, but waiting for the pipeline to take it
        assert len((await batches.receive()).events) == 1
        with trio.fail_after(2):
            await answered.wait()
    redis.close()

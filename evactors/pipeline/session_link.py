"""The session worker link: the session shards run in child processes
(``service.session_worker``), so the pipeline uses more than one core; this module is the
frame protocol between them and the link actor, the service's side of one worker.

One Python process runs one event loop on one core at a time. The main process parses,
makes events durable, enriches and cuts batches by shard, as before; a worker process owns
some of the shards (``i``, ``i + W``, …) and runs their session actors and a publisher for
what they commit. Each shard still has exactly one writer, so the commit stays atomic and
exactly once.

The pipe between them carries frames (a 4-byte length, a kind byte, msgpack):

* main → worker: ``U`` a shard's batch (tagged with a sequence number), ``R`` the start-up
  replay is done (sweeps may run), ``E`` end of input (a graceful stop: close and exit).
* worker → main: ``D`` the sequence numbers committed, or (every half second, apart) the
  worker's counter increments since it last sent them (its metrics show on the service's
  ``/metrics``), and ``X`` the error a worker dies of.

The main side (``worker_link``) runs under the supervisor like any actor: a worker that
dies is an actor crash, restarted with backoff, and the batches it held are fed again by
the replayer (their ingest entries were never deleted). A worker whose parent goes away
(its stdin closes without ``E``, or its parent pid changes) exits at once, writing
nothing more: the next service owns the shards.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import trio

from evactors.core.channels import take_queued
from evactors.core.messages import Receipt, ShardBatch, count_down
from evactors.core.units import encode_unit
from evactors.ops import metrics

log = logging.getLogger("evactors.session_worker")


_LENGTH = struct.Struct(">I")


PARAMS_ENV = "EVX_SESSION_WORKER_PARAMS"


UNIT, REPLAYED, END, DONE, CRASHED = b"U", b"R", b"E", b"D", b"X"


class Done(msgspec.Struct, array_like=True):
    seqs: list[int]
    counters: list[tuple[str, list[str], float]]  # metric, label values, increment


_encode = msgspec.msgpack.Encoder().encode
_decode_done = msgspec.msgpack.Decoder(Done).decode


def encode_done(done: Done) -> bytes:
    return _encode(done)




def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _LENGTH.pack(len(payload) + 1) + kind + payload


class FrameReader:
    """Frames from a byte stream; ``None`` at its end."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _fill(self, size: int) -> bool:
        while len(self.buffer) < size:
            chunk = await self.stream.receive_some(1 << 20)
            if not chunk:
                return False
            self.buffer += chunk
        return True

    async def read(self) -> tuple[bytes, bytes] | None:
        if not await self._fill(4):
            return None
        (size,) = _LENGTH.unpack_from(self.buffer)
        if not await self._fill(4 + size):
            if self.buffer:
                raise EOFError("the stream ended inside a frame")
            return None
        data = bytes(self.buffer[4:4 + size])
        del self.buffer[:4 + size]
        return data[:1], data[1:]


class CounterDeltas:
    """What the worker's counters gained since the last look."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, tuple[str, ...]], float] = {}
        self.counters = {c._name: c for c in _counters()}

    def take(self) -> list[tuple[str, list[str], float]]:
        out = []
        for name, counter in self.counters.items():
            for sample in counter.collect()[0].samples:
                if not sample.name.endswith("_total"):
                    continue
                labels = tuple(sample.labels[n] for n in counter._labelnames)
                key = (name, labels)
                delta = sample.value - self.seen.get(key, 0.0)
                if delta:
                    self.seen[key] = sample.value
                    out.append((name, list(labels), delta))
        return out


def _counters() -> list[Any]:
    return [m for m in vars(metrics).values() if type(m).__name__ == "Counter"]


def apply_counters(deltas: list[tuple[str, list[str], float]]) -> None:
    by_name = {c._name: c for c in _counters()}
    for name, labels, delta in deltas:
        counter = by_name.get(name)
        if counter is not None:
            (counter.labels(*labels) if labels else counter).inc(delta)


@dataclass
class WorkerParams:
    """What a worker needs of the configuration (JSON, in its environment)."""

    redis_url: str
    redis_timeout: float
    key_prefix: str
    wait_replicas: int  # on a cluster: replicas each write waits for (redis.wait_replicas)
    ingest_lanes: int  # on a cluster: redis.ingest_lanes (0: one server), so its keys are the service's
    shards: list[int]  # the worker's own; pipeline.session_shards is the count of all
    log_level: str
    log_format: str
    parent: int
    instance: str  # the service's instance name: the worker's leases carry it
    pipeline: dict[str, Any]  # the service's [pipeline] section
    supervisor: dict[str, float]  # restarts and backoff, as the service's own actors have


class WorkerCrashed(Exception):
    """A session worker died: its error as it reported it, or its exit status."""


async def worker_link(params: WorkerParams, inboxes: dict[int, trio.MemoryReceiveChannel[ShardBatch]],
                      receipts: trio.MemorySendChannel[list[Receipt]], replayed: trio.Event) -> None:
    """The actor that owns one worker process: feeds it its shards' batches, and sends the
    receipts of what it committed to the acker."""
    command = [sys.executable, "-m", "evactors.service.session_worker"]
    env = {**os.environ, PARAMS_ENV: json.dumps(asdict(params))}
    process = await trio.lowlevel.open_process(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               env=env)
    assert process.stdin is not None and process.stdout is not None
    to_worker, from_worker = process.stdin, process.stdout
    pending: dict[int, list[Receipt]] = {}
    seq = 0
    write = trio.Lock()
    crashed: str | None = None
    unit_events = int(params.pipeline.get("unit_events", 2000))

    async def send(data: bytes) -> None:
        async with write:
            await to_worker.send_all(data)

    async def feed(shard: int, inbox: trio.MemoryReceiveChannel[ShardBatch]) -> None:
        nonlocal seq
        async for first in inbox:
            # what queued meanwhile goes in the same frame: one encode, one decode, one unit
            taken = take_queued(inbox, first, limit=unit_events, size=lambda b: len(b.events))
            batch = first if len(taken) == 1 else ShardBatch([e for b in taken for e in b.events],
                                                              [r for b in taken for r in b.receipts])
            seq += 1
            pending[seq] = batch.receipts
            try:
                await send(frame(UNIT, encode_unit(seq, shard, batch)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the worker died: collect() reports why

    async def replay_done() -> None:
        await replayed.wait()
        try:
            await send(frame(REPLAYED))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the worker died: collect() reports why

    async def feed_all() -> None:
        async with trio.open_nursery() as signals:
            signals.start_soon(replay_done)
            async with trio.open_nursery() as feeders:
                for shard, inbox in inboxes.items():
                    feeders.start_soon(feed, shard, inbox)
            signals.cancel_scope.cancel()  # the inboxes ended: that is the end of input
        try:
            await send(frame(END))
            await to_worker.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the worker died first: collect() reports why

    async def collect() -> None:
        nonlocal crashed
        reader = FrameReader(from_worker)
        while (got := await reader.read()) is not None:
            kind, payload = got
            if kind == DONE:
                committed = _decode_done(payload)
                apply_counters(committed.counters)
                finished = count_down([r for n in committed.seqs for r in pending.pop(n, [])])
                if finished:
                    await receipts.send(finished)
            elif kind == CRASHED:
                crashed = payload.decode(errors="replace")

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed_all)
            await collect()  # until the worker closes its stdout: it is done, or dead
            nursery.cancel_scope.cancel()
        code = await process.wait()
        if crashed is not None or code != 0:
            raise WorkerCrashed(crashed or f"session worker exited with status {code}")
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()

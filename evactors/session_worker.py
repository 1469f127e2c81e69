"""Session workers: the session shards run in child processes, so the pipeline uses more
than one core.

One Python process runs one event loop on one core at a time. The main process parses,
makes events durable, enriches and cuts batches by shard, as before; a worker process owns
some of the shards (``i``, ``i + W``, …) and runs their session actors and a publisher for
what they commit. Each shard still has exactly one writer, so the commit stays atomic and
exactly once.

The pipe between them carries frames (a 4-byte length, a kind byte, msgpack):

* main → worker: ``U`` a shard's batch (tagged with a sequence number), ``R`` the start-up
  replay is done (sweeps may run), ``E`` end of input (a graceful stop: close and exit).
* worker → main: ``D`` the sequence numbers committed, with the worker's counter
  increments since the last ``D`` (its metrics show on the service's ``/metrics``), and
  ``X`` the error a worker dies of.

The main side (``worker_link``) runs under the supervisor like any actor: a worker that
dies is an actor crash, restarted with backoff, and the batches it held are fed again by
the replayer (their ingest entries were never deleted). A worker whose parent goes away
(its stdin closes without ``E``, or its parent pid changes) exits at once, writing
nothing more: the next service owns the shards.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import trio

from . import logs, metrics
from .config import Config, PipelineConfig, SupervisorConfig
from .messages import Enriched, Notice, Receipt, ShardBatch
from .model import BotRow, Context, EventRow, Incoming
from .publisher import Publisher, publisher
from .redis_io import Keys, RedisIO
from .sessions import start_shard_actors

log = logging.getLogger("evactors.session_worker")

_LENGTH = struct.Struct(">I")
PARAMS_ENV = "EVX_SESSION_WORKER_PARAMS"
UNIT, REPLAYED, END, DONE, CRASHED = b"U", b"R", b"E", b"D", b"X"


class Carried(msgspec.Struct, array_like=True, gc=False):
    """What sessions read of an incoming event besides its row: only this crosses the pipe
    (its properties and context are in the row already)."""

    previous_id: str
    traits: dict[str, Any]


class Unit(msgspec.Struct, array_like=True, gc=False):
    """A shard's batch on the wire: rows and bots apart (msgspec wants one type per list),
    ``is_bot`` says which items are bots, in the order of ``carried``."""

    seq: int
    shard: int
    rows: list[EventRow]
    bots: list[BotRow]
    is_bot: bytes
    carried: list[Carried]


class Done(msgspec.Struct, array_like=True):
    seqs: list[int]
    counters: list[tuple[str, list[str], float]]  # metric, label values, increment


_encode = msgspec.msgpack.Encoder().encode
_decode_unit = msgspec.msgpack.Decoder(Unit).decode
_decode_done = msgspec.msgpack.Decoder(Done).decode


def encode_unit(seq: int, shard: int, batch: ShardBatch) -> bytes:
    rows: list[EventRow] = []
    bots: list[BotRow] = []
    flags = bytearray()
    for item in batch.events:
        if isinstance(item.row, BotRow):
            bots.append(item.row)
            flags.append(1)
        else:
            rows.append(item.row)
            flags.append(0)
    carried = [Carried(e.incoming.previous_id, e.incoming.traits) for e in batch.events]
    return _encode(Unit(seq, shard, rows, bots, bytes(flags), carried))


def decode_unit(data: bytes | memoryview) -> tuple[int, int, list[Enriched]]:
    unit = _decode_unit(data)
    rows, bots = iter(unit.rows), iter(unit.bots)
    items = [Enriched(next(bots) if flag else next(rows), _incoming(carried), unit.shard)
             for flag, carried in zip(unit.is_bot, unit.carried, strict=True)]
    return unit.seq, unit.shard, items


_NO_CONTEXT = Context()


def _incoming(carried: Carried) -> Incoming:
    """The incoming event as far as sessions read it (the rest is in its row)."""
    return Incoming("", "", "", "", "", "", {}, carried.traits, _NO_CONTEXT, 0, 0, "", "",
                    carried.previous_id, "")


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


# --- counters: the worker's increments, applied to the service's registry ----------------


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


# --- the worker process ----------------------------------------------------------------


@dataclass
class WorkerParams:
    """What a worker needs of the configuration (JSON, in its environment)."""

    redis_url: str
    redis_timeout: float
    key_prefix: str
    shards: list[int]  # the worker's own; pipeline.session_shards is the count of all
    log_level: str
    log_format: str
    parent: int
    pipeline: dict[str, Any]  # the service's [pipeline] section
    supervisor: dict[str, float]  # restarts and backoff, as the service's own actors have


class WorkerCrashed(Exception):
    """A session worker died: its error as it reported it, or its exit status."""


async def _worker(params: WorkerParams) -> None:
    redis = RedisIO(params.redis_url, params.redis_timeout)
    keys = Keys(params.key_prefix)
    pipe = msgspec.convert(params.pipeline, PipelineConfig)
    replayed = trio.Event()
    done_tx, done_rx = trio.open_memory_channel[list[Receipt]](pipe.channel_batches * 8)
    notice_tx, notice_rx = trio.open_memory_channel[Notice](pipe.channel_batches * 8)
    inboxes = {s: trio.open_memory_channel[ShardBatch](pipe.channel_batches) for s in params.shards}
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(os.dup(1))
    deltas = CounterDeltas()

    async def read_main() -> None:
        reader = FrameReader(stdin)
        while True:
            got = await reader.read()
            if got is None:  # no END: the service is gone, and another may own the shards
                os._exit(0)
            kind, payload = got
            if kind == UNIT:
                seq, shard, items = decode_unit(payload)
                await inboxes[shard][0].send(ShardBatch(items, [Receipt(str(seq), 0, 1)]))
            elif kind == REPLAYED:
                replayed.set()
            elif kind == END:
                for tx, _rx in inboxes.values():
                    tx.close()
                return

    async def write_main() -> None:
        async for finished in done_rx:
            while True:
                try:
                    finished = finished + done_rx.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            done = Done([int(r.entry_id) for r in finished], deltas.take())
            await send(frame(DONE, _encode(done)))
        last = deltas.take()
        if last:
            await send(frame(DONE, _encode(Done([], last))))

    async def send(data: bytes) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(10):  # never half a frame
            await stdout.send_all(data)

    async def watch_parent() -> None:
        while True:
            if os.getppid() != params.parent:
                os._exit(0)
            await trio.sleep(0.5)

    from .supervisor import Supervisor  # here: the supervisor imports this module

    sup = Supervisor(Config(supervisor=msgspec.convert(params.supervisor, SupervisorConfig)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_parent)
        nursery.start_soon(read_main)
        async with trio.open_nursery() as pipeline:
            pipeline.start_soon(write_main)
            pipeline.start_soon(publisher, Publisher(redis, keys), notice_rx)
            with done_tx, notice_tx:
                start_shard_actors(pipeline, sup.supervise, pipe, redis, keys,
                                   {s: rx for s, (_tx, rx) in inboxes.items()}, done_tx, notice_tx,
                                   replayed)
        nursery.cancel_scope.cancel()
    redis.close()


def worker_main() -> int:
    # From the environment, not the command line: the Redis URL may hold a password, and
    # anyone on the machine can read a command line.
    params = WorkerParams(**json.loads(os.environ.pop(PARAMS_ENV)))
    # The service drives the stop (END, or its end): a Ctrl-C or a SIGTERM sent to the whole
    # process group must not kill the worker in the middle of the service's drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup(params.log_level, params.log_format)
    gc.freeze()  # as in the service: what is built at start lives as long as the process
    try:
        trio.run(_worker, params)
    except BaseException as e:  # report why, then die: the service restarts the worker
        log.critical("session worker failed", exc_info=e)
        reason = "; ".join(f"{type(leaf).__name__}: {leaf}" for leaf in _leaves(e)).encode()
        try:
            os.set_blocking(1, True)  # trio left it non-blocking
            os.write(1, frame(CRASHED, reason))
        except OSError:  # the service is gone too: there is no one to tell
            return 1
        return 1
    return 0


def _leaves(e: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) groups: what really happened."""
    if isinstance(e, BaseExceptionGroup):
        return [leaf for inner in e.exceptions for leaf in _leaves(inner)]
    return [e]


# --- the main side ------------------------------------------------------------------------


async def worker_link(params: WorkerParams, inboxes: dict[int, trio.MemoryReceiveChannel[ShardBatch]],
                      done: trio.MemorySendChannel[list[Receipt]], replayed: trio.Event) -> None:
    """The actor that owns one worker process: feeds it its shards' batches, and sends the
    receipts of what it committed to the acker."""
    command = [sys.executable, "-m", "evactors.session_worker"]
    env = {**os.environ, PARAMS_ENV: json.dumps(asdict(params))}
    process = await trio.lowlevel.open_process(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               env=env)
    assert process.stdin is not None and process.stdout is not None
    to_worker, from_worker = process.stdin, process.stdout
    pending: dict[int, list[Receipt]] = {}
    seq = 0
    write = trio.Lock()
    crashed: str | None = None

    async def send(data: bytes) -> None:
        async with write:
            await to_worker.send_all(data)

    async def feed(shard: int, inbox: trio.MemoryReceiveChannel[ShardBatch]) -> None:
        nonlocal seq
        async for batch in inbox:
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
                finished = []
                for n in committed.seqs:
                    for receipt in pending.pop(n, []):
                        receipt.remaining -= 1
                        if receipt.remaining == 0:
                            finished.append(receipt)
                if finished:
                    await done.send(finished)
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


if __name__ == "__main__":
    sys.exit(worker_main())

"""The session worker process (``python -m evactors.service.session_worker``): runs some of
the session shards and a publisher for what they commit, under its own supervisor, fed by
its link actor in the service over its stdin/stdout (``pipeline.session_link``).

The service drives its stop: the worker ignores SIGINT/SIGTERM, ends on the link's ``E``
frame, and exits at once, writing nothing more, when its parent goes away.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys

import msgspec
import trio

from evactors.core.channels import take_queued
from evactors.core.config import Config, PipelineConfig, SupervisorConfig
from evactors.core.messages import Notice, Receipt, ShardBatch
from evactors.core.units import decode_unit
from evactors.ops import logs
from evactors.pipeline.publisher import Publisher, publisher
from evactors.pipeline.session_link import (
    CRASHED,
    DONE,
    END,
    PARAMS_ENV,
    REPLAYED,
    UNIT,
    CounterDeltas,
    Done,
    FrameReader,
    WorkerParams,
    encode_done,
    frame,
)
from evactors.pipeline.sessions import start_shard_actors
from evactors.service.supervisor import Supervisor
from evactors.store import leases
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO

log = logging.getLogger("evactors.session_worker")

COUNTERS_EVERY = 0.5  # seconds: how stale the worker's counters may be on the service's /metrics


async def _worker(params: WorkerParams) -> None:
    redis = RedisIO(params.redis_url, params.redis_timeout, wait_replicas=params.wait_replicas)
    keys = Keys(params.key_prefix, params.ingest_lanes)
    pipe = msgspec.convert(params.pipeline, PipelineConfig)
    replayed = trio.Event()
    receipts_tx, receipts_rx = trio.open_memory_channel[list[Receipt]](pipe.channel_batches * 8)
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
        async for first in receipts_rx:
            finished = [r for taken in take_queued(receipts_rx, first) for r in taken]
            await send(frame(DONE, encode_done(Done([int(r.entry_id) for r in finished], []))))
        last = deltas.take()
        if last:
            await send(frame(DONE, encode_done(Done([], last))))

    async def push_counters() -> None:
        # Apart from the commits: reading every counter costs ~0.1 ms, more than a small
        # unit's own commit.
        while True:
            await trio.sleep(COUNTERS_EVERY)
            counters = deltas.take()
            if counters:
                await send(frame(DONE, encode_done(Done([], counters))))

    writing = trio.Lock()

    async def send(data: bytes) -> None:
        async with writing:
            with trio.CancelScope(shield=True), trio.move_on_after(10):  # never half a frame
                await stdout.send_all(data)

    async def watch_parent() -> None:
        while True:
            if os.getppid() != params.parent:
                os._exit(0)
            await trio.sleep(0.5)

    sup = Supervisor(Config(supervisor=msgspec.convert(params.supervisor, SupervisorConfig)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_parent)
        nursery.start_soon(read_main)
        nursery.start_soon(push_counters)
        async with (leases.hold(redis, keys, params.shards, params.instance, pipe.lease_seconds) as held,
                    trio.open_nursery() as pipeline):
            pipeline.start_soon(write_main)
            pipeline.start_soon(publisher, Publisher(redis, keys), notice_rx)
            with receipts_tx, notice_tx:
                start_shard_actors(pipeline, sup.supervise, pipe, redis, keys,
                                   {s: rx for s, (_tx, rx) in inboxes.items()}, receipts_tx, notice_tx,
                                   replayed, held)
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


if __name__ == "__main__":
    sys.exit(worker_main())

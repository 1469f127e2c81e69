"""The unit codec: a shard's batch of enriched events as bytes, for the two ways one reaches
its session actor from elsewhere: the pipe to a session worker (``pipeline.session_link``)
and a shard's inbox stream in Redis (``store.inbox``), where another instance's enricher
leaves the events of visitors whose shard it does not hold."""

from __future__ import annotations

from typing import Any

import msgspec

from evactors.core.messages import Enriched, ShardBatch
from evactors.core.model import BotRow, Context, EventRow, Incoming


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


_encode = msgspec.msgpack.Encoder().encode
_decode_unit = msgspec.msgpack.Decoder(Unit).decode


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

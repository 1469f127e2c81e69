"""The buffer codec: one buffer-stream entry holds the rows of one session commit, per
table. Written by the session actors, read by the flusher; kept here so neither reaches
into the other."""

from __future__ import annotations

import msgspec

from evactors.core.model import BotRow, EventRow, ProfileRow, SessionRow


class Block(msgspec.Struct, array_like=True):
    """One buffer-stream entry: the rows of one commit, per table."""

    events: list[EventRow]
    sessions: list[SessionRow]
    profiles: list[ProfileRow]
    bots: list[BotRow] = []


encode_block = msgspec.msgpack.Encoder().encode
decode_block = msgspec.msgpack.Decoder(Block).decode

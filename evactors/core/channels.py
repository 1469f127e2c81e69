"""Taking what is queued: an actor that has received one batch takes whatever else is
already waiting in its inbox (without waiting for more), so one unit of work — one script
call, one commit, one frame — serves all of it. Under load units grow by themselves; when
idle each batch goes alone, with no added latency."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


def take_queued(inbox: trio.MemoryReceiveChannel[T], first: T, limit: int | None = None,
                size: Callable[[T], int] = lambda _: 1) -> list[T]:
    """``first`` and what else is queued, until ``limit`` (counted by ``size``) is reached.
    An inbox closed meanwhile keeps its end for the caller's next ``receive``."""
    taken = [first]
    total = size(first)
    while limit is None or total < limit:
        try:
            more = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        taken.append(more)
        total += size(more)
    return taken

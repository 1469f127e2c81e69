"""Taking what is queued: an actor that has received one batch takes whatever else is
already waiting in its inbox (without waiting for more), so one unit of work — one script
call, one commit, one frame — serves all of it. Under load units grow by themselves; when
idle each batch goes alone, with no added latency. ``gather`` also lingers a little for
more, for the stage where the unit's size sets the cost of everything after it."""

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


async def gather(inbox: trio.MemoryReceiveChannel[T], first: T, limit: int, linger: float,
                 size: Callable[[T], int] = lambda _: 1) -> list[T]:
    """``first`` and what else arrives within ``linger`` seconds, until ``limit`` (counted
    by ``size``). A closed inbox ends the wait; its end stays for the caller's next
    ``receive``. Cancel-safe: a receive interrupted by the deadline takes nothing."""
    taken = take_queued(inbox, first, limit, size)
    total = sum(size(t) for t in taken)
    if total >= limit or linger <= 0:
        return taken
    with trio.move_on_after(linger):
        while total < limit:
            try:
                more = await inbox.receive()
            except trio.EndOfChannel:
                break
            for item in take_queued(inbox, more, limit - total, size):
                taken.append(item)
                total += size(item)
    return taken

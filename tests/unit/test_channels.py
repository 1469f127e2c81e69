"""Units of work: what an actor takes from its inbox at once (core.channels)."""

from __future__ import annotations

import trio
import trio.testing

from evactors.core.channels import gather, take_queued


async def test_take_queued_takes_only_what_waits() -> None:
    tx, rx = trio.open_memory_channel[int](10)
    for i in range(1, 4):
        tx.send_nowait(i)
    assert take_queued(rx, 0) == [0, 1, 2, 3]
    assert take_queued(rx, 9) == [9]


async def test_gather_lingers_for_late_arrivals_up_to_its_deadline() -> None:
    tx, rx = trio.open_memory_channel[list[int]](10)
    got: list[list[list[int]]] = []

    async def sender() -> None:
        await trio.sleep(0.002)
        await tx.send([1, 2])  # within the linger: joins the unit
        await trio.sleep(0.02)
        await tx.send([3])  # after it: the next unit

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        got.append(await gather(rx, [0], limit=100, linger=0.01, size=len))
        got.append(await gather(rx, await rx.receive(), limit=100, linger=0.0, size=len))
    assert got == [[[0], [1, 2]], [[3]]]


async def test_gather_stops_at_its_limit_and_leaves_the_rest_queued() -> None:
    tx, rx = trio.open_memory_channel[list[int]](10)
    for part in ([1, 1], [2, 2], [3, 3]):
        tx.send_nowait(part)
    with trio.fail_after(1):  # full: no lingering
        assert await gather(rx, [0, 0], limit=4, linger=5.0, size=len) == [[0, 0], [1, 1]]
    assert rx.receive_nowait() == [2, 2]


async def test_gather_ends_its_wait_when_the_inbox_closes() -> None:
    tx, rx = trio.open_memory_channel[int](10)
    tx.send_nowait(1)
    tx.close()
    with trio.fail_after(1):
        assert await gather(rx, 0, limit=100, linger=5.0) == [0, 1]
    try:
        rx.receive_nowait()
        raise AssertionError("the closed inbox must say so to the caller")
    except trio.EndOfChannel:
        pass

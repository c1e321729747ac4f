"""The provider slots: at most ``max_refreshes`` refreshes at once, the waiting ones
started in random order, and no slot lost to a cancelled waiter."""

from __future__ import annotations

import asyncio

import pytest

from factorial_tokens._slots import Slots


async def test_at_most_size_hold_at_once_and_every_waiter_gets_a_slot_in_random_order() -> None:
    slots = Slots(3)
    holding = most = 0
    order: list[int] = []

    async def one(index: int) -> None:
        nonlocal holding, most
        async with slots:
            holding += 1
            most = max(most, holding)
            order.append(index)
            await asyncio.sleep(0)
            holding -= 1

    await asyncio.gather(*(one(i) for i in range(200)))
    assert most == 3
    assert sorted(order) == list(range(200))
    # The first three found free slots; the 197 that waited did not start in arrival order
    # (by chance once in 197! runs).
    assert order[:3] == [0, 1, 2] and order[3:] != sorted(order[3:])
    assert not slots.locked()


async def test_a_cancelled_waiter_takes_no_slot() -> None:
    slots = Slots(1)
    await slots.__aenter__()
    assert slots.locked()
    waiter = asyncio.ensure_future(slots.__aenter__())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await slots.__aexit__(None, None, None)
    assert not slots.locked()  # not handed to the cancelled waiter


async def test_a_waiter_cancelled_after_it_was_handed_a_slot_passes_it_on() -> None:
    slots = Slots(1)
    await slots.__aenter__()
    waiter = asyncio.ensure_future(slots.__aenter__())
    await asyncio.sleep(0)
    await slots.__aexit__(None, None, None)  # handed to the waiter, which has not run yet
    assert slots.locked()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not slots.locked()  # given back, not lost with the cancelled waiter


async def test_a_waiter_set_to_false_takes_no_slot_and_the_next_one_gets_it() -> None:
    slots = Slots(1)
    assert slots.take_free()
    assert not slots.take_free()
    giving_up, staying = slots.queue(), slots.queue()
    waiting = asyncio.ensure_future(slots.wait(staying))
    giving_up.set_result(False)  # what the manager does when the tenant's commit is announced
    await asyncio.sleep(0)
    assert not waiting.done()
    slots.release()  # passes to the waiter that stayed, never to the one that gave up
    assert await waiting is True
    slots.release()
    assert not slots.locked()
    assert slots.take_free()

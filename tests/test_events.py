"""The event dispatcher: listeners called on one thread, in the order emitted; the events
of one turn of the loop handed to that thread together."""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

from factorial_tokens import EventKind, TokenEvent
from factorial_tokens._events import EventDispatcher


class _CountingQueue(queue.SimpleQueue[Any]):
    """Counts what is put (each put may wake the events thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self.puts += 1
        super().put(item, block, timeout)


def _event(index: int) -> TokenEvent:
    return TokenEvent(EventKind.REFRESHED, f"tenant-{index}", version=index)


async def test_the_events_of_one_turn_wake_the_thread_once_and_arrive_in_order() -> None:
    dispatcher = EventDispatcher()
    counted = dispatcher._queue = _CountingQueue()
    seen: list[tuple[str, int | None]] = []
    threads: set[int] = set()

    def listener(event: TokenEvent) -> None:
        seen.append((event.tenant, event.version))
        threads.add(threading.get_ident())

    dispatcher.add(listener)
    for index in range(100):  # one turn
        dispatcher.publish(_event(index))
    await asyncio.sleep(0)
    for index in range(100, 150):  # the next
        dispatcher.publish(_event(index))
    assert await dispatcher.flush()
    assert seen == [(f"tenant-{i}", i) for i in range(150)]
    assert threads and threading.get_ident() not in threads
    assert counted.puts == 3  # two turns' events, and flush's marker
    await dispatcher.aclose()


async def test_closing_delivers_the_events_of_the_turn_it_closes_in() -> None:
    dispatcher = EventDispatcher()
    seen: list[int | None] = []
    dispatcher.add(lambda event: seen.append(event.version))
    for index in range(5):
        dispatcher.publish(_event(index))
    await dispatcher.aclose()  # before the turn ended: nothing handed over, no thread yet
    assert seen == [0, 1, 2, 3, 4]


def test_an_event_published_outside_a_loop_is_delivered() -> None:
    dispatcher = EventDispatcher()
    delivered = threading.Event()
    dispatcher.add(lambda event: delivered.set())
    dispatcher.publish(_event(1))
    assert delivered.wait(5)

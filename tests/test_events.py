"""The event dispatcher: listeners called on one thread, in the order emitted; a burst of
events wakes that thread once, not once per event."""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from pathlib import Path
from typing import Any

from factorial_tokens import EventKind, TokenEvent, TokenManager
from factorial_tokens._events import EventDispatcher
from factorial_tokens.testing import FakeFactorial

from .conftest import SimFactory, ThreadSimFactory, app_for


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


def _publish_elsewhere(dispatcher: EventDispatcher, tenant: str, *, wait: float) -> None:
    """Another thread publishes an event of ``tenant`` now; waits for it up to ``wait`` s."""
    other = threading.Thread(target=dispatcher.publish, args=(TokenEvent(EventKind.REFRESHED, tenant),))
    other.start()
    other.join(wait)


async def test_a_burst_of_events_wakes_the_thread_a_few_times_and_arrives_in_order() -> None:
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
    # A wake-up per burst (the thread may wake once more mid-burst), and flush's marker;
    # one put per event before.
    assert counted.puts <= 10
    await dispatcher.aclose()


async def test_closing_delivers_every_event_published_before() -> None:
    dispatcher = EventDispatcher()
    seen: list[int | None] = []
    dispatcher.add(lambda event: seen.append(event.version))
    for index in range(5):
        dispatcher.publish(_event(index))
    await dispatcher.aclose()
    assert seen == [0, 1, 2, 3, 4]


def test_events_of_a_loop_that_stops_for_good_are_delivered() -> None:
    """Nothing waits for the loop: the last events of a loop that never runs again arrive."""
    dispatcher = EventDispatcher()
    seen: list[int | None] = []
    arrived = threading.Event()

    def listener(event: TokenEvent) -> None:
        seen.append(event.version)
        if event.version == 2:
            arrived.set()

    dispatcher.add(listener)

    def last_turn() -> None:
        for index in range(3):
            dispatcher.publish(_event(index))
        loop.stop()  # this turn is the loop's last

    loop = asyncio.new_event_loop()
    try:
        loop.call_soon(last_turn)
        loop.run_forever()
    finally:
        loop.close()
    assert arrived.wait(5)
    assert seen == [0, 1, 2]


def test_events_published_from_several_threads_are_all_delivered() -> None:
    dispatcher = EventDispatcher()
    seen: list[tuple[str, int | None]] = []
    dispatcher.add(lambda event: seen.append((event.tenant, event.version)))

    def burst(name: str) -> None:
        for index in range(2_000):
            dispatcher.publish(TokenEvent(EventKind.REFRESHED, name, version=index))

    threads = [threading.Thread(target=burst, args=(f"thread-{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    asyncio.run(dispatcher.aclose())
    assert len(seen) == 8_000
    for n in range(4):  # each thread's events in the order it published them
        assert [v for t, v in seen if t == f"thread-{n}"] == list(range(2_000))


async def test_an_event_published_while_closing_is_delivered_and_so_are_later_ones() -> None:
    """The loop runs while ``aclose`` waits for the thread to stop (a cancelled refresh
    emits then): an event published after the thread's last look at the queue, before
    ``aclose`` returned, took the wake-up for itself with no thread left to wake, and every
    event after it waited for a wake-up that never came."""
    dispatcher = EventDispatcher()
    seen: list[int | None] = []
    dispatcher.add(lambda event: seen.append(event.version))
    dispatcher.publish(_event(0))
    assert await dispatcher.flush()
    thread = dispatcher._thread
    assert thread is not None
    published = threading.Event()
    thread_join = thread.join

    def join(timeout: float | None = None) -> None:
        thread_join(timeout)  # the thread is gone
        published.wait(5)  # and aclose has not returned: the loop runs meanwhile

    thread.join = join  # type: ignore[method-assign]

    async def late() -> None:
        while thread.is_alive():
            await asyncio.sleep(0.001)
        dispatcher.publish(_event(1))
        published.set()

    await asyncio.gather(dispatcher.aclose(), late())
    dispatcher.publish(_event(2))
    assert await dispatcher.flush()
    assert seen == [0, 1, 2]
    await dispatcher.aclose()


async def test_a_listener_stuck_past_aclose_never_runs_beside_a_second_thread() -> None:
    """``aclose`` gives up on a thread stuck in a listener. Events published after that
    (a cancelled refresh emits while the manager closes) wait for the stuck thread; they
    used to start a second thread, which called the listeners beside the first one, out
    of order."""
    dispatcher = EventDispatcher()
    seen: list[int | None] = []
    running = 0
    overlapped = False
    stuck, release = threading.Event(), threading.Event()

    def listener(event: TokenEvent) -> None:
        nonlocal running, overlapped
        running += 1
        overlapped = overlapped or running > 1
        if event.version == 0:
            stuck.set()
            release.wait(10)
        seen.append(event.version)
        running -= 1

    dispatcher.add(listener)
    dispatcher.publish(_event(0))
    assert await asyncio.to_thread(stuck.wait, 5)
    await dispatcher.aclose(timeout=0.1)  # gives up on the stuck listener
    for index in range(1, 4):
        dispatcher.publish(_event(index))
    await asyncio.sleep(0.2)  # a second thread, if one were started, would run now
    release.set()
    for _ in range(500):
        if len(seen) == 4:
            break
        await asyncio.sleep(0.01)
    assert (seen, overlapped) == ([0, 1, 2, 3], False)
    await dispatcher.aclose()
    assert dispatcher._thread is None


async def test_an_event_published_as_the_events_thread_stops_is_not_stranded() -> None:
    """The events thread checks ``_pending`` under ``_lock``, but ``_put`` reads
    ``_thread`` without it: an event published between that check and
    ``self._thread = None`` sets ``_woken`` and queues a wake-up for a thread that is
    about to return. Nothing starts another one: that event, and every later one
    (``_woken`` stays set), is never delivered, and ``flush`` says all was."""
    dispatcher = EventDispatcher()
    got: list[str] = []
    dispatcher.add(lambda event: got.append(event.tenant))
    raced: list[bool] = []
    armed: list[bool] = []

    class Pending(collections.deque):  # type: ignore[type-arg]
        def __bool__(self) -> bool:
            answer = len(self) > 0
            stopping = (
                threading.current_thread().name == "factorial-tokens-events" and dispatcher._lock.locked()
            )
            if stopping and armed and not raced:
                raced.append(True)
                # Another thread (or the loop, while aclose awaits the join) publishes now,
                # after this look: its event is appended, then it wakes the thread, which
                # may wait for the lock this stop path holds.
                _publish_elsewhere(dispatcher, "during-stop", wait=0.2)
            return answer

    dispatcher._pending = Pending()
    dispatcher.publish(TokenEvent(EventKind.REFRESHED, "before"))
    assert await dispatcher.flush(2.0)
    armed.append(True)  # from here the lock is taken only on the stop path
    await dispatcher.aclose()
    assert raced, "the stop path was not reached"
    dispatcher.publish(TokenEvent(EventKind.REFRESHED, "after"))
    assert await dispatcher.flush(2.0)
    for _ in range(100):
        if "after" in got:
            break
        await asyncio.sleep(0.02)
    assert got == ["before", "during-stop", "after"], got


def test_an_event_published_as_the_events_thread_stops_does_not_keep_it_forever() -> None:
    """On ``_STOP`` the thread stops "after delivering what was published meanwhile"; but an
    event published between its last look and its stop check makes it go round again, and
    the ``_STOP`` it consumed is gone: it delivers the event, then blocks on the queue
    forever (a leaked thread per closed manager; ``aclose`` warns a listener is stuck)."""
    from factorial_tokens._events import _STOP

    seen: list[str] = []
    dispatcher = EventDispatcher()
    dispatcher.add(lambda event: seen.append(event.tenant))
    dispatcher.publish(TokenEvent(EventKind.FORGOTTEN, "first"))
    thread = dispatcher._thread
    assert thread is not None
    with dispatcher._lock:  # hold the thread at its stop check
        dispatcher._queue.put(_STOP)
        time.sleep(0.3)
        late = threading.Thread(target=dispatcher.publish, args=(TokenEvent(EventKind.FORGOTTEN, "late"),))
        late.start()
        time.sleep(0.3)  # "late" is pending, its wake-up queued; publish waits for the lock
    late.join(5)
    thread.join(5)
    assert seen == ["first", "late"]
    assert not thread.is_alive(), "the events thread outlived its _STOP"


async def test_a_thread_started_by_an_event_after_close_stops_too() -> None:
    """``_run`` times out only once it saw a ``_STOP`` (``stopping``): a late event published
    after ``aclose`` stopped the thread (a cancelled refresh emits while the manager closes
    its store) starts a new thread, whose ``stopping`` is False: it blocks on the queue for
    good, and the closed manager never calls ``aclose`` again (a leaked thread per manager)."""
    dispatcher = EventDispatcher()
    seen: list[str] = []
    dispatcher.add(lambda event: seen.append(event.tenant))
    dispatcher.publish(TokenEvent(EventKind.REFRESHED, "first"))
    await dispatcher.aclose()
    assert dispatcher._thread is None
    dispatcher.publish(TokenEvent(EventKind.REFRESHED, "late"))  # after close
    late = dispatcher._thread
    assert late is not None
    for _ in range(300):
        if not late.is_alive():
            break
        await asyncio.sleep(0.01)
    assert seen == ["first", "late"]
    assert not late.is_alive(), "the thread started by an event after close never stops"


def test_an_event_published_by_a_listener_as_the_thread_stops_does_not_strand_later_ones() -> None:
    """An event published while the stopping thread drains (``_woken`` was just unset, so it
    sets it and queues a wake-up) is delivered by that same drain; the thread then finds
    nothing pending and goes, leaving ``_woken`` set and a stale wake-up queued. The next
    event sees ``_woken`` set: it queues nothing, starts no thread, is never delivered, and
    ``flush`` (no thread) says all was. Here the publish racing the stop is forced: it comes
    as the thread takes ``_STOP`` (aclose), and its listener emits one more event."""
    from factorial_tokens._events import _STOP

    dispatcher = EventDispatcher()
    seen: list[str] = []

    def listener(event: TokenEvent) -> None:
        seen.append(event.tenant)
        if event.tenant == "racing":
            dispatcher.publish(TokenEvent(EventKind.REFRESHED, "echo"))  # a listener that acts, and so emits

    dispatcher.add(listener)
    fired: list[bool] = []

    class Queue(queue.SimpleQueue):  # type: ignore[type-arg]
        def get(self, block: bool = True, timeout: float | None = None) -> object:
            item = super().get(block, timeout)
            if item is _STOP and not fired:
                fired.append(True)
                # another thread publishes just as the thread wakes with _STOP
                _publish_elsewhere(dispatcher, "racing", wait=5)
            return item

    dispatcher._queue = Queue()
    dispatcher.publish(TokenEvent(EventKind.REFRESHED, "first"))
    asyncio.run(dispatcher.aclose())
    assert fired
    deadline = time.monotonic() + 3
    while dispatcher._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    dispatcher.publish(TokenEvent(EventKind.REFRESHED, "after"))
    assert asyncio.run(dispatcher.flush(2.0))
    deadline = time.monotonic() + 2
    while "after" not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == ["first", "racing", "echo", "after"], seen


def _close_while_publishing(publishers: int, events: int) -> tuple[list[tuple[str, int | None]], bool, bool]:
    """Threads publish while ``aclose`` runs; once all is delivered (or 10 s passed): what
    the listener saw, whether two of its calls overlapped, whether a thread is left."""
    dispatcher = EventDispatcher()
    seen: list[tuple[str, int | None]] = []
    running = [0]
    overlapped = [False]

    def listener(event: TokenEvent) -> None:
        running[0] += 1
        overlapped[0] = overlapped[0] or running[0] > 1
        seen.append((event.tenant, event.version))
        running[0] -= 1

    def burst(name: str) -> None:
        for index in range(events):
            dispatcher.publish(TokenEvent(EventKind.REFRESHED, name, version=index))
            time.sleep(0.0002)  # publishing spans the close: before, during and after it

    dispatcher.add(listener)
    threads = [threading.Thread(target=burst, args=(f"p{n}",)) for n in range(publishers)]
    for thread in threads:
        thread.start()
    time.sleep(0.01)
    asyncio.run(dispatcher.aclose())
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + 10
    while (len(seen) < publishers * events or dispatcher._thread is not None) and time.monotonic() < deadline:
        time.sleep(0.01)
    return seen, overlapped[0], dispatcher._thread is not None


def test_events_racing_close_are_each_delivered_once_in_order_by_one_thread_at_a_time() -> None:
    """Threads publish while ``aclose`` runs (the stop path, a late event, a thread
    started after close): every event arrives exactly once, each publisher's in its order,
    no two listener calls overlap, and no events thread is left once all is delivered."""
    for _ in range(5):
        seen, overlapped, left = _close_while_publishing(publishers=3, events=150)
        assert len(seen) == 450 and not overlapped and not left
        for n in range(3):
            assert [v for t, v in seen if t == f"p{n}"] == list(range(150))


async def test_an_async_listener_is_never_run_concurrently(make_sim: SimFactory) -> None:
    """Each event's coroutine was started without waiting for the previous one: one
    listener handled several events at once, and a flush returned before they ran."""
    running = 0
    most = 0
    seen: list[EventKind] = []

    async def listener(event: TokenEvent) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.2)  # e.g. writing the audit row
        seen.append(event.kind)
        running -= 1

    async with make_sim(access_token_ttl=3600) as sim:
        async with TokenManager(
            app_for(sim), "memory://", on_event=listener, lease_ttl=6.0, provider_timeout=2.0
        ) as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            await tm.refresh("acme")
            await tm.refresh("acme")
            assert await tm.flush_events()
            assert len(seen) == 3  # a flush counts an async listener's event once it ran
    assert most == 1, f"an async listener ran {most} events at once"


async def test_a_removed_listener_gets_no_event_after_removal(make_sim: SimFactory) -> None:
    """Events queued before a listener's removal were still handed to it."""
    release = threading.Event()
    late: list[EventKind] = []
    removed = threading.Event()

    def slow(event: TokenEvent) -> None:
        release.wait(10)

    def audit(event: TokenEvent) -> None:
        if removed.is_set():
            late.append(event.kind)

    async with make_sim(access_token_ttl=3600) as sim:
        async with TokenManager(
            app_for(sim), "memory://", on_event=slow, lease_ttl=6.0, provider_timeout=2.0
        ) as tm:
            remove = tm.add_listener(audit)
            await tm.exchange_code("acme", sim.issue_code(company_id=1))  # slow blocks on it
            await tm.refresh("acme")
            remove()
            removed.set()
            release.set()
            assert await tm.flush_events()
    assert late == [], f"removed listener was called with {late}"


# 3. A failing meter breaks a refresh (store-call counting is not guarded).


def test_an_async_listener_runs_when_a_paused_loop_runs_again(
    make_thread_sim: ThreadSimFactory, tmp_path: Path
) -> None:
    """A loop driven by run_until_complete (legacy code, a notebook) is idle between runs:
    the events thread took it for a gone one and cancelled the listener's coroutine."""
    seen: list[EventKind] = []

    async def listener(event: TokenEvent) -> None:
        await asyncio.sleep(0.2)
        seen.append(event.kind)

    with make_thread_sim(access_token_ttl=3600) as sim:
        loop = asyncio.new_event_loop()
        try:
            tm = TokenManager(
                app_for(sim),
                f"sqlite:///{tmp_path / 't.db'}",
                on_event=listener,
                lease_ttl=6.0,
                provider_timeout=2.0,
            )
            loop.run_until_complete(tm.open())
            loop.run_until_complete(tm.exchange_code("acme", sim.issue_code(company_id=1)))
            time.sleep(1.0)  # the application does something else between two runs
            loop.run_until_complete(asyncio.sleep(1.0))
            loop.run_until_complete(tm.aclose())
        finally:
            loop.close()
    assert seen == [EventKind.EXCHANGED], seen


async def test_an_async_listener_may_close_the_manager_without_a_stall(sim: FakeFactorial) -> None:
    """An async listener that closes the manager (a one-tenant script, on
    REAUTHORIZATION_REQUIRED): aclose's flush waited for the events thread, which waits for
    this very coroutine, for flush's whole 10 s timeout."""
    took: list[float] = []

    async def listener(event: TokenEvent) -> None:
        if event.kind is EventKind.EXCHANGED:
            started = time.monotonic()
            await tm.aclose()
            took.append(time.monotonic() - started)

    tm = TokenManager(app_for(sim), "memory://", on_event=listener, lease_ttl=6.0, provider_timeout=2.0)
    await tm.open()
    await tm.exchange_code("acme", sim.issue_code(company_id=1))
    for _ in range(300):
        if took:
            break
        await asyncio.sleep(0.1)
    assert took and took[0] < 3.0, f"aclose from an async listener took {took}"

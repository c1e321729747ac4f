"""A refresh holder paused (SIGSTOP) or killed (SIGKILL) mid-refresh, past its lock's TTL.

One tenant whose token expired, two worker processes of one client, C callers each, against
the strict simulator (revoke at refresh + reuse detection) answering after L seconds:

1. the *holder* process's callers start; one of them takes the lock (the hand-written
   pattern's redis-py ``Lock``, or this library's lease) and sends the refresh;
2. as soon as the simulator has received that request, the parent stops the holder
   (SIGSTOP); once the simulator has processed it (the refresh token is rotated, the
   answer is on its way), ``kill`` also sends SIGKILL (the answer is lost); then the parent
   waits twice the lock's TTL from the stop, so the lock expires while no one can write
   the new tokens;
3. the *taker* process's callers start and run to the end;
4. the holder gets SIGCONT and its callers run to the end (a killed holder has none);
5. *afterwards*: every surviving process's C callers ask again, as the next requests would.

Counted from the simulator and the callers: refresh attempts, ``invalid_grant``, revoked
grants (broken tenants), failed calls by kind, and calls handed a token the provider no
longer accepts (a dead token), during the incident and afterwards; and whether what the
client stores afterwards is a live token.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from factorial_tokens.sealing import JsonCodec
from factorial_tokens.store import Store, TenantKey, TenantStatus, store_from_url
from factorial_tokens.testing import FakeFactorial

from . import drivers
from .common import app_for, mint_expired_tenants, new_client_id, strict_sim
from .drivers import Place
from .stores import STORES
from .storm import peer_place

TENANT = "paused-holder"
_TIMEOUT = 60.0
#: How long the parent waits for the holder's refresh to reach the simulator.
_SENT_TIMEOUT = 20.0
SIGNALS = ("pause", "kill")


@dataclass(frozen=True)
class HolderSpec:
    """One case: which client, which signal, C callers per process, lock TTL, provider latency."""

    driver: str
    signal: str
    tasks: int
    ttl: float
    latency: float
    sim_host: str = "127.0.0.1"
    sim_port: int = 0


@dataclass
class Phase:
    """What the callers of one phase got."""

    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    dead_calls: int = 0
    refresh_attempts: int = 0
    invalid_grant: int = 0


@dataclass
class HolderResult:
    """The case's counts: during the incident, afterwards, and what is stored at the end."""

    spec: HolderSpec
    during: Phase
    after: Phase
    refreshes: int
    broken_tenants: int
    stored: str
    paused_s: float

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return asdict(self)


@dataclass(frozen=True)
class _Args:
    url: str
    client_id: str
    base_url: str
    spec: HolderSpec
    place: Place
    role: str


async def _calls(driver: str, get: drivers.Getter, tasks: int) -> tuple[list[str], dict[str, int]]:
    tokens: list[str] = []
    errors: Counter[str] = Counter()

    async def call() -> None:
        try:
            tokens.append(await get(TENANT))
        except Exception as exc:
            errors[drivers.error_name(driver, exc)] += 1

    await asyncio.gather(*(call() for _ in range(tasks)))
    return tokens, dict(errors)


async def _worker(args: _Args, go: Event, after: Event, results: Queue[Any]) -> None:
    spec = args.spec
    app = app_for(args.client_id, args.base_url)
    store = store_from_url(args.url)
    try:
        async with (
            drivers.process_state(spec.driver, app, store, args.place) as state,
            drivers.token_getter(spec.driver, app, store, [TENANT], state, args.place, shared=True) as get,
        ):
            results.put((args.role, "ready", None))
            await asyncio.to_thread(go.wait, _TIMEOUT)
            results.put((args.role, "during", await _calls(spec.driver, get, spec.tasks)))
            await asyncio.to_thread(after.wait, _TIMEOUT)
            results.put((args.role, "after", await _calls(spec.driver, get, spec.tasks)))
    finally:
        await store.aclose()


def _worker_main(args: _Args, go: Event, after: Event, results: Queue[Any]) -> None:
    """Entry point of a worker process."""
    try:
        asyncio.run(_worker(args, go, after, results))
    except Exception as exc:
        results.put((args.role, "failed", f"{type(exc).__name__}: {exc}"))


def _wait_for(results: Queue[Any], want: set[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    got: dict[tuple[str, str], Any] = {}
    while want - got.keys():
        role, what, value = results.get(timeout=_TIMEOUT)
        if what == "failed":
            raise RuntimeError(f"{role} worker failed: {value}")
        got[role, what] = value
    return got


def _phase(sim: FakeFactorial, parts: list[tuple[list[str], dict[str, int]]], before: Any) -> Phase:
    errors: Counter[str] = Counter()
    for _, errs in parts:
        errors.update(errs)
    stats = sim.stats
    return Phase(
        calls=sum(len(tokens) + sum(errs.values()) for tokens, errs in parts),
        errors=dict(errors),
        dead_calls=sum(1 for tokens, _ in parts for token in tokens if not sim.is_active(token)),
        refresh_attempts=stats.refresh_attempts - before.refresh_attempts,
        invalid_grant=stats.invalid_grant - before.invalid_grant,
    )


async def _setup(spec: HolderSpec, place: Place, url: str, sim: FakeFactorial, client_id: str) -> None:
    store = store_from_url(url)
    try:
        app = app_for(client_id, sim.base_url)
        await mint_expired_tenants(store, sim, app, [TENANT], 1)
        await drivers.prepare(spec.driver, store, app, [TENANT], place, shared=True)
    finally:
        await store.aclose()


async def _stored(spec: HolderSpec, place: Place, url: str, sim: FakeFactorial, client_id: str) -> str:
    """What the client holds for the tenant at the end: a live token, a dead one, or a
    re-authorization mark."""
    if spec.driver == drivers.HANDWRITTEN:
        from .peer_handwritten import stored_access_token

        token, fresh = await stored_access_token(place.redis_url, place.redis_prefix, TENANT)
        if not fresh:
            return "its expired token; each call re-sends the spent refresh token"
    else:
        store: Store = store_from_url(url)
        try:
            key = TenantKey(client_id, TENANT)
            record = await store.read(key)
        finally:
            await store.aclose()
        if record is None:
            return "nothing"
        if record.status is TenantStatus.NEEDS_REAUTH:
            return "needs re-authorization"
        token = JsonCodec().decode(key, record.payload).access_token
    return "a live token" if sim.is_active(token) else "a dead token it serves as fresh"


def run(spec: HolderSpec) -> HolderResult:
    """Run one holder case on Redis with a fresh simulator."""
    if spec.signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}")
    client_id = new_client_id()
    with (
        STORES["redis"]() as url,
        peer_place(spec.driver, lease_ttl=spec.ttl, lock_ttl=spec.ttl) as place,
        strict_sim(client_id, spec.sim_host, spec.sim_port) as sim,
    ):
        asyncio.run(_setup(spec, place, url, sim, client_id))
        sim.reset_stats()
        sim.latency = spec.latency
        ctx = mp.get_context("spawn")
        results: Queue[Any] = ctx.Queue()
        go_holder, go_taker, after = ctx.Event(), ctx.Event(), ctx.Event()
        workers = {
            role: ctx.Process(
                target=_worker_main,
                args=(_Args(url, client_id, sim.base_url, spec, place, role), go, after, results),
                daemon=True,
            )
            for role, go in (("holder", go_holder), ("taker", go_taker))
        }
        for worker in workers.values():
            worker.start()
        holder = workers["holder"]
        assert holder.pid is not None
        stopped = False
        try:
            _wait_for(results, {("holder", "ready"), ("taker", "ready")})
            before = sim.stats
            go_holder.set()
            deadline = time.monotonic() + _SENT_TIMEOUT
            while sim.stats.token_requests == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("the holder's refresh never reached the simulator")
                time.sleep(0.001)
            os.kill(holder.pid, signal.SIGSTOP)
            stopped = True
            paused_at = time.monotonic()
            while sim.stats.refresh_attempts == 0:  # the provider answers after L, to a stopped process
                if time.monotonic() > deadline:
                    raise RuntimeError("the simulator never processed the holder's refresh")
                time.sleep(0.001)
            if spec.signal == "kill":
                os.kill(holder.pid, signal.SIGKILL)
                stopped = False
            time.sleep(max(0.0, paused_at + 2 * spec.ttl - time.monotonic()))
            go_taker.set()
            during = _wait_for(results, {("taker", "during")})
            paused_s = time.monotonic() - paused_at
            survivors = ["taker"]
            if spec.signal == "pause":
                os.kill(holder.pid, signal.SIGCONT)
                stopped = False
                during |= _wait_for(results, {("holder", "during")})
                survivors.append("holder")
            during_phase = _phase(sim, list(during.values()), before)
            middle = sim.stats
            after.set()
            later = _wait_for(results, {(role, "after") for role in survivors})
            after_phase = _phase(sim, list(later.values()), middle)
            stored = asyncio.run(_stored(spec, place, url, sim, client_id))
            stats = sim.stats
            for worker in workers.values():
                worker.join(timeout=_TIMEOUT)
            return HolderResult(
                spec,
                during_phase,
                after_phase,
                refreshes=stats.refreshes - before.refreshes,
                broken_tenants=stats.families_revoked - before.families_revoked,
                stored=stored,
                paused_s=paused_s,
            )
        finally:
            for worker in workers.values():
                if worker.is_alive():
                    if stopped:
                        os.kill(holder.pid, signal.SIGCONT)
                    worker.terminate()
                    worker.join()

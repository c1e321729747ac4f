"""Refresh storm: P processes x C tasks x T tenants whose tokens all expire at once.

How the tokens expire at once: before each round the parent gives T fresh tenants real
tokens (a code issued and exchanged at the simulator over HTTP, no latency during
set-up) and writes each record through the store (``JsonCodec`` + ``store.replace``)
with ``expires_at`` a minute in the past. The refresh tokens are the live ones the
simulator issued. Worker processes (spawned, each with its own store connection and a
new TokenManager per round) wait on a barrier, then all start at one wall-clock instant
``t0``; every task asks for its tenant's token and records ``time.time() - t0``.

The simulator (FakeFactorial, strict: ``REVOKE_AT_REFRESH`` with reuse detection)
answers every request after ``L`` seconds and counts what it saw: refreshes (the ideal
is one per tenant), ``invalid_grant``, revoked families (broken tenants). It runs in a
thread of the parent process.

``driver`` picks the client (``drivers``): this library, or a peer (Authlib,
factorialhr, the hand-written lock pattern) through the same storm. ``token_ttl`` instead
mints tokens that really expire after that many seconds (``expires_in``) and starts the
storm once they have: whether a client reads ``expires_in`` at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Barrier
from typing import Any

from factorial_tokens import EventKind, TokenEvent, TokenManager
from factorial_tokens.sealing import JsonCodec
from factorial_tokens.store import MemoryStore, Store, TenantKey, store_from_url
from factorial_tokens.testing import FakeFactorial, RefreshMode

from . import drivers
from .baseline import BareResult, bare_refresh
from .common import app_for, median, mint_expired_tenants, new_client_id, percentile, profiled, strict_sim
from .drivers import FACTORIAL, Getter, Place
from .stores import STORES

#: aiohttp's default connector limit: at most this many provider requests in flight per process.
CONNECTIONS_PER_PROCESS = 100
_SYNC_TIMEOUT = 600.0
#: Unrecorded rounds first: connection pools, scripts and prepared statements get warm.
WARMUP_ROUNDS = 1


@dataclass(frozen=True)
class StormSpec:
    """One storm: where, how many, how slow the provider, how many rounds, which client."""

    store: str
    processes: int
    tasks: int
    tenants: int
    latency: float
    rounds: int
    driver: str = FACTORIAL
    #: after each round, also time bare HTTP refreshes of its tenants (see ``baseline``)
    baseline: bool = True
    #: where the simulator listens (port 0: a free one; factorialhr needs port 80)
    sim_host: str = "127.0.0.1"
    sim_port: int = 0
    #: tokens that really expire after this many seconds, instead of backdated ones
    token_ttl: float | None = None
    #: the simulator's refresh mode (``RefreshMode`` value); reuse detection is always on
    refresh_mode: str = RefreshMode.REVOKE_AT_REFRESH.value


@dataclass
class RoundResult:
    """What one round measured (latencies in ms from the common start ``t0``)."""

    ideal: int
    refreshes: int
    refresh_attempts: int
    invalid_grant: int
    families_revoked: int
    calls: int
    ok: int
    errors: dict[str, int]
    dead_tokens: int
    max_distinct_tokens: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_s_busiest_process: float
    #: CPU of every worker process during the storm, per tenant (all its callers included)
    cpu_ms_per_tenant: float
    refreshed_p50_ms: float
    waiter_lag_p99_ms: float


@dataclass
class StormResult:
    """A storm's rounds and their summary (percentiles: median over rounds)."""

    spec: StormSpec
    rounds: list[RoundResult] = field(default_factory=list)
    bare: list[BareResult] = field(default_factory=list)
    #: the same bare refreshes with the storm's caller tasks (no store, no manager)
    bare_callers: list[BareResult] = field(default_factory=list)

    @property
    def ideal(self) -> int:
        return sum(r.ideal for r in self.rounds)

    @property
    def refreshes(self) -> int:
        return sum(r.refreshes for r in self.rounds)

    @property
    def refresh_ratio(self) -> float:
        return self.refreshes / self.ideal if self.ideal else math.nan

    @property
    def invalid_grant(self) -> int:
        return sum(r.invalid_grant for r in self.rounds)

    @property
    def broken_tenants(self) -> int:
        return sum(r.families_revoked for r in self.rounds)

    @property
    def calls(self) -> int:
        return sum(r.calls for r in self.rounds)

    @property
    def ok(self) -> int:
        return sum(r.ok for r in self.rounds)

    @property
    def dead_tokens(self) -> int:
        return sum(r.dead_tokens for r in self.rounds)

    @property
    def errors(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for r in self.rounds:
            total.update(r.errors)
        return dict(total)

    @property
    def p50_ms(self) -> float:
        return median([r.p50_ms for r in self.rounds])

    @property
    def p99_ms(self) -> float:
        return median([r.p99_ms for r in self.rounds])

    @property
    def all_fresh_s(self) -> float:
        """Median over rounds of the time until the last caller had a fresh token."""
        return median([r.max_ms for r in self.rounds]) / 1000

    @property
    def provider_bound_s(self) -> float:
        """The time the provider alone imposes: T x L / concurrency.

        Concurrency model: each process keeps at most ``CONNECTIONS_PER_PROCESS`` provider
        requests in flight (aiohttp's default pool), and each tenant is refreshed once, by
        one process, so at most ``P x CONNECTIONS_PER_PROCESS`` refreshes overlap.
        """
        concurrency = self.spec.processes * CONNECTIONS_PER_PROCESS
        return math.ceil(self.spec.tenants / concurrency) * self.spec.latency

    def to_json(self) -> dict[str, Any]:
        """The JSON form: spec, summary, rounds."""
        return {
            "spec": asdict(self.spec),
            "summary": {
                "ideal_refreshes": self.ideal,
                "refreshes": self.refreshes,
                "refresh_ratio": self.refresh_ratio,
                "invalid_grant": self.invalid_grant,
                "broken_tenants": self.broken_tenants,
                "calls": self.calls,
                "ok": self.ok,
                "errors": self.errors,
                "dead_tokens_handed_out": self.dead_tokens,
                "p50_ms": self.p50_ms,
                "p99_ms": self.p99_ms,
                "refresh_attempts": sum(r.refresh_attempts for r in self.rounds),
                "cpu_s_busiest_process": median([r.cpu_s_busiest_process for r in self.rounds]),
                "cpu_ms_per_tenant": median([r.cpu_ms_per_tenant for r in self.rounds]),
                "refreshed_p50_ms": median([r.refreshed_p50_ms for r in self.rounds]),
                "waiter_lag_p99_ms": median([r.waiter_lag_p99_ms for r in self.rounds]),
                "all_fresh_s": self.all_fresh_s,
                "provider_bound_s": self.provider_bound_s,
                "bare_p50_ms": median([b.p50_ms for b in self.bare]),
                "bare_p99_ms": median([b.p99_ms for b in self.bare]),
                "bare_all_s": median([b.seconds for b in self.bare]),
                "bare_failures": sum(b.failures for b in self.bare),
                "bare_cpu_ms_per_refresh": median([b.cpu_ms_per_refresh for b in self.bare]),
                "bare_callers_p99_ms": median([b.p99_ms for b in self.bare_callers]),
            },
            "rounds": [asdict(r) for r in self.rounds],
            "bare_baseline": [asdict(b) for b in self.bare],
            "bare_callers_baseline": [asdict(b) for b in self.bare_callers],
        }


def tenant_names(round_index: int, tenants: int) -> list[str]:
    """The tenants of one round (fresh ones every round; the warm-up, round -1, has at most 50)."""
    return [f"r{round_index}-t{i}" for i in range(tenants if round_index >= 0 else min(tenants, 50))]


def _first_company(spec: StormSpec, round_index: int) -> int:
    return (round_index + WARMUP_ROUNDS) * spec.tenants + 1


# -- one process's part of a round ----------------------------------------------------


@dataclass
class _Part:
    latencies_ms: list[float]
    errors: dict[str, int]
    tokens: dict[str, list[str]]
    cpu_s: float
    #: tenant -> when this process committed its refresh (ms after t0)
    refreshed_ms: dict[str, float]
    #: (tenant, ms after t0) of every call that got a token
    got_ms: list[tuple[str, float]]


async def _storm(
    driver: str, get: Getter, tenants: Sequence[str], tasks: int, t0: float, state: object
) -> _Part:
    """Start ``tasks`` callers per tenant at ``t0``; record when each had its token.

    With a TokenManager, also when this process's refreshes were committed (its events).
    """
    refreshed: dict[str, float] = {}
    got: list[tuple[str, float]] = []
    tm = state if isinstance(state, TokenManager) else None

    def on_event(event: TokenEvent) -> None:
        # Listeners run on the manager's events thread, later: the event's own time counts.
        if event.kind is EventKind.REFRESHED:
            refreshed[event.tenant] = (event.at - t0) * 1000

    remove = tm.add_listener(on_event) if tm is not None else None
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    tokens: dict[str, set[str]] = {t: set() for t in tenants}

    async def call(tenant: str) -> None:
        try:
            token = await get(tenant)
        except Exception as exc:
            errors[drivers.error_name(driver, exc)] += 1
            return
        ms = (time.time() - t0) * 1000
        latencies.append(ms)
        got.append((tenant, ms))
        tokens[tenant].add(token)

    await asyncio.sleep(max(0.0, t0 - time.time()))
    cpu = time.process_time()
    await asyncio.gather(*(call(t) for _ in range(tasks) for t in tenants))
    cpu = time.process_time() - cpu
    if tm is not None and remove is not None:
        await tm.flush_events()  # every REFRESHED event handed to on_event before it goes
        remove()
    return _Part(latencies, dict(errors), {t: sorted(s) for t, s in tokens.items()}, cpu, refreshed, got)


@dataclass(frozen=True)
class _WorkerArgs:
    url: str
    client_id: str
    base_url: str
    spec: StormSpec
    place: Place


def _worker_main(
    args: _WorkerArgs,
    barriers: tuple[Barrier, Barrier, Barrier],
    start_at: Synchronized[float],
    results: Queue[_Part | str],
) -> None:
    """Entry point of a worker process."""
    try:
        with profiled("storm-worker"):
            asyncio.run(_worker(args, barriers, start_at, results))
    except Exception as exc:  # tell the parent instead of leaving it at a barrier
        results.put(f"worker failed: {type(exc).__name__}: {exc}")
        for barrier in barriers:
            barrier.abort()


async def _worker(
    args: _WorkerArgs,
    barriers: tuple[Barrier, Barrier, Barrier],
    start_at: Synchronized[float],
    results: Queue[_Part | str],
) -> None:
    prepared, ready, go = barriers
    spec = args.spec
    app = app_for(args.client_id, args.base_url)
    store = store_from_url(args.url)
    try:
        await store.check()
        async with drivers.process_state(spec.driver, app, store, args.place) as state:
            for index in range(-WARMUP_ROUNDS, spec.rounds):
                tenants = tenant_names(index, spec.tenants)
                await asyncio.to_thread(prepared.wait, _SYNC_TIMEOUT)
                async with drivers.token_getter(
                    spec.driver, app, store, tenants, state, args.place, shared=True
                ) as get:
                    await asyncio.to_thread(ready.wait, _SYNC_TIMEOUT)
                    await asyncio.to_thread(go.wait, _SYNC_TIMEOUT)
                    part = await _storm(spec.driver, get, tenants, spec.tasks, start_at.value, state)
                results.put(part)
    finally:
        await store.aclose()


# -- the parent ------------------------------------------------------------------------


async def _prepare(
    spec: StormSpec,
    place: Place,
    store: Store,
    sim: FakeFactorial,
    client_id: str,
    tenants: Sequence[str],
    first: int,
) -> float:
    """Mint the round's tenants into ``store`` and where the driver keeps them; return the
    instant the round may start (once real short-lived tokens have expired)."""
    app = app_for(client_id, sim.base_url)
    expired = spec.token_ttl is None
    await mint_expired_tenants(store, sim, app, tenants, first, expired=expired)
    shared = spec.store != "memory"  # the multi-process path: workers load shared state
    await drivers.prepare(spec.driver, store, app, tenants, place, shared)
    return time.time() + (0.0 if expired else (spec.token_ttl or 0.0) + 0.5)


async def _prepare_url(
    spec: StormSpec,
    place: Place,
    url: str,
    sim: FakeFactorial,
    client_id: str,
    tenants: Sequence[str],
    first: int,
) -> float:
    store = store_from_url(url)
    try:
        return await _prepare(spec, place, store, sim, client_id, tenants, first)
    finally:
        await store.aclose()


async def _refresh_tokens(store: Store, namespace: str, tenants: Sequence[str]) -> list[str]:
    """The refresh tokens the store holds now (after the storm: the live, rotated ones)."""
    codec = JsonCodec()
    tokens = []
    for tenant in tenants:
        key = TenantKey(namespace, tenant)
        record = await store.read(key)
        refresh = codec.decode(key, record.payload).refresh_token if record else None
        if refresh is not None:
            tokens.append(refresh)
    return tokens


async def _refresh_tokens_url(url: str, namespace: str, tenants: Sequence[str]) -> list[str]:
    store = store_from_url(url)
    try:
        return await _refresh_tokens(store, namespace, tenants)
    finally:
        await store.aclose()


def _bare(
    spec: StormSpec, sim: FakeFactorial, client_id: str, tokens: Sequence[str]
) -> tuple[BareResult, BareResult]:
    """Bare HTTP refreshes of ``tokens`` with the storm's processes and pool (not counted in the
    round); then of their successors with the storm's callers per process (see ``baseline``)."""
    app = app_for(client_id, sim.base_url)
    before = sim.stats.refreshes
    bare, rotated = bare_refresh(app, tokens, spec.processes, CONNECTIONS_PER_PROCESS)
    callers, _ = bare_refresh(
        app, rotated, spec.processes, CONNECTIONS_PER_PROCESS, callers_per_token=spec.tasks * spec.processes
    )
    if sim.stats.refreshes - before != bare.refreshes + callers.refreshes:
        raise RuntimeError("the simulator saw a different number of bare refreshes than were answered")
    return bare, callers


def _lags(parts: Sequence[_Part]) -> list[float]:
    """For every call: how long after its tenant's refresh was committed it had the token."""
    committed: dict[str, float] = {}
    for part in parts:
        committed.update(part.refreshed_ms)
    return [ms - committed[t] for part in parts for t, ms in part.got_ms if t in committed]


def _round_result(spec: StormSpec, sim: FakeFactorial, parts: Sequence[_Part]) -> RoundResult:
    stats = sim.stats
    latencies = [x for p in parts for x in p.latencies_ms]
    errors: Counter[str] = Counter()
    by_tenant: dict[str, set[str]] = {}
    for part in parts:
        errors.update(part.errors)
        for tenant, tokens in part.tokens.items():
            by_tenant.setdefault(tenant, set()).update(tokens)
    handed_out = {token for tokens in by_tenant.values() for token in tokens}
    return RoundResult(
        ideal=len(by_tenant),
        refreshes=stats.refreshes,
        refresh_attempts=stats.refresh_attempts,
        invalid_grant=stats.invalid_grant,
        families_revoked=stats.families_revoked,
        calls=spec.processes * spec.tasks * len(by_tenant),
        ok=len(latencies),
        errors=dict(errors),
        dead_tokens=sum(1 for token in handed_out if not sim.is_active(token)),
        max_distinct_tokens=max((len(s) for s in by_tenant.values()), default=0),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        max_ms=max(latencies, default=math.nan),
        cpu_s_busiest_process=max((p.cpu_s for p in parts), default=math.nan),
        cpu_ms_per_tenant=sum(p.cpu_s for p in parts) * 1000 / max(1, len(by_tenant)),
        refreshed_p50_ms=percentile([x for p in parts for x in p.refreshed_ms.values()], 50),
        waiter_lag_p99_ms=percentile(_lags(parts), 99),
    )


async def _in_process(spec: StormSpec, place: Place, client_id: str, sim: FakeFactorial) -> StormResult:
    """One process (the memory store): set-up, storm and simulator share this process."""
    result = StormResult(spec)
    store = MemoryStore()
    app = app_for(client_id, sim.base_url)
    async with drivers.process_state(spec.driver, app, store, place) as state:
        for index in range(-WARMUP_ROUNDS, spec.rounds):
            tenants = tenant_names(index, spec.tenants)
            sim.latency = 0.0
            start = await _prepare(spec, place, store, sim, client_id, tenants, _first_company(spec, index))
            sim.reset_stats()
            sim.latency = spec.latency
            async with drivers.token_getter(
                spec.driver, app, store, tenants, state, place, shared=False
            ) as get:
                t0 = max(start, time.time() + 0.05)
                part = await _storm(spec.driver, get, tenants, spec.tasks, t0, state)
            if index >= 0:
                result.rounds.append(_round_result(spec, sim, [part]))
                if spec.baseline:
                    tokens = await _refresh_tokens(store, client_id, tenants)
                    bare, callers = await asyncio.to_thread(_bare, spec, sim, client_id, tokens)
                    result.bare.append(bare)
                    result.bare_callers.append(callers)
    return result


def _multi_process(
    spec: StormSpec, place: Place, url: str, client_id: str, sim: FakeFactorial
) -> StormResult:
    result = StormResult(spec)
    ctx = mp.get_context("spawn")
    parties = spec.processes + 1
    barriers = (ctx.Barrier(parties), ctx.Barrier(parties), ctx.Barrier(parties))
    start_at = ctx.Value("d", 0.0)
    results: Queue[_Part | str] = ctx.Queue()
    args = _WorkerArgs(url, client_id, sim.base_url, spec, place)
    workers = [
        ctx.Process(target=_worker_main, args=(args, barriers, start_at, results), daemon=True)
        for _ in range(spec.processes)
    ]
    for worker in workers:
        worker.start()
    prepared, ready, go = barriers
    try:
        for index in range(-WARMUP_ROUNDS, spec.rounds):
            tenants = tenant_names(index, spec.tenants)
            sim.latency = 0.0
            start = asyncio.run(
                _prepare_url(spec, place, url, sim, client_id, tenants, _first_company(spec, index))
            )
            sim.reset_stats()
            sim.latency = spec.latency
            prepared.wait(_SYNC_TIMEOUT)
            ready.wait(_SYNC_TIMEOUT)  # every worker holds an open manager / its clients
            start_at.value = max(start, time.time() + 0.2)
            go.wait(_SYNC_TIMEOUT)
            parts: list[_Part] = []
            for _ in workers:
                got = results.get(timeout=_SYNC_TIMEOUT)
                if isinstance(got, str):
                    raise RuntimeError(got)
                parts.append(got)
            if index >= 0:
                result.rounds.append(_round_result(spec, sim, parts))
                if spec.baseline:
                    tokens = asyncio.run(_refresh_tokens_url(url, client_id, tenants))
                    bare, callers = _bare(spec, sim, client_id, tokens)
                    result.bare.append(bare)
                    result.bare_callers.append(callers)
        for worker in workers:
            worker.join(timeout=60)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    return result


@contextlib.contextmanager
def peer_place(driver: str, lease_ttl: float = 30.0, lock_ttl: float = 10.0) -> Iterator[Place]:
    """Fresh room for a driver's own state: a temporary directory (factorialhr's files) and,
    for the hand-written pattern, a unique Redis key prefix removed afterwards."""
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ft-bench-peer-"))
        redis_url = prefix = ""
        if driver == drivers.HANDWRITTEN:
            url = stack.enter_context(STORES["redis"]())  # its prefix's keys go when it closes
            redis_url, _, query = url.partition("?")
            prefix = query.removeprefix("prefix=") + ":handwritten"
        yield Place(workdir, redis_url, prefix, lock_ttl, lease_ttl)


def run(spec: StormSpec) -> StormResult:
    """Run one storm on a fresh store URL and a fresh simulator."""
    client_id = new_client_id()
    with (
        STORES[spec.store]() as url,
        peer_place(spec.driver) as place,
        strict_sim(client_id, spec.sim_host, spec.sim_port, RefreshMode(spec.refresh_mode)) as sim,
    ):
        if spec.token_ttl is not None:
            sim.access_token_ttl = spec.token_ttl
        if spec.store == "memory":
            if spec.processes != 1:
                raise ValueError("the memory store is one process only")
            return asyncio.run(_in_process(spec, place, client_id, sim))
        return _multi_process(spec, place, url, client_id, sim)

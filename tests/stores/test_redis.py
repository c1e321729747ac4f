"""RedisStore against real redis-servers: the conformance suite (single server and a
3-master Cluster), round trips counted by redis itself, restarts, dropped connections,
hostile tenant ids, one subscription per process.

The shared server (127.0.0.1:6379 or $FT_TEST_REDIS_URL) is never flushed or
restarted: every test uses its own key prefix and deletes only its own keys. Tests that
stop, kill or count commands on a server start a throwaway one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from factorial_tokens_redis import RedisStore

from factorial_tokens import (
    ConfigurationError,
    InvalidTenant,
    StoreUnavailable,
    TokenManager,
    _logs,
)
from factorial_tokens.store import (
    ClaimState,
    Store,
    TenantKey,
    TenantStatus,
    Update,
    store_from_url,
    unreadable_record,
)
from factorial_tokens.testing import HOSTILE_TENANTS, CountingStore, FakeFactorial, StoreConformance

from ..conftest import SimFactory, app_for
from ..redis_server import CommandLog, RedisClusterServers, RedisServer, shared_redis_url, unique_prefix


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The shared Redis (never flushed), or a throwaway one when none answers."""
    with shared_redis_url() as url:
        yield url


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


@pytest.fixture
def throwaway() -> Iterator[RedisServer]:
    """A redis-server of this test's own, with AOF (appendfsync always)."""
    with RedisServer(aof=True) as server:
        yield server


async def _drop_prefix(url: str, prefix: str) -> None:
    """Delete this test's keys (and nothing else) from a shared server."""
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


def _url(base: str, prefix: str, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"prefix": prefix, **options}.items())
    return f"{base}?{query}"


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    name = unique_prefix()
    yield name
    await _drop_prefix(redis_url, name)


@pytest.fixture
async def store(redis_url: str, prefix: str) -> AsyncIterator[RedisStore]:
    built = store_from_url(_url(redis_url, prefix))
    assert isinstance(built, RedisStore)
    yield built
    await built.aclose()


def _update(payload: bytes, expires_at: float | None = None) -> Update:
    return Update(payload, TenantStatus.ACTIVE, expires_at, time.time())


async def connect(tm: TokenManager, sim: FakeFactorial, tenant: str = "acme") -> str:
    tokens = await tm.exchange_code(tenant, sim.issue_code(company_id=1))
    return tokens.access_token


# -- the conformance suite -----------------------------------------------------------


class TestRedisStore(StoreConformance):
    """The shared contract on a single Redis server."""

    announces_notices = True

    @pytest.fixture
    async def store(self, redis_url: str, prefix: str) -> AsyncIterator[RedisStore]:
        self.url = _url(redis_url, prefix)
        built = store_from_url(self.url)
        assert isinstance(built, RedisStore)
        yield built
        await built.aclose()

    async def open_peer(self, store: Store) -> Store:
        return store_from_url(self.url)  # a client, a subscription and an origin of its own


class TestRedisClusterStore(TestRedisStore):
    """The shared contract on a 3-master Redis Cluster (every script in one slot)."""

    @pytest.fixture
    async def store(self, cluster: RedisClusterServers) -> AsyncIterator[RedisStore]:
        self.url = _url(cluster.url, unique_prefix())
        built = store_from_url(self.url)
        assert isinstance(built, RedisStore) and built.cluster
        yield built
        await built.aclose()


# -- URLs, options, lifecycle --------------------------------------------------------


async def test_url_forms_and_options(redis_url: str) -> None:
    plain = RedisStore.from_url(_url(redis_url, "ft-opts", poll="0.5"))
    assert plain.prefix == "ft-opts" and not plain.cluster
    assert "ft-opts" in repr(plain) and "redis" in repr(plain)
    await plain.check()
    await plain.aclose()
    flagged = RedisStore.from_url("redis://127.0.0.1:1/0?cluster=true&prefix=x")
    assert flagged.cluster
    await flagged.aclose()
    assert RedisStore.from_url("redis+cluster://127.0.0.1:1").cluster
    assert RedisStore.from_url("rediss://127.0.0.1:1/0").prefix == "ft"
    for scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):  # the entry points
        found = store_from_url(f"{scheme}://127.0.0.1:1/0")
        assert isinstance(found, RedisStore) and found.cluster == scheme.endswith("+cluster")
        await found.aclose()
    for bad in (
        "redis://h/0?prefix={x}",
        "redis://h/0?prefix=",
        "redis://h/0?cluster=maybe",
        "redis://h?poll=x",
    ):
        with pytest.raises(ConfigurationError):
            RedisStore.from_url(bad)


async def test_an_unreachable_server_is_a_typed_error() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0?socket_connect_timeout=1")
    with pytest.raises(StoreUnavailable):
        await store.check()
    with pytest.raises(StoreUnavailable):
        await store.read(TenantKey("ns", "acme"))
    await store.aclose()
    with pytest.raises(StoreUnavailable):
        await store.read(TenantKey("ns", "acme"))


async def test_an_injected_client_is_not_closed(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    store = RedisStore(client, prefix=prefix)
    await store.replace(TenantKey("ns", "acme"), _update(b"x"))
    await store.aclose()
    assert await client.ping()  # still usable: the store did not close it
    await client.aclose()
    with pytest.raises(ConfigurationError):
        RedisStore(aioredis.Redis.from_url(redis_url, decode_responses=True))


async def test_a_malformed_record_is_a_typed_error(store: RedisStore, redis_url: str, prefix: str) -> None:
    key = TenantKey("ns", "acme")
    await store.replace(key, _update(b"x"))
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.hset(f"{prefix}:{{{key.digest}}}:rec", "status", "bogus")
    finally:
        await client.aclose()
    # Not an outage to retry: a record that cannot be opened.
    assert await store.read(key) == unreadable_record(key)
    assert (await store.acquire(key, "o", 30)).record == unreadable_record(key)


# -- keys: layout and hostile tenant ids ---------------------------------------------


async def test_keys_hold_only_digests(store: RedisStore, redis_url: str, prefix: str) -> None:
    ns = f"ns-{prefix}"
    extra = ["{", "}", "*", ":", '"quoted"', "'", "a}{b", f"{prefix}:{{x}}:rec"]
    hostile = list(dict.fromkeys([*HOSTILE_TENANTS, *extra]))
    for tenant in hostile:
        key = TenantKey(ns, tenant)
        await store.replace(key, _update(tenant.encode()))
        won = await store.acquire(key, "o", 30)
        assert won.lease is not None
        await store.claim_code(key, f"h-{tenant}", "o", 30)
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = sorted([k.decode() async for k in client.scan_iter(match=f"{prefix}:*", count=500)])
    finally:
        await client.aclose()
    pattern = re.compile(
        rf"{re.escape(prefix)}:(\{{[0-9a-f]{{32}}\}}:(rec|lease|tenants)|claim:\{{[0-9a-f]{{32}}\}})"
    )
    assert keys and all(pattern.fullmatch(k) for k in keys), keys
    assert len(keys) == 3 * len(hostile) + 1  # rec + lease + claim each, one index
    for tenant in hostile:
        record = await store.read(TenantKey(ns, tenant))
        assert record is not None and record.payload == tenant.encode()
    assert sorted(r.key.tenant for r in await store.tenants(ns)) == sorted(hostile)


async def test_the_core_refuses_ids_that_cannot_be_tenants(
    sim: FakeFactorial, redis_url: str, prefix: str
) -> None:
    async with TokenManager(app_for(sim), _url(redis_url, prefix)) as tm:
        for bad in ("a\nb", "x" * 10_000, "", "tab\there"):
            with pytest.raises(InvalidTenant):
                await tm.access_token(bad)


# -- round trips, counted twice: store calls, and the commands redis received (MONITOR) --


async def _settled(store: RedisStore) -> None:
    """Wait until the store's subscription is up and a command connection is open, so
    neither SUBSCRIBE nor a new connection's HELLO is counted later."""
    deadline = time.monotonic() + 10
    while store._listener.connections < 1:
        assert time.monotonic() < deadline, "the store never subscribed"
        await asyncio.sleep(0.01)
    await store.check()


async def test_round_trips_measured_by_redis(make_sim: SimFactory, throwaway: RedisServer) -> None:
    async with make_sim(access_token_ttl=1) as sim, CommandLog(throwaway.url) as log:
        writer = RedisStore.from_url(throwaway.url)
        async with TokenManager(app_for(sim), writer, lease_ttl=6, provider_timeout=2) as first:
            await connect(first, sim)
            await asyncio.sleep(1.1)
            await first.access_token("acme")  # one refresh, so every script is loaded
        await writer.aclose()

        inner = RedisStore.from_url(throwaway.url)
        store = CountingStore(inner)
        async with TokenManager(app_for(sim), store, lease_ttl=6, provider_timeout=2) as tm:
            await _settled(inner)
            await asyncio.sleep(1.1)  # expire what the first manager stored
            # What this refresh gets lives long: the counts below must not meet its refresh
            # window, however slow a loaded machine is.
            sim.access_token_ttl = 3600
            # A whole refresh in a cold process: two store calls, two commands (the
            # acquisition takes the lease because the record is due; no read first).
            store.reset()
            refreshed, commands = await log.measure(tm.access_token("acme"))
            assert dict(store.calls) == {"acquire": 1, "commit": 1}
            assert commands == ["evalsha", "evalsha"]
            # The hot path: no store call, no command.
            store.reset()
            tokens, commands = await log.measure(
                asyncio.gather(*(tm.access_token("acme") for _ in range(1000)))
            )
            assert set(tokens) == {refreshed}
            assert store.calls.total() == 0 and commands == []
        assert sim.stats.refreshes == 2 and sim.stats.invalid_grant == 0

        other_inner = RedisStore.from_url(throwaway.url)
        other = CountingStore(other_inner)
        async with TokenManager(app_for(sim), other, lease_ttl=6, provider_timeout=2) as second:
            await _settled(other_inner)
            other.reset()
            token, commands = await log.measure(second.access_token("acme"))
            assert token == refreshed  # fresh in Redis: one acquisition that takes nothing
            assert dict(other.calls) == {"acquire": 1}
            assert commands == ["evalsha"]
        await other_inner.aclose()
        await inner.aclose()


async def test_each_primitive_is_one_command(throwaway: RedisServer) -> None:
    store = RedisStore.from_url(throwaway.url)
    key = TenantKey("ns", "acme")
    await store.replace(key, _update(b"warm"))  # load every script once
    warm = await store.acquire(key, "w", 30)
    assert warm.lease is not None
    await store.extend(warm.lease, 30)
    await store.release(warm.lease)
    warm = await store.acquire(key, "w", 30)
    assert warm.lease is not None
    await store.commit(warm.lease, _update(b"warm"))
    claim = await store.claim_code(key, "warm", "w", 30)
    await store.advance_code(claim, ClaimState.SENT, 30)

    async with CommandLog(throwaway.url) as log:
        assert (await log.measure(store.read(key)))[1] == ["hmget"]
        won, commands = await log.measure(store.acquire(key, "o", 30))
        assert won.lease is not None and commands == ["evalsha"]
        assert await log.measure(store.extend(won.lease, 30)) == (True, ["evalsha"])
        assert await log.measure(store.release(won.lease)) == (True, ["evalsha"])
        won = await store.acquire(key, "q", 30)
        assert won.lease is not None
        record, commands = await log.measure(store.commit(won.lease, _update(b"y")))
        assert record is not None and commands == ["evalsha"]
        assert await log.measure(store.replace(key, _update(b"z"))) == (None, ["sadd", "evalsha"])
        assert await log.measure(store.replace(key, None)) == (None, ["evalsha"])
        claim, commands = await log.measure(store.claim_code(key, "h", "o", 30))
        assert claim.won and commands == ["evalsha"]
        assert await log.measure(store.advance_code(claim, ClaimState.SENT, 30)) == (True, ["evalsha"])
        assert (await log.measure(store.tenants("ns")))[1] == ["smembers", "hmget"]
    await store.aclose()


# -- wake-ups: one subscription per store, across stores, after a reconnect -------------


async def test_one_subscription_per_store(redis_url: str, prefix: str) -> None:
    stores = [RedisStore.from_url(_url(redis_url, prefix)) for _ in range(2)]
    admin = aioredis.Redis.from_url(redis_url)
    keys = [TenantKey("ns", f"t{i}") for i in range(50)]
    try:
        async with contextlib_stack(stores[0], keys) as watches:
            assert len(watches) == 50
            numsub = dict(await admin.pubsub_numsub(f"{prefix}:changes"))
            assert numsub[f"{prefix}:changes".encode()] == 1
            # Another store (another process) releases: the right watcher wakes at once.
            won = await stores[1].acquire(keys[7], "o", 30)
            assert won.lease is not None
            await stores[1].release(won.lease)
            assert await _woken(watches[7], 5.0)
            assert not await watches[8].wait(0.2)
    finally:
        for s in stores:
            await s.aclose()
        await admin.aclose()


class contextlib_stack:
    """Enter ``store.watch`` for every key at once."""

    def __init__(self, store: RedisStore, keys: list[TenantKey]) -> None:
        self._managers = [store.watch(k) for k in keys]

    async def __aenter__(self) -> list[Any]:
        return list(await asyncio.gather(*(m.__aenter__() for m in self._managers)))

    async def __aexit__(self, *exc_info: object) -> None:
        for m in self._managers:
            await m.__aexit__(None, None, None)


async def _woken(watch: Any, within: float) -> bool:
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        if await watch.wait(left):
            return True
    return False


async def test_a_lost_subscription_resubscribes_and_wakes_everyone(throwaway: RedisServer) -> None:
    store = RedisStore.from_url(throwaway.url)
    admin = aioredis.Redis.from_url(throwaway.url)
    key = TenantKey("ns", "acme")
    try:
        async with store.watch(key) as watch:
            await _settled(store)
            assert await admin.client_kill_filter(_type="pubsub") == 1
            assert await _woken(watch, 5.0)  # notify_all after the resubscription
            deadline = time.monotonic() + 10
            while store._listener.connections < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            other = RedisStore.from_url(throwaway.url)
            await other.replace(key, _update(b"x"))
            await other.aclose()
            assert await _woken(watch, 5.0)  # and the new subscription delivers
    finally:
        await store.aclose()
        await admin.aclose()


async def test_the_store_s_own_tasks_do_not_log_in_the_first_caller_s_name(
    throwaway: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The subscription's listener (and the pipeline's drainer) outlive the caller whose
    call started them: their log records name no tenant, not that caller's."""
    store = RedisStore.from_url(throwaway.url)
    admin = aioredis.Redis.from_url(throwaway.url)
    token = _logs.bind(_logs.OperationContext("first-caller", "refresh"))
    try:
        async with store.watch(TenantKey("ns", "acme")) as watch:
            await _settled(store)
            _logs.reset(token)
            assert await admin.client_kill_filter(_type="pubsub") == 1
            assert await _woken(watch, 5.0)
        lost = [r for r in caplog.records if "subscription lost" in r.getMessage()]
        assert lost and all(getattr(r, "tenant", None) is None for r in lost), [vars(r) for r in lost]
    finally:
        await store.aclose()
        await admin.aclose()


# -- adversity: restarts and dropped connections ---------------------------------------


async def test_redis_restart_mid_run(make_sim: SimFactory, throwaway: RedisServer) -> None:
    async with make_sim(access_token_ttl=6) as sim:
        store = RedisStore.from_url(_url(throwaway.url, "ft", socket_connect_timeout="1"))
        async with TokenManager(app_for(sim), store, lease_ttl=3, provider_timeout=1) as tm:
            token = await connect(tm, sim)
            assert await tm.access_token("acme") == token  # now cached
            before = await store.read(tm._key("acme"))
            assert before is not None
            await _settled(store)

            throwaway.stop(signal.SIGKILL)  # a crash: only AOF (fsync always) saves the data
            with pytest.raises(StoreUnavailable):
                await store.read(tm._key("acme"))
            with pytest.raises(StoreUnavailable):
                await store.check()
            assert await tm.access_token("acme") == token  # the cache keeps serving
            await asyncio.sleep(3.2)  # past the refresh point, before expiry
            assert await tm.access_token("acme") == token  # store down: still the cached token
            with pytest.raises(StoreUnavailable):
                await tm.refresh("acme")

            throwaway.start()  # same port, same AOF
            after = await store.read(tm._key("acme"))  # the same worker reconnects by itself
            assert after == before  # nothing lost
            assert await tm.access_token("acme") == token  # in the leeway: still the current token
            fresh = (await tm.refresh("acme")).access_token  # a real refresh through Redis
            assert fresh != token and sim.is_active(fresh)
            deadline = time.monotonic() + 10
            while store._listener.connections < 2:  # the subscription came back too
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        await store.aclose()
        assert sim.stats.refreshes == 1 and sim.stats.invalid_grant == 0


async def test_a_connection_killed_between_calls(throwaway: RedisServer) -> None:
    store = RedisStore.from_url(throwaway.url)
    admin = aioredis.Redis.from_url(throwaway.url)
    key = TenantKey("ns", "acme")
    await store.replace(key, _update(b"v1"))
    killed = await admin.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    outcomes = []
    for _ in range(2):  # the next call reconnects, or fails typed and the one after works
        try:
            outcomes.append(await store.read(key))
        except StoreUnavailable:
            outcomes.append(None)
    assert outcomes[-1] is not None and outcomes[-1].payload == b"v1"
    await store.aclose()
    await admin.aclose()


async def test_a_connection_dropped_while_a_script_waits(throwaway: RedisServer) -> None:
    """The commit is sent and queued (clients paused for writes), then its connection is
    killed: the caller gets StoreUnavailable and Redis holds no half-written record."""
    store = RedisStore.from_url(throwaway.url)
    admin = aioredis.Redis.from_url(throwaway.url)
    key = TenantKey("ns", "acme")
    await store.replace(key, _update(b"v1", expires_at=10.0))
    won = await store.acquire(key, "holder", 30)
    assert won.lease is not None and won.record is not None
    await store.extend(won.lease, 30)  # loads the scripts used below
    await admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
    try:
        commit = asyncio.create_task(store.commit(won.lease, _update(b"v2", expires_at=20.0)))
        await asyncio.sleep(0.3)  # the EVALSHA is now waiting inside Redis
        assert not commit.done()
        assert await admin.client_kill_filter(_type="normal", skipme=True) >= 1
        with pytest.raises(StoreUnavailable):
            await commit
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
    fields = await admin.hgetall(f"ft:{{{key.digest}}}:rec")
    assert fields[b"payload"] == b"v1" and fields[b"version"] == b"1" and fields[b"expires_at"] == b"10.0"
    assert fields[b"holder"] == b"holder"  # the lease was not released either: all or nothing
    record = await store.commit(won.lease, _update(b"v2", expires_at=20.0))  # reconnects
    assert record is not None and record.payload == b"v2" and record.version == 2
    assert await store.read(key) == record
    await store.aclose()
    await admin.aclose()


async def test_a_script_racing_a_kill_is_all_or_nothing(throwaway: RedisServer) -> None:
    """A busy server receives a commit and a kill of its connection at once: whichever
    wins, the record is either the old one with the lease held, or the new one released."""
    store = RedisStore.from_url(throwaway.url)
    admin = aioredis.Redis.from_url(throwaway.url)
    blocker = aioredis.Redis.from_url(throwaway.url)
    busy = (
        "local t = redis.call('TIME'); local s = t[1] + t[2] / 1e6; "
        "repeat t = redis.call('TIME') until t[1] + t[2] / 1e6 > s + 0.3"
    )
    key = TenantKey("ns", "acme")
    outcomes = set()
    for round_ in range(6):
        await store.replace(key, _update(b"old"))
        won = await store.acquire(key, "holder", 30)
        assert won.lease is not None
        hold = asyncio.create_task(blocker.eval(busy, 0))
        await asyncio.sleep(0.05)
        commit = asyncio.create_task(store.commit(won.lease, _update(f"new{round_}".encode())))
        await asyncio.sleep(0.05)
        await admin.client_kill_filter(_type="normal", skipme=True)
        await hold_quietly(hold)
        try:
            result = await commit
            outcomes.add("committed" if result is not None else "refused")
        except StoreUnavailable:
            outcomes.add("dropped")
        fields = await admin.hgetall(f"ft:{{{key.digest}}}:rec")
        if fields[b"payload"] == b"old":
            assert fields.get(b"holder") == b"holder"
        else:
            assert fields[b"payload"] == f"new{round_}".encode() and b"holder" not in fields
        await store.release(won.lease)
    assert outcomes <= {"committed", "dropped"}
    await store.aclose()
    await admin.aclose()
    await blocker.aclose()


async def hold_quietly(task: asyncio.Task[Any]) -> None:
    with contextlib.suppress(Exception):  # the blocker's own connection may be killed too
        await task


async def test_more_concurrent_calls_than_connections_wait_for_one(redis_url: str, prefix: str) -> None:
    """Past ``max_connections`` a call waits for a free connection instead of failing
    (redis-py's plain pool raised MaxConnectionsError: 99% of a 10,000-tenant storm)."""
    store = RedisStore.from_url(_url(redis_url, prefix, max_connections="4"))
    try:
        key = TenantKey("app", "acme")
        await store.replace(key, _update(b"tokens"))
        records = await asyncio.gather(*(store.read(key) for _ in range(400)))
        assert all(r is not None and r.payload == b"tokens" for r in records)
    finally:
        await store.aclose()


async def test_queued_commands_without_hiredis_are_packed_by_redis_py(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hiredis is optional: without its packer the pipelined commands (binary payloads,
    non-ASCII tenant ids) go out packed by redis-py, and each call gets its own reply."""
    import factorial_tokens_redis._store as redis_store

    monkeypatch.setattr(redis_store, "_pack_command", None)
    store = RedisStore.from_url(_url(redis_url, prefix))
    try:
        keys = [TenantKey("ns", f"caf\u00e9-{i}") for i in range(20)]
        payloads = [bytes([i, 0, 255]) + "é".encode() for i in range(20)]
        for key, payload in zip(keys, payloads, strict=True):
            await store.replace(key, _update(payload))
        won = await asyncio.gather(*(store.acquire(key, "owner", 30) for key in keys))
        assert [w.record.payload if w.record else None for w in won] == payloads
        assert all(w.lease is not None for w in won)
        records = await asyncio.gather(*(store.read(k) for k in keys))
        assert [r.payload if r else None for r in records] == payloads
    finally:
        await store.aclose()


async def test_calls_issued_at_once_share_pipelines_each_with_its_own_reply(throwaway: RedisServer) -> None:
    """Auto-pipelining: reads and scripts issued in one turn of the loop leave together,
    yet each call gets its own reply; scripts the server forgot (SCRIPT FLUSH) are loaded
    again by the fallback and run once."""
    store = RedisStore.from_url(throwaway.url)
    admin = aioredis.Redis.from_url(throwaway.url)
    try:
        keys = [TenantKey("ns", f"t{i}") for i in range(50)]
        for key in keys:
            await store.replace(key, _update(key.tenant.encode()))
        await admin.script_flush()
        sent = store._exchange
        batches: list[int] = []

        async def counted(commands: Any) -> Any:
            batches.append(len(commands))
            return await sent(commands)

        store._exchange = counted  # type: ignore[method-assign]
        won = await asyncio.gather(*(store.acquire(key, "owner", 30) for key in keys))
        assert [w.record.payload if w.record else None for w in won] == [k.tenant.encode() for k in keys]
        fences = {w.lease.fence if w.lease else None for w in won}
        assert len(fences) == 1 and None not in fences  # each key: the same history, one lease
        records = await asyncio.gather(*(store.read(key) for key in keys * 4))
        assert [r.payload if r else None for r in records] == [k.tenant.encode() for k in keys * 4]
        assert sum(batches) == 250 and len(batches) < 20
    finally:
        await admin.aclose()
        await store.aclose()


# -- found by a reviewer: cancellation, tampered fields, URLs -------------------------------

BUSY = (  # holds the single-threaded server for 0.5 s
    "local t = redis.call('TIME'); local s = t[1] + t[2] / 1e6; "
    "repeat t = redis.call('TIME') until t[1] + t[2] / 1e6 > s + 0.5"
)

Tampering = tuple[RedisStore, aioredis.Redis]


@pytest.fixture
async def tampering() -> AsyncIterator[Tampering]:
    """A store on a prefix of its own, and a plain client to change its keys behind it."""
    with shared_redis_url() as url:
        prefix = unique_prefix()
        store = RedisStore.from_url(f"{url}?prefix={prefix}")
        admin = aioredis.Redis.from_url(url)
        try:
            yield store, admin
        finally:
            await store.aclose()
            keys = [k async for k in admin.scan_iter(match=f"{prefix}:*")]
            if keys:
                await admin.unlink(*keys)
            await admin.aclose()


async def test_a_cancelled_acquire_does_not_leave_the_lease_held(tampering: Tampering) -> None:
    """The caller is cancelled after its EVALSHA left (queued behind a busy script): the
    script still runs and wins the lease, whose reply nobody read; the lease stayed held
    for its whole TTL (the Postgres store gives such a lease back)."""
    store, admin = tampering
    key = TenantKey("ns", "acme")
    busy = await _cancel_an_acquire_behind_a_busy_script(store, admin, key, "cancelled-caller")
    await busy
    await asyncio.sleep(0.3)
    holder = await admin.get(store._lease(key.digest))
    assert holder is None, f"the lease of a cancelled caller is held by {holder!r}"
    again = await store.acquire(key, "next", 30)
    assert again.lease is not None


async def test_a_tampered_claim_outcome_is_a_typed_error(tampering: Tampering) -> None:
    store, admin = tampering
    key = TenantKey("ns", "acme")
    claim = await store.claim_code(key, "h", "o", 30)
    assert await store.advance_code(claim, ClaimState.DONE, 30, "ok")
    await admin.hset(store._claim("ns", "h"), "outcome", b"\xff")
    with pytest.raises(StoreUnavailable):  # was a raw UnicodeDecodeError
        await store.claim_code(key, "h", "other", 30)


async def test_a_tampered_tenant_field_does_not_break_the_listing(tampering: Tampering) -> None:
    store, admin = tampering
    for tenant in ("acme", "broken"):
        await store.replace(TenantKey("ns", tenant), _update(b"j1:{}"))
    await admin.hset(store._rec(TenantKey("ns", "broken").digest), "tenant", b"\xff")
    assert [r.key.tenant for r in await store.tenants("ns")] == ["acme"]  # was UnicodeDecodeError


async def test_a_tampered_hold_instant_is_a_typed_error(tampering: Tampering) -> None:
    """Lua's tonumber reads "0x10" (16), Python's float() does not: a raw ValueError."""
    store, admin = tampering
    await admin.hset(store._throttle("ns"), "not_before", "0x10")
    with pytest.raises(StoreUnavailable):
        await store.hold("ns", 0)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:S3cretPw/tail@127.0.0.1:6379/0",
        "redis://user:S3cretPw#tail@127.0.0.1:6379/0",
        "redis+cluster://:S3cretPw/tail@127.0.0.1:7000",
    ],
)
def test_a_password_with_a_reserved_character_is_quoted_nowhere(url: str) -> None:
    """redis-py reads a password's piece after ``/`` or ``#`` as the port, and said so."""
    with pytest.raises(ConfigurationError) as caught:
        RedisStore.from_url(url)
    assert "S3cret" not in str(caught.value), str(caught.value)


@pytest.mark.parametrize("url", ["redis+cluster://127.0.0.1:7000/1", "redis+cluster:///0"])
def test_a_bad_cluster_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):  # was a raw RedisClusterException
        RedisStore.from_url(url)


async def _cancel_an_acquire_behind_a_busy_script(
    store: RedisStore, admin: Any, key: TenantKey, owner: str
) -> asyncio.Task[Any]:
    """Send ``owner``'s acquisition while Redis (on a Cluster, the node holding the
    tenant's slot) runs a 0.5 s script, then cancel its caller: the script runs and wins
    the lease after the caller is gone. Returns the busy script."""
    await store.replace(key, _update(b"x"))
    warm = await store.acquire(key, "warm", 30)  # load the scripts
    assert warm.lease is not None
    await store.release(warm.lease)
    busy = asyncio.create_task(admin.eval(BUSY, 1, store._rec(key.digest)))
    await asyncio.sleep(0.1)
    task = asyncio.create_task(store.acquire(key, owner, 60))
    await asyncio.sleep(0.1)  # sent, waiting inside Redis
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return busy


async def test_a_cancelled_acquire_on_a_cluster_does_not_leave_the_lease_held(
    cluster: RedisClusterServers,
) -> None:
    """On a Cluster (no auto-pipelining) the caller's cancellation cancelled the script
    call itself, after it left: the script still ran and won the lease, which nobody gave
    back, and the tenant waited out the whole TTL."""
    from redis.asyncio.cluster import RedisCluster

    store = RedisStore.from_url(_url(cluster.url, unique_prefix()))
    admin = RedisCluster.from_url(cluster.url.replace("redis+cluster://", "redis://"))
    key = TenantKey("ns", "acme")
    try:
        busy = await _cancel_an_acquire_behind_a_busy_script(store, admin, key, "cancelled-caller")
        await busy
        for _ in range(30):
            holder = await admin.get(store._lease(key.digest))
            if holder is None:
                break
            await asyncio.sleep(0.1)
        assert holder is None, f"the lease of a cancelled caller is held by {holder!r}"
        assert (await store.acquire(key, "next", 30)).lease is not None
    finally:
        await admin.aclose()
        await store.aclose()


async def test_a_lease_won_for_a_caller_cancelled_at_shutdown_is_given_back(tampering: Tampering) -> None:
    """``aclose`` waited for the give-back, but had set ``_closed`` first: the give-back's
    release raised "closed" and the lease stayed held for its whole TTL."""
    store, admin = tampering
    key = TenantKey("ns", "acme")
    busy = await _cancel_an_acquire_behind_a_busy_script(store, admin, key, "cancelled-at-shutdown")
    await store.aclose()  # the reply comes while it waits
    await busy
    assert await admin.get(store._lease(key.digest)) is None


async def test_a_resent_acquire_by_the_same_owner_keeps_its_lease(tampering: Tampering) -> None:
    """A replay by the owner of a live lease returns it (the contract): the give-back of
    the cancelled first send released the lease the resend holds."""
    store, admin = tampering
    key = TenantKey("ns", "acme")
    busy = await _cancel_an_acquire_behind_a_busy_script(store, admin, key, "owner-1")
    again = await store.acquire(key, "owner-1", 60)  # the resend
    await busy
    assert again.lease is not None
    await asyncio.sleep(0.3)
    assert await admin.get(store._lease(key.digest)) == b"owner-1"
    assert await store.extend(again.lease, 60)


# -- found by a reviewer: announcements lost around the first subscription ----------------


async def _until(predicate: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_first_subscription_slower_than_the_gate_tells_of_what_it_missed(
    make_sim: SimFactory, redis_url: str, prefix: str
) -> None:
    """The first SUBSCRIBE takes longer than the first-try gate (2 s; a loaded server, a
    slow link) but less than the confirmation's 5 s: the first watch gives up waiting,
    reads the tenant and the manager caches it. Another worker forgets the tenant before
    the subscription is in effect, so its announcement never arrives here. When the
    subscription then succeeds, it is the first (``connections == 1``, no failure), so
    ``PushListener._connected`` does not ``notify_all``: nothing tells this manager that
    announcements were missed, and it keeps serving the forgotten tenant's token (for its
    whole lifetime, an hour here) instead of ``TenantNotConnected``."""
    from factorial_tokens import TenantNotConnected

    from ..tcp_proxy import TcpProxy

    host_port = redis_url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = host_port.partition(":")
    async with (
        make_sim(access_token_ttl=3600) as sim,
        TcpProxy(host or "127.0.0.1", int(port or 6379)) as proxy,
    ):
        direct = RedisStore.from_url(_url(redis_url, prefix))
        slow = RedisStore.from_url(_url(f"redis://127.0.0.1:{proxy.port}/0", prefix))
        try:
            async with TokenManager(app_for(sim), direct, lease_ttl=6.0, provider_timeout=2.0) as other:
                token = await connect(other, sim)
                proxy.hold(b"SUBSCRIBE")  # the worker's first subscription is slow
                async with TokenManager(app_for(sim), slow, lease_ttl=6.0, provider_timeout=2.0) as worker:
                    assert await worker.access_token("acme") == token  # after the gate: cached
                    assert not slow._listener.listening
                    await other.forget("acme")  # announced before the subscription is in effect
                    proxy.release()
                    await _until(lambda: slow._listener.listening)
                    # Everything announced since the subscription reaches the worker: a marker.
                    marker = TenantKey("marker", "m")
                    seen = asyncio.Event()
                    stop = slow.on_change(lambda digest: digest == marker.digest and seen.set())
                    await direct.replace(marker, _update(b"m"))
                    await asyncio.wait_for(seen.wait(), 10)
                    stop()
                    with pytest.raises(TenantNotConnected):
                        served = await worker.access_token("acme")
                        pytest.fail(
                            f"served the forgotten tenant's token (same as before: {served == token})"
                        )
        finally:
            await slow.aclose()
            await direct.aclose()


async def test_a_failing_change_listener_neither_drops_the_subscription_nor_starves_the_others(
    redis_url: str, prefix: str
) -> None:
    """An ``on_change`` callback that raises (an application's own, registered on the shared
    store before the manager's) breaks ``Notifier.notify``'s loop: the listeners after it,
    the manager's cache eviction among them, never hear the announcement, and the exception
    leaves ``PushListener.deliver`` inside ``listen``, so the Redis subscription is torn
    down. Worse, the resubscription's ``connected()`` calls ``notify_all()``, where the same
    listener raises again: every resubscription fails after it was counted as up, so the
    backoff restarts at 0.05 s each time, a SUBSCRIBE loop at ~17 a second for ever, and no
    announcement is delivered again (seen: 51 "subscription lost" in 3 s). The SQLite
    store's poller contains such a failure ("a listener's bug must not stop the wake-ups of
    everyone else"); the push stores do not."""
    store = RedisStore.from_url(_url(redis_url, prefix))
    other = RedisStore.from_url(_url(redis_url, prefix))
    key = TenantKey("ns", "acme")
    heard: list[str | None] = []
    got = asyncio.Event()

    def failing(digest: str | None) -> None:
        raise RuntimeError("an application's listener bug")

    def recording(digest: str | None) -> None:
        heard.append(digest)
        if digest == key.digest:
            got.set()

    try:
        store.on_change(failing)
        store.on_change(recording)
        await _settled(store)
        await other.replace(key, _update(b"v1"))
        try:
            await asyncio.wait_for(got.wait(), 3)
        except TimeoutError:
            pytest.fail(f"the listener after a failing one never heard the change (heard {heard})")
        await asyncio.sleep(0.3)  # a resubscription would follow at once
        assert store._listener.connections == 1, "the subscription was torn down by a listener's error"
    finally:
        await store.aclose()
        await other.aclose()


async def test_a_silently_dead_subscription_is_found_and_remade(redis_url: str, prefix: str) -> None:
    """The subscribed connection's flow is dropped by something in between (a NAT or load
    balancer idle timeout: no FIN, no RST). The listener reads it with ``timeout=math.inf``
    and sends nothing (no PING, no keepalive; redis-py's ``health_check_interval`` is bypassed
    by reading the connection directly), so it never notices: announcements stop for good,
    no ``notify_all`` comes, and every manager on the store keeps serving cached tokens that
    other workers forgot, revoked or replaced. (The Postgres listener sends ``SELECT 1``
    every 5 s for exactly this.) Here: nothing within 12 s."""
    from ..tcp_proxy import TcpProxy

    host_port = redis_url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = host_port.partition(":")
    async with TcpProxy(host or "127.0.0.1", int(port or 6379)) as proxy:
        store = RedisStore.from_url(_url(f"redis://127.0.0.1:{proxy.port}/0", prefix))
        other = RedisStore.from_url(_url(redis_url, prefix))
        key = TenantKey("ns", "acme")
        told = asyncio.Event()
        store.on_change(lambda digest: digest in (None, key.digest) and told.set())
        try:
            await _settled(store)
            proxy.blackhole()  # the subscription (and the idle command connection) go silent
            await other.replace(key, _update(b"v1"))  # lost on the dead flow
            try:
                await asyncio.wait_for(told.wait(), 12)
            except TimeoutError:
                pytest.fail(
                    f"after 12 s the listener still trusts the dead subscription "
                    f"(listening={store._listener.listening}, connections={store._listener.connections})"
                )
        finally:
            await store.aclose()
            await other.aclose()


async def test_a_cluster_store_is_used_no_more_after_aclose(cluster: RedisClusterServers) -> None:
    """On a Cluster an acquisition runs in ``_outliving``'s task of its own, which nothing
    keeps: ``aclose`` waits only for the auto-pipelining drainers (none on a Cluster) and
    for give-backs already started, then closes the client and returns. The acquisition of
    a caller cancelled just before goes on after that on the closed client, and so does the
    give-back of the lease it wins: redis-py's cluster client initializes itself again and
    opens fresh connections to every node, which nobody closes (ResourceWarnings "Unclosed
    RedisCluster client", "unclosed Connection" when collected)."""
    from redis.asyncio.cluster import RedisCluster

    name = f"ft-{secrets.token_hex(4)}"
    store = RedisStore.from_url(_url(cluster.url, unique_prefix(), client_name=name))
    admin = RedisCluster.from_url(cluster.url.replace("redis+cluster://", "redis://"))
    key = TenantKey("ns", "acme")

    async def connections() -> int:
        lists = await admin.client_list(target_nodes=RedisCluster.ALL_NODES)
        clients = [c for node in lists.values() for c in node] if isinstance(lists, dict) else lists
        return sum(client.get("name") == name for client in clients)

    try:
        owner = "cancelled-at-shutdown"
        busy = await _cancel_an_acquire_behind_a_busy_script(store, admin, key, owner)
        await store.aclose()  # the reply comes after it returned
        await busy
        await asyncio.sleep(0.5)
        assert await admin.get(store._lease(key.digest)) is None
        left = await connections()
        assert left == 0, f"{left} connections of the closed store are open"
    finally:
        await admin.aclose()
        with contextlib.suppress(Exception):
            await store.client.aclose()  # what the store opened after its aclose


# -- found by a reviewer: the listener's PING goes through redis-py's health check ---------


async def test_a_quiet_subscription_survives_redis_pys_health_check(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With redis-py's ``health_check_interval`` shorter than ``_PING_AFTER`` (a URL option
    the store passes on; here 1 s, the listener's silence threshold cut to 1.5 s to keep the
    test short), the listener's ``connection.send_command("PING")`` runs with redis-py's
    default ``check_health=True``: ``Connection.check_health`` sends its own PING on the
    subscribed connection and expects ``PONG``, but a subscribed RESP2 connection answers
    ``[b"pong", b""]`` (or the next announcement, which it swallows): "Bad response from PING
    health check", the connection is dropped and the subscription torn down. Every quiet
    spell of the channel then costs a resubscription and a ``notify_all`` (every manager's
    whole cache dropped, every watcher woken) and announcements are lost meanwhile. (redis-py's
    own PubSub passes ``check_health=False`` once subscribed for exactly this reason.)"""
    from factorial_tokens_redis import _listener

    monkeypatch.setattr(_listener, "_PING_AFTER", 1.5)
    store = RedisStore.from_url(_url(redis_url, prefix, health_check_interval="1"))
    told: list[str | None] = []
    try:
        store.on_change(told.append)
        await _settled(store)
        await asyncio.sleep(5)  # quiet: about three PINGs
        assert store._listener.connections == 1 and None not in told, (
            f"a healthy quiet subscription was remade {store._listener.connections - 1} times "
            f"({told.count(None)} notify_all)"
        )
    finally:
        await store.aclose()


# -- found by a reviewer: aclose cancels an acquisition whose caller is still waiting -------


async def test_aclose_fails_a_live_callers_acquisition_with_store_unavailable_not_cancellation(
    throwaway: RedisServer,
) -> None:
    """An acquisition outside a pipeline (here the NOSCRIPT fallback after SCRIPT FLUSH; on a
    Cluster every acquisition) runs in ``_outliving``'s task. ``aclose`` waits 10 s for such
    tasks, then cancels them; the caller, who was never cancelled, is awaiting the task
    through ``asyncio.shield``, and a shielded task's cancellation cancels the shield: the
    caller gets ``CancelledError`` out of ``store.acquire``, not ``StoreUnavailable``. An
    uncancelled task that raises CancelledError is taken for cancelled by everything above
    it (a manager's flight and its waiters, a TaskGroup, a web server's request handling)."""
    from ..tcp_proxy import TcpProxy

    host, _, port = throwaway.url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2].partition(":")
    admin = aioredis.Redis.from_url(throwaway.url)
    async with TcpProxy(host or "127.0.0.1", int(port or 6379)) as proxy:
        # No socket timeout (redis-py's own default for a client built by hand): the reply is
        # awaited as long as the server takes.
        store = RedisStore.from_url(f"redis://127.0.0.1:{proxy.port}/0?socket_timeout=60")
        key = TenantKey("ns", "acme")
        try:
            await store.replace(key, _update(b"x"))
            await admin.script_flush()
            proxy.hold(b"LOAD")  # the fallback's SCRIPT LOAD waits in the network
            task = asyncio.create_task(store.acquire(key, "owner", 30))
            await asyncio.sleep(0.5)
            assert not task.done()
            await store.aclose()
            try:
                outcome: object = await task
            except BaseException as exc:
                outcome = exc
            assert isinstance(outcome, StoreUnavailable), (
                f"a caller nobody cancelled got {type(outcome).__name__} (task cancelled: {task.cancelled()})"
            )
        finally:
            proxy.release()
            await store.aclose()
            await admin.aclose()

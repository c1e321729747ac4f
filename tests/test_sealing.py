"""Token material sealed at rest: AES-GCM bound to the tenant, key files, rotation, rekey.

The codec and keyring are tested directly; the manager paths (cross-tenant copy, wrong or
missing key, rotation while workers run) against the strict simulator and real stores.
Per-store raw dumps (SQLite file bytes, Redis keys, Postgres rows) live at the bottom.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pickle
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from factorial_tokens import (
    ConfigurationError,
    EventKind,
    FactorialApp,
    Keyring,
    TokenEvent,
    TokenManager,
    TokenSealError,
    TokenSet,
)
from factorial_tokens.sealing import JsonCodec, SealedCodec, sealed_with
from factorial_tokens.store import Lease, MemoryStore, Record, Store, TenantKey, Update
from factorial_tokens.store.sqlite import SQLiteStore
from factorial_tokens.testing import CountingStore, FakeFactorial

from .conftest import CLIENT_ID, SimFactory, app_for
from .stores import BACKENDS, Backend, open_backend

BUDGETS = {"lease_ttl": 6.0, "provider_timeout": 2.0}
KEY = TenantKey(CLIENT_ID, "acme")
TOKENS = TokenSet(
    access_token="a" * 20 + "ACCESS-secret-0123456789",
    refresh_token="r" * 20 + "REFRESH-secret-0123456789",
    scope="read write",
    expires_at=2_000_000_000.0,
    obtained_at=1_900_000_000.0,
)


def secret_forms(*secrets: str | None) -> list[bytes]:
    """Every way a secret could sit in a dump: raw, base64 (both alphabets), hex, JSON-escaped."""
    forms: list[bytes] = []
    for secret in secrets:
        if not secret:
            continue
        raw = secret.encode()
        forms += [
            raw,
            base64.b64encode(raw).rstrip(b"="),
            base64.urlsafe_b64encode(raw).rstrip(b"="),
            raw.hex().encode(),
            raw.hex().upper().encode(),
            secret.encode("utf-16-le"),
        ]
    return forms


def leaked(blob: bytes, *secrets: str | None) -> list[bytes]:
    """The forms of ``secrets`` found in ``blob`` (empty when nothing leaked)."""
    return [form for form in secret_forms(*secrets) if form in blob]


# -- the codec ---------------------------------------------------------------------------


def test_sealed_payload_round_trips_and_holds_no_token() -> None:
    ring = Keyring.generate("k1")
    codec = SealedCodec(ring)
    one, two = codec.encode(KEY, TOKENS), codec.encode(KEY, TOKENS)
    assert one.startswith(b"s1:k1:") and two.startswith(b"s1:k1:")
    assert one != two  # a fresh nonce per write
    assert one.isascii()
    assert codec.decode(KEY, one) == TOKENS == codec.decode(KEY, two)
    assert sealed_with(one) == "k1"
    assert leaked(one, TOKENS.access_token, TOKENS.refresh_token, TOKENS.scope) == []
    # The control: the plain codec does hold the tokens, so the search above can fail.
    plain = JsonCodec().encode(KEY, TOKENS)
    assert leaked(plain, TOKENS.access_token, TOKENS.refresh_token)


@pytest.mark.parametrize(
    "other",
    [
        TenantKey(CLIENT_ID, "evil"),  # another tenant of the same app
        TenantKey("another-app", "acme"),  # the same tenant id in another app
        TenantKey(CLIENT_ID, "acme "),  # a near-miss tenant id
        TenantKey(CLIENT_ID + "\x00", "acme"),  # length-prefixed AAD: no boundary tricks
    ],
)
def test_a_payload_opens_only_for_its_tenant(other: TenantKey) -> None:
    codec = SealedCodec(Keyring.generate("k1"))
    payload = codec.encode(KEY, TOKENS)
    with pytest.raises(TokenSealError, match="another tenant") as info:
        codec.decode(other, payload)
    assert TOKENS.access_token not in str(info.value)


def test_tampering_and_relabelling_are_refused() -> None:
    key = os.urandom(32)
    ring = Keyring([("k1", key), ("k2", key)])  # one key under two ids: the id is authenticated
    codec = SealedCodec(ring)
    payload = codec.encode(KEY, TOKENS)
    assert payload.startswith(b"s1:k2:")
    with pytest.raises(TokenSealError, match="failed authentication"):
        codec.decode(KEY, payload.replace(b"s1:k2:", b"s1:k1:"))
    body = bytearray(payload)
    body[-5] = ord("A") if body[-5] != ord("A") else ord("B")
    with pytest.raises(TokenSealError):
        codec.decode(KEY, bytes(body))
    for broken in (payload[:20], b"s1:k2:", b"s1:", b"s1:k2:!!!!", b"x9:whatever", b"s1:bad id:AAAA"):
        with pytest.raises(TokenSealError):
            codec.decode(KEY, broken)


def test_plain_records_are_refused_unless_plaintext_is_allowed() -> None:
    plain = JsonCodec().encode(KEY, TOKENS)
    ring = Keyring.generate("k1")
    with pytest.raises(TokenSealError, match="not sealed"):
        SealedCodec(ring).decode(KEY, plain)
    assert SealedCodec(ring, allow_plaintext=True).decode(KEY, plain) == TOKENS
    sealed = SealedCodec(ring).encode(KEY, TOKENS)
    assert SealedCodec(ring).decode(KEY, sealed) == TOKENS
    with pytest.raises(TokenSealError, match="configure the keyring"):
        JsonCodec().decode(KEY, sealed)


def test_unknown_key_id_is_named_and_key_material_never_shown() -> None:
    old, new = Keyring.generate("old"), Keyring.generate("new")
    payload = SealedCodec(old).encode(KEY, TOKENS)
    with pytest.raises(TokenSealError) as info:
        SealedCodec(new).decode(KEY, payload)
    message = str(info.value)
    assert "'old'" in message and "known: new" in message
    for ring in (old, new):
        for material in _material(ring):
            assert material not in message


def _material(ring: Keyring) -> list[str]:
    """Every key of ``ring`` in base64, urlsafe base64 and hex, for leak searches."""
    out = []
    for line in ring.export().splitlines():
        encoded = line.partition(":")[2]
        raw = base64.b64decode(encoded)
        out += [encoded, base64.urlsafe_b64encode(raw).decode(), raw.hex()]
    return out


# -- the keyring -------------------------------------------------------------------------


def test_keyring_text_format_newest_last() -> None:
    k1, k2, k3 = (base64.b64encode(os.urandom(32)).decode() for _ in range(3))
    ring = Keyring.parse(f" k1:{k1} , k2:{k2}\n# a comment\n\nk3:{k3}\n")
    assert ring.kids == ("k1", "k2", "k3") and ring.newest == "k3"
    assert Keyring.parse(ring.export()).export() == ring.export()
    assert "k2" in ring and "k4" not in ring and len(ring) == 3
    assert ring.without("k3").newest == "k2"
    rotated = ring.rotated("k4")
    assert rotated.kids == ("k1", "k2", "k3", "k4")
    assert Keyring.generate().newest != Keyring.generate().newest


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "no key found"),
        ("just-a-key-without-id", "entry 1 is not"),
        ("k1:" + base64.b64encode(b"S" * 31).decode(), "31 bytes"),
        ("k1:not*base64*SECRETSECRET", "not valid base64"),
        ("bad id:" + base64.b64encode(b"S" * 32).decode(), "entry 1 is not"),
    ],
)
def test_malformed_keyrings_give_a_clear_error_without_the_key(text: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        Keyring.parse(text, source="FACTORIAL_TOKENS_KEYS")
    message = str(info.value)
    assert "SECRET" not in message and "UydT" not in message  # UydT...: base64 of b"S"*n
    assert text.partition(":")[2] not in message or not text.partition(":")[2]


def test_keyring_constructor_validates() -> None:
    with pytest.raises(ConfigurationError, match="at least one"):
        Keyring([])
    with pytest.raises(ConfigurationError, match="twice"):
        Keyring([("k", os.urandom(32)), ("k", os.urandom(32))])
    with pytest.raises(ConfigurationError, match="32 bytes"):
        Keyring({"k": b"short"})
    with pytest.raises(ConfigurationError, match="key id"):
        Keyring({"k:1": os.urandom(32)})
    with pytest.raises(ConfigurationError, match="no key 'zz'"):
        Keyring.generate("k").without("zz")
    with pytest.raises(ConfigurationError):
        Keyring.generate("k").without("k")  # nothing would remain


def test_keyring_repr_and_pickle_hide_the_keys() -> None:
    ring = Keyring.generate("k1").rotated("k2")
    assert repr(ring) == "Keyring(kids=('k1', 'k2'), newest='k2')"
    assert (
        repr(SealedCodec(ring))
        == "SealedCodec(Keyring(kids=('k1', 'k2'), newest='k2'), allow_plaintext=False)"
    )
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(ring)


def test_keyring_from_env() -> None:
    ring = Keyring.generate("k1").rotated("k2")
    text = ring.export().replace("\n", ",")
    assert Keyring.from_env(environ={}) is None
    assert Keyring.from_env(environ={"FACTORIAL_TOKENS_KEYS": "  "}) is None
    loaded = Keyring.from_env(environ={"FACTORIAL_TOKENS_KEYS": text})
    assert loaded is not None and loaded.kids == ("k1", "k2") and loaded.export() == ring.export()
    with pytest.raises(ConfigurationError, match="FACTORIAL_TOKENS_KEYS: entry 1"):
        Keyring.from_env(environ={"FACTORIAL_TOKENS_KEYS": "garbage"})


# -- key files ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o666, 0o700 | 0o004])
def test_a_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keys"
    Keyring.generate().save(path)
    path.chmod(mode)
    with pytest.raises(ConfigurationError, match="chmod 600") as info:
        Keyring.from_file(path)
    for material in _material(Keyring.parse(path.read_text())):
        assert material not in str(info.value)


def test_key_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        Keyring.from_file(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_bytes(b"k1:\xff\xfe")
    bad.chmod(0o600)
    with pytest.raises(ConfigurationError, match="not a text key file"):
        Keyring.from_file(bad)


def test_save_writes_0600_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    ring = Keyring.generate("k1")
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rotated = Keyring.from_file(path).rotated("k2")
    rotated.save(path)
    assert Keyring.from_file(path).kids == ("k1", "k2")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- the manager -------------------------------------------------------------------------


def test_keyring_and_codec_together_are_refused(sim: FakeFactorial) -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        TokenManager(app_for(sim), "memory://", keyring=Keyring.generate(), codec=JsonCodec())


async def test_the_environment_keyring_seals(sim: FakeFactorial, monkeypatch: pytest.MonkeyPatch) -> None:
    ring = Keyring.generate("envkey")
    monkeypatch.setenv("FACTORIAL_TOKENS_KEYS", ring.export().strip())
    store = MemoryStore()
    async with TokenManager(app_for(sim), store, **BUDGETS) as tm:
        tokens = await tm.exchange_code("acme", sim.issue_code(company_id=1))
    record = await store.read(KEY)
    assert record is not None and sealed_with(record.payload) == "envkey"
    assert leaked(record.payload, tokens.access_token, tokens.refresh_token) == []
    monkeypatch.delenv("FACTORIAL_TOKENS_KEYS")
    async with TokenManager(app_for(sim), store, **BUDGETS) as without:
        with pytest.raises(TokenSealError, match="configure the keyring"):
            await without.access_token("acme")
    async with TokenManager(app_for(sim), store, keyring=ring, **BUDGETS) as tm:
        assert await tm.access_token("acme") == tokens.access_token


# -- on every store ----------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with open_backend(request.param, tmp_path) as opened:
        yield opened


@pytest.fixture(params=[name for name in BACKENDS if name != "memory"])
async def raw(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """A store whose backend can be dumped byte for byte (not the memory store)."""
    async with open_backend(request.param, tmp_path) as opened:
        assert opened.dump is not None
        yield opened


async def connect(tm: TokenManager, sim: FakeFactorial, tenant: str, company_id: int) -> TokenSet:
    return await tm.exchange_code(tenant, sim.issue_code(company_id=company_id))


async def test_the_raw_store_holds_no_token(raw: Backend, sim: FakeFactorial) -> None:
    backend = raw
    assert backend.dump is not None
    ring = Keyring.generate("k1")
    seen: list[TokenSet] = []
    async with TokenManager(app_for(sim), backend.store, keyring=ring, **BUDGETS) as tm:
        for number, tenant in enumerate(["acme", "globex", "initech"], 1):
            seen.append(await connect(tm, sim, tenant, number))
        seen.append(await tm.refresh("acme"))
        seen.append(await tm.refresh("acme"))
        assert len(await tm.tenants()) == 3
    secrets = [s for tokens in seen for s in (tokens.access_token, tokens.refresh_token)]
    assert len(set(secrets)) == 10
    blob = await backend.dump()
    assert blob, "the dump is empty: it cannot prove anything"
    assert leaked(blob, *secrets) == []
    assert b"s1:k1:" in blob  # the sealed payloads are there, just not readable


async def test_the_raw_store_holds_tokens_without_a_keyring(raw: Backend, sim: FakeFactorial) -> None:
    """The control for the test above: the same dump and search do find plain tokens."""
    backend = raw
    assert backend.dump is not None
    async with TokenManager(app_for(sim), backend.store, **BUDGETS) as tm:
        tokens = await connect(tm, sim, "acme", 1)
    assert leaked(await backend.dump(), tokens.access_token, tokens.refresh_token)


async def test_a_payload_copied_to_another_tenant_is_refused(backend: Backend, sim: FakeFactorial) -> None:
    ring = Keyring.generate("k1")
    events: list[TokenEvent] = []
    store = backend.store
    async with TokenManager(app_for(sim), store, keyring=ring, on_event=events.append, **BUDGETS) as tm:
        victim = await connect(tm, sim, "victim", 1)
        await connect(tm, sim, "attacker", 2)
        source = await store.read(TenantKey(CLIENT_ID, "victim"))
        target = await store.read(TenantKey(CLIENT_ID, "attacker"))
        assert source is not None and target is not None
        # An attacker with write access copies the victim's sealed bytes into their own record.
        copied = Update(source.payload, target.status, target.expires_at, target.updated_at)
        await store.replace(TenantKey(CLIENT_ID, "attacker"), copied)
        requests = sim.stats.token_requests
        for call in (tm.access_token, tm.token_set, tm.tokens, tm.refresh, tm.revoke):
            with pytest.raises(TokenSealError, match="another tenant") as info:
                await call("attacker")
            assert victim.access_token not in str(info.value)
        assert sim.stats.token_requests == requests and sim.stats.revocations == 0
        assert await tm.flush_events()  # listeners run on a background thread
        seals = [e for e in events if e.kind is EventKind.SEAL_ERROR]
        assert len(seals) == 5 and {e.tenant for e in seals} == {"attacker"}
        assert all(victim.access_token not in e.detail for e in seals)
        # Nothing was overwritten or forgotten: the copied bytes sit where they were put.
        after = await store.read(TenantKey(CLIENT_ID, "attacker"))
        assert after is not None and after.payload == source.payload
        assert await tm.access_token("victim") == victim.access_token
    # The same bytes under the same tenant id in another app (namespace) are refused too.
    other_app = FactorialApp(
        client_id="other-app", client_secret="s", redirect_uri="http://127.0.0.1/cb", base_url=sim.base_url
    )
    await store.replace(TenantKey("other-app", "victim"), copied)
    async with TokenManager(other_app, store, keyring=ring, **BUDGETS) as foreign:
        with pytest.raises(TokenSealError):
            await foreign.access_token("victim")


async def test_a_wrong_or_missing_key_loses_nothing(backend: Backend, make_sim: SimFactory) -> None:
    right = Keyring.generate("k1")
    same_id_other_bytes = Keyring.generate("k1")
    unknown_id = Keyring.generate("k2")
    store = backend.store
    async with make_sim(access_token_ttl=1) as sim:
        async with TokenManager(app_for(sim), store, keyring=right, **BUDGETS) as tm:
            tokens = await connect(tm, sim, "acme", 1)
        before = await store.read(KEY)
        assert before is not None
        await asyncio.sleep(1.1)  # expired: a manager that could read it would refresh now
        wrong: list[tuple[Keyring | None, str]] = [
            (same_id_other_bytes, "failed authentication under key 'k1'"),
            (unknown_id, "sealed with key 'k1', which is not in the keyring"),
            (None, "configure the keyring"),
        ]
        for ring, message in wrong:
            events: list[TokenEvent] = []
            async with TokenManager(
                app_for(sim), store, keyring=ring, on_event=events.append, **BUDGETS
            ) as other:
                for call in (other.access_token, other.refresh, other.revoke):
                    with pytest.raises(TokenSealError, match=message) as info:
                        await call("acme")
                    for material in _material(right):
                        assert material not in str(info.value)
                assert await other.flush_events()  # listeners run on a background thread
                assert [e.kind for e in events] == [EventKind.SEAL_ERROR] * 3
                assert [i.tenant for i in await other.tenants()] == ["acme"]  # metadata stays listable
        assert sim.stats.token_requests == 1 and sim.stats.revocations == 0  # just the exchange
        after = await store.read(KEY)
        assert after == before  # same bytes, same version: nothing lost, nothing rewritten
        sim.access_token_ttl = 3600  # the refreshed token is not due again before the count
        async with TokenManager(app_for(sim), store, keyring=right, **BUDGETS) as tm:
            assert (await tm.tokens("acme")).refresh_token == tokens.refresh_token
            fresh = await tm.access_token("acme")  # the right key: refreshed as usual
        assert fresh != tokens.access_token and sim.is_active(fresh)
        assert sim.stats.refreshes == 1 and sim.stats.invalid_grant == 0


async def test_rotation_rekey_then_drop_the_old_key(backend: Backend, sim: FakeFactorial) -> None:
    store = backend.store
    old = Keyring.generate("k1")
    both = old.rotated("k2")
    new_only = both.without("k1")
    async with TokenManager(app_for(sim), store, **BUDGETS) as plain:
        legacy = await connect(plain, sim, "legacy", 9)  # written before sealing was on
    async with TokenManager(app_for(sim), store, keyring=old, **BUDGETS) as tm:
        tokens = {t: await connect(tm, sim, t, n) for n, t in enumerate(["a", "b", "c"], 1)}
    tokens["legacy"] = legacy

    async def kids() -> dict[str, str | None]:
        return {r.key.tenant: sealed_with(r.payload) for r in await store.tenants(CLIENT_ID)}

    assert await kids() == {"legacy": None, "a": "k1", "b": "k1", "c": "k1"}
    async with TokenManager(app_for(sim), store, keyring=new_only, **BUDGETS) as early:
        with pytest.raises(TokenSealError, match="'k1'"):
            await early.access_token("a")  # dropping k1 before rekey would lock tenants out
    async with TokenManager(app_for(sim), store, keyring=both, **BUDGETS) as strict:
        with pytest.raises(TokenSealError, match="not sealed"):
            await strict.access_token("legacy")  # a plain record: only during a migration
    async with TokenManager(app_for(sim), store, keyring=both, allow_plaintext=True, **BUDGETS) as tm:
        for tenant, issued in tokens.items():
            assert await tm.access_token(tenant) == issued.access_token  # old keys open
        tokens["d"] = await connect(tm, sim, "d", 4)  # new writes seal with the newest
        assert (await kids())["d"] == "k2"
        versions = {r.key.tenant: r.version for r in await store.tenants(CLIENT_ID)}
        assert await tm.rekey(both) == 4  # legacy, a, b, c; d is already current
        assert await kids() == dict.fromkeys(["legacy", "a", "b", "c", "d"], "k2")
        after = {r.key.tenant: r.version for r in await store.tenants(CLIENT_ID)}
        assert after == {t: v + (t != "d") for t, v in versions.items()}
        assert await tm.rekey(both) == 0  # idempotent
    async with TokenManager(app_for(sim), store, keyring=new_only, **BUDGETS) as tm:
        for tenant, issued in tokens.items():
            assert await tm.access_token(tenant) == issued.access_token
        infos = await tm.tenants()
        assert all(i.expires_at == tokens[i.tenant].expires_at for i in infos)  # metadata kept
    assert sim.stats.refreshes == 0


async def test_rekey_waits_for_a_busy_tenant_and_keeps_its_refresh(
    backend: Backend, sim: FakeFactorial
) -> None:
    store = backend.store
    old = Keyring.generate("k1")
    both = old.rotated("k2")
    async with TokenManager(app_for(sim), store, keyring=old, **BUDGETS) as tm:
        await connect(tm, sim, "busy", 1)
        await connect(tm, sim, "idle", 2)
    async with TokenManager(app_for(sim), store, keyring=both, **BUDGETS) as worker:
        busy = TenantKey(CLIENT_ID, "busy")
        held = await store.acquire(busy, "a-worker-mid-refresh", 120.0)
        assert held.lease is not None and held.record is not None
        job = asyncio.create_task(worker.rekey(both))
        idle = TenantKey(CLIENT_ID, "idle")
        for _ in range(400):  # the idle tenant is re-sealed first, while "busy" is held
            record = await store.read(idle)
            if record is not None and sealed_with(record.payload) == "k2":
                break
            await asyncio.sleep(0.05)
        assert record is not None and sealed_with(record.payload) == "k2"
        assert not job.done()  # waiting for the lease, not writing around it
        assert sealed_with((await store.read(busy)).payload) == "k1"  # type: ignore[union-attr]
        # The holder finishes its refresh: a fenced commit of tokens sealed under the OLD key.
        refreshed = TokenSet(access_token="refreshed-access-" + "x" * 40, refresh_token="refreshed-refresh")
        written = await store.commit(held.lease, Update(SealedCodec(old).encode(busy, refreshed)))
        assert written is not None
        assert await asyncio.wait_for(job, 10) == 2
        record = await store.read(busy)
        assert record is not None and sealed_with(record.payload) == "k2"
        assert record.version == written.version + 1
        assert SealedCodec(both).decode(busy, record.payload) == refreshed  # the refresh survived
        assert await worker.access_token("busy") == refreshed.access_token


class _ExchangeLandsFirst(CountingStore):
    """A real store where a code exchange (``replace``) lands just before rekey's first commit."""

    def __init__(self, inner: Store, update: Update) -> None:
        super().__init__(inner)
        self.update: Update | None = update

    async def commit(self, lease: Lease, update: Update) -> Record | None:
        if self.update is not None:
            await self.inner.replace(lease.key, self.update)
            self.update = None
        return await super().commit(lease, update)


async def test_rekey_fenced_out_by_a_new_exchange_keeps_it(backend: Backend, sim: FakeFactorial) -> None:
    old = Keyring.generate("k1")
    both = old.rotated("k2")
    async with TokenManager(app_for(sim), backend.store, keyring=old, **BUDGETS) as tm:
        await connect(tm, sim, "acme", 1)
    newer = TokenSet(access_token="exchanged-" + "n" * 40, refresh_token="exchanged-refresh")
    store = _ExchangeLandsFirst(backend.store, Update(SealedCodec(old).encode(KEY, newer)))
    async with TokenManager(app_for(sim), store, keyring=both, **BUDGETS) as tm:
        assert await tm.rekey(both) == 1
    assert store.calls["commit"] == 2 and store.calls["acquire"] == 2  # fenced out once, then again
    record = await backend.store.read(KEY)
    assert record is not None and sealed_with(record.payload) == "k2"
    assert SealedCodec(both).decode(KEY, record.payload) == newer  # the exchange was not overwritten


async def test_rekey_while_workers_refresh(backend: Backend, make_sim: SimFactory) -> None:
    store = backend.store
    old = Keyring.generate("k1")
    both = old.rotated("k2")
    tenants = [f"t{n}" for n in range(6)]
    async with make_sim(access_token_ttl=3600) as sim:
        async with (
            TokenManager(app_for(sim), store, keyring=old, **BUDGETS) as setup,
        ):
            for n, tenant in enumerate(tenants, 1):
                await connect(setup, sim, tenant, n)
        async with TokenManager(app_for(sim), store, keyring=both, **BUDGETS) as worker:
            stop = asyncio.Event()

            async def work() -> int:
                count = 0
                while not stop.is_set():
                    for tenant in tenants:
                        await worker.refresh(tenant)
                        count += 1
                return count

            workers = [asyncio.create_task(work()) for _ in range(2)]
            await asyncio.sleep(0.05)
            moved = await worker.rekey(both)
            stop.set()
            refreshes = sum(await asyncio.gather(*workers))
            assert 0 <= moved <= len(tenants)
            assert refreshes > 0
            kids = {sealed_with(r.payload) for r in await store.tenants(CLIENT_ID)}
            assert kids == {"k2"}
            assert sim.stats.invalid_grant == 0 and sim.stats.families_revoked == 0
            for tenant in tenants:  # every stored token is the live one: no refresh was lost
                assert sim.is_active(await worker.access_token(tenant))


async def test_rekey_leaves_what_it_cannot_open_intact(backend: Backend, sim: FakeFactorial) -> None:
    store = backend.store
    lost, current = Keyring.generate("gone"), Keyring.generate("k1")
    both = current.rotated("k2")
    async with TokenManager(app_for(sim), store, keyring=lost, **BUDGETS) as tm:
        await connect(tm, sim, "orphan", 1)
    async with TokenManager(app_for(sim), store, keyring=current, **BUDGETS) as tm:
        await connect(tm, sim, "fine", 2)
    orphan = await store.read(TenantKey(CLIENT_ID, "orphan"))
    async with TokenManager(app_for(sim), store, keyring=both, **BUDGETS) as tm:
        with pytest.raises(TokenSealError, match=r"1 records re-sealed, 1 could not be opened.*'orphan'"):
            await tm.rekey(both)
    assert await store.read(TenantKey(CLIENT_ID, "orphan")) == orphan
    assert sealed_with((await store.read(TenantKey(CLIENT_ID, "fine"))).payload) == "k2"  # type: ignore[union-attr]
    # The lease of the record it could not open was given back.
    taken = await store.acquire(TenantKey(CLIENT_ID, "orphan"), "next", 5.0)
    assert taken.lease is not None
    await store.release(taken.lease)


async def test_rekey_reports_a_record_labelled_with_the_newest_key_that_it_cannot_open(
    backend: Backend, sim: FakeFactorial
) -> None:
    """Records labelled with the newest key's id were taken as done without being opened:
    a damaged one (or one sealed under another key of the same id) passed as rotated, and
    rekey reported success; the operator then retires the old key with a record no worker
    can open."""
    store = backend.store
    ring = Keyring.generate("k1").rotated("k2")
    async with TokenManager(app_for(sim), store, keyring=ring, **BUDGETS) as tm:
        await connect(tm, sim, "fine", 1)
        await connect(tm, sim, "damaged", 2)
    key = TenantKey(CLIENT_ID, "damaged")
    record = await store.read(key)
    assert record is not None and sealed_with(record.payload) == "k2"
    garbled = record.payload[:-8] + bytes(8)
    await store.replace(key, Update(garbled, record.status, record.expires_at, record.updated_at))
    async with TokenManager(app_for(sim), store, keyring=ring, **BUDGETS) as tm:
        with pytest.raises(TokenSealError, match=r"0 records re-sealed, 1 could not be opened.*'damaged'"):
            await tm.rekey(ring)


# -- the CLI -------------------------------------------------------------------------------


def test_cli_keys_only_where_told_keygen_and_rekey(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from factorial_tokens.cli._commands import main

    from .conftest import CLIENT_SECRET, REDIRECT_URI

    monkeypatch.delenv("FACTORIAL_TOKENS_KEYS", raising=False)
    db = tmp_path / "tokens.db"
    keys = tmp_path / "tokens.keys"
    with FakeFactorial(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT_URI
    ).serve_in_thread() as sim:
        runner = CliRunner(
            env={
                "FACTORIAL_CLIENT_ID": CLIENT_ID,
                "FACTORIAL_CLIENT_SECRET": CLIENT_SECRET,
                "FACTORIAL_REDIRECT_URI": REDIRECT_URI,
                "FACTORIAL_BASE_URL": sim.base_url,
                "FACTORIAL_TOKENS_STORE": f"sqlite:///{db}",
            }
        )
        assert runner.invoke(main, ["status"]).exit_code == 0
        assert sorted(p.name for p in tmp_path.iterdir() if "keys" in p.name) == []  # no key made

        async def connect() -> list[TokenSet]:
            async with TokenManager(app_for(sim), f"sqlite:///{db}", **BUDGETS) as tm:
                return [await connect_one(tm, t, n) for n, t in enumerate(["acme", "globex"], 1)]

        async def connect_one(tm: TokenManager, tenant: str, n: int) -> TokenSet:
            return await tm.exchange_code(tenant, sim.issue_code(company_id=n))

        async def read(tenant: str, keyring: Keyring | None = None) -> TokenSet:
            async with TokenManager(app_for(sim), f"sqlite:///{db}", keyring=keyring, **BUDGETS) as tm:
                return await tm.tokens(tenant)

        issued = asyncio.run(connect())
        # The library and the CLI read the store the same way: a CLI refresh does not lock
        # the application (no keyring) out of the tenant.
        refreshed = runner.invoke(main, ["refresh", "acme"])
        assert refreshed.exit_code == 0, refreshed.output
        assert asyncio.run(read("acme")).access_token != issued[0].access_token
        assert not any("keys" in p.name for p in tmp_path.iterdir())

        made = runner.invoke(main, ["keygen", "--keys-file", str(keys)])
        assert made.exit_code == 0 and "written to" in made.stdout
        assert stat.S_IMODE(keys.stat().st_mode) == 0o600
        first = Keyring.from_file(keys)
        assert len(first) == 1 and first.newest in made.stdout
        for material in _material(first):
            assert material not in made.stdout
        with pytest.raises(TokenSealError, match="not sealed"):
            asyncio.run(read("globex", first))  # a keyring refuses the plain records...
        refused = runner.invoke(main, ["rekey", "--keys-file", str(keys)])  # a rotation seals none...
        assert refused.exit_code == 6 and "2 could not be opened" in refused.output, refused.output
        moved = runner.invoke(
            main, ["rekey", "--keys-file", str(keys), "--allow-plaintext"]
        )  # ...a migration
        assert moved.exit_code == 0, moved.output
        assert moved.stdout == f"re-sealed 2 tenant records under key {first.newest!r}\n"
        assert asyncio.run(read("globex", first)).access_token == issued[1].access_token
        assert leaked(db.read_bytes(), issued[1].access_token, issued[1].refresh_token) == []

        rotated = runner.invoke(main, ["keygen", "--keys-file", str(keys), "--id", "k-new"])
        assert rotated.exit_code == 0 and "2 keys" in rotated.stdout
        assert Keyring.from_file(keys).kids == (first.newest, "k-new")
        assert stat.S_IMODE(keys.stat().st_mode) == 0o600
        moved = runner.invoke(main, ["rekey", "--keys-file", str(keys)])
        assert moved.stdout == "re-sealed 2 tenant records under key 'k-new'\n"

        async def kids() -> set[str | None]:
            store = SQLiteStore(db)
            try:
                return {sealed_with(r.payload) for r in await store.tenants(CLIENT_ID)}
            finally:
                await store.aclose()

        assert asyncio.run(kids()) == {"k-new"}
        again = runner.invoke(main, ["rekey", "--keys-file", str(keys)])
        assert again.stdout == "re-sealed 0 tenant records under key 'k-new'\n"
        token = runner.invoke(main, ["token", "globex", "--keys-file", str(keys)])
        assert token.exit_code == 0 and token.stdout.strip() == issued[1].access_token
        sealed = runner.invoke(main, ["token", "globex"])  # no keys given: refused, not served
        assert sealed.exit_code == 6 and sealed.stdout == ""

        keys.chmod(0o644)
        refused = runner.invoke(main, ["token", "globex", "--keys-file", str(keys)])
        assert refused.exit_code == 2 and "chmod 600" in refused.stderr and refused.stdout == ""
        keys.chmod(0o600)
        printed = runner.invoke(main, ["keygen", "--id", "k-env"])
        assert (
            printed.exit_code == 0 and printed.stdout.startswith("k-env:") and printed.stdout.count("\n") == 1
        )
        newest = Keyring.from_file(keys).without(first.newest).export().strip()
        from_env = runner.invoke(main, ["token", "globex"], env={"FACTORIAL_TOKENS_KEYS": newest})
        assert from_env.exit_code == 0  # the env keyring (k-new alone) opens what rekey moved
        stale = runner.invoke(
            main, ["token", "globex"], env={"FACTORIAL_TOKENS_KEYS": first.export().strip()}
        )
        assert stale.exit_code == 6 and "'k-new'" in stale.stderr and stale.stdout == ""
        empty = runner.invoke(main, ["rekey", "--keys-file", str(tmp_path / "none")])
        assert empty.exit_code == 2 and "does not exist" in empty.stderr
        nokeys = runner.invoke(main, ["rekey"])
        assert nokeys.exit_code == 2 and "no keys" in nokeys.stderr


async def test_a_key_rotation_never_seals_a_planted_plain_record(tmp_path: Path, sim: FakeFactorial) -> None:
    """``rekey`` opened records with ``allow_plaintext=True`` whatever the manager's setting:
    a routine rotation sealed a plain record planted by someone without the key (another
    company's tokens in a victim tenant), and strict managers then served it. Now only a
    manager that reads plain records (a migration to sealing) seals them."""
    store = SQLiteStore(tmp_path / "tokens.db")
    ring = Keyring.generate("k1")
    async with TokenManager(app_for(sim), store, keyring=ring, **BUDGETS) as tm:
        await tm.exchange_code("victim", sim.issue_code(company_id=111))
        attacker = await tm.exchange_code("attacker", sim.issue_code(company_id=666))
        key = TenantKey(CLIENT_ID, "victim")
        await store.replace(key, Update(JsonCodec().encode(key, attacker), expires_at=attacker.expires_at))
        with pytest.raises(TokenSealError, match="not sealed"):
            await tm.access_token("victim")
        rotated = ring.rotated("k2")
        with pytest.raises(TokenSealError, match="victim"):
            await tm.rekey(rotated)  # the attacker's tenant is re-sealed; the planted record is not
    async with TokenManager(app_for(sim), store, keyring=rotated, **BUDGETS) as tm:
        with pytest.raises(TokenSealError):
            await tm.access_token("victim")
        assert (await tm.tokens("attacker")).company_id == "666"
    await store.aclose()


def test_cli_rekey_of_a_missing_sqlite_store_fails_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rekey_command`` opens ``cfg.store`` as given (not through ``Config.manager``, which
    refuses to create a missing SQLite file the way ``status``/``tenants`` do): pointed at a
    store that does not exist (a typo, or FACTORIAL_TOKENS_STORE unset in the operator's
    shell, so the default path), it creates an empty database, answers "re-sealed 0 tenant
    records under key ..." and exits 0. The operator reads that as a finished rotation and
    retires the old key, locking every tenant of the real store out."""
    from click.testing import CliRunner

    from factorial_tokens.cli._commands import main

    from .conftest import CLIENT_SECRET, REDIRECT_URI

    monkeypatch.delenv("FACTORIAL_TOKENS_KEYS", raising=False)
    keys = tmp_path / "tokens.keys"
    Keyring.generate("k1").rotated("k2").save(keys)
    missing = tmp_path / "typo-tokens.db"
    runner = CliRunner(
        env={
            "FACTORIAL_CLIENT_ID": CLIENT_ID,
            "FACTORIAL_CLIENT_SECRET": CLIENT_SECRET,
            "FACTORIAL_REDIRECT_URI": REDIRECT_URI,
            "FACTORIAL_BASE_URL": "http://127.0.0.1:9",
            "FACTORIAL_TOKENS_STORE": f"sqlite:///{missing}",
        }
    )
    result = runner.invoke(main, ["rekey", "--keys-file", str(keys)])
    assert not missing.exists(), "rekey created a new, empty store"
    assert result.exit_code != 0, result.output

"""Connecting a company is safe by default: each reproduction of issue 12, through the
public API (``complete_callback``, ``exchange_code``, ``connect_link``) and the stores.

The simulator's counters prove what reached Factorial: no exchange without a valid,
browser-bound state; a refused company's grant revoked; a replaced grant revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from factorial_tokens import (
    AuthorizationDenied,
    CallbackResult,
    CompanyMismatch,
    ConfigurationError,
    EventKind,
    InvalidCallback,
    InvalidState,
    InvalidTenant,
    Keyring,
    ProviderError,
    StateReused,
    StoreUnavailable,
    TenantNotConnected,
    TokenEvent,
    TokenManager,
    TokenSealError,
)
from factorial_tokens._models import validate_tenant
from factorial_tokens._state import LinkSigner
from factorial_tokens.sealing import JsonCodec
from factorial_tokens.store import (
    CLAIM_RETENTION,
    Acquisition,
    ClaimState,
    CodeClaim,
    Freshness,
    MemoryStore,
    Record,
    TenantKey,
    Update,
)
from factorial_tokens.store.sqlite import SQLiteStore
from factorial_tokens.testing import CountingStore, FakeFactorial, Fault

from .conftest import CLIENT_ID, SimFactory, app_for
from .stores import BACKENDS, Backend, open_backend

BUDGETS = {"lease_ttl": 6.0, "provider_timeout": 2.0}


def state_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["state"][0]


async def approve(sim: FakeFactorial, url: str, company_id: int, employee_id: int | None = None) -> str:
    """The company's admin approves ``url`` at the simulator; return the callback's code."""
    sim.next_owner(company_id, employee_id)
    callback = await sim.authorize(url)
    return parse_qs(urlsplit(callback).query)["code"][0]


@pytest.fixture
async def events_tm(sim: FakeFactorial) -> AsyncIterator[tuple[TokenManager, list[TokenEvent]]]:
    events: list[TokenEvent] = []
    async with TokenManager(app_for(sim), "memory://", on_event=events.append, **BUDGETS) as tm:
        yield tm, events


# -- complete_callback: state, nonce, binding, error ------------------------------------------


async def test_complete_callback_connects_and_returns_the_tenant_and_tokens(
    tm: TokenManager, sim: FakeFactorial
) -> None:
    url = tm.authorization_url("acme", binding="cookie-value-1")
    code = await approve(sim, url, 10001)
    result = await tm.complete_callback(state=state_of(url), code=code, binding="cookie-value-1")
    assert isinstance(result, CallbackResult) and result.tenant == "acme"
    assert result.tokens.company_id == "10001"
    assert (await tm.tokens("acme")).company_id == "10001"
    assert sim.stats.exchanges == 1


async def test_one_state_with_other_codes_is_refused(tm: TokenManager, sim: FakeFactorial) -> None:
    """Reproduction: one state with different codes was accepted three times."""
    url = tm.authorization_url("acme")
    state = state_of(url)
    first = await approve(sim, url, 10001)
    done = await tm.complete_callback(state=state, code=first)
    again = await tm.complete_callback(state=state, code=first)  # a retried callback
    assert again.tokens.access_token == done.tokens.access_token
    for company in (10002, 10003):
        other = sim.issue_code(company_id=company)
        with pytest.raises(StateReused):
            await tm.complete_callback(state=state, code=other)
    assert sim.stats.exchange_attempts == 1 and sim.stats.token_requests == 1
    assert (await tm.tokens("acme")).access_token == done.tokens.access_token


async def test_a_state_is_spent_fleet_wide_through_the_store(sim: FakeFactorial, tmp_path: Path) -> None:
    """Two managers (two workers) on one store agree: the second code is refused."""
    path = f"sqlite:///{tmp_path / 'tokens.db'}"
    async with (
        TokenManager(app_for(sim), path, **BUDGETS) as one,
        TokenManager(app_for(sim), path, **BUDGETS) as two,
    ):
        url = one.authorization_url("acme")
        code = await approve(sim, url, 1)
        await one.complete_callback(state=state_of(url), code=code)
        assert (await two.complete_callback(state=state_of(url), code=code)).tenant == "acme"
        with pytest.raises(StateReused):
            await two.complete_callback(state=state_of(url), code=sim.issue_code(company_id=2))
    assert sim.stats.exchange_attempts == 1


@pytest.mark.parametrize(
    ("issued", "presented"),
    [("browser-a-cookie", None), ("browser-a-cookie", "browser-b-cookie"), (None, "browser-b-cookie")],
)
async def test_a_callback_from_another_browser_is_refused_before_anything_happens(
    tm: TokenManager, sim: FakeFactorial, issued: str | None, presented: str | None
) -> None:
    url = tm.authorization_url("acme", binding=issued)
    code = await approve(sim, url, 10001)
    with pytest.raises(InvalidState, match="another browser"):
        await tm.complete_callback(state=state_of(url), code=code, binding=presented)
    assert sim.stats.token_requests == 0 and await tm.tenants() == []
    # The state was not spent: the browser that started the flow still completes it.
    done = await tm.complete_callback(state=state_of(url), code=code, binding=issued)
    assert done.tokens.company_id == "10001"


async def test_callbacks_without_a_valid_state_and_binding_never_touch_store_or_provider(
    sim: FakeFactorial,
) -> None:
    store = CountingStore(MemoryStore())
    async with TokenManager(app_for(sim), store, **BUDGETS) as tm:
        url = tm.authorization_url("acme", binding="the-admin-browser")
        code = await approve(sim, url, 1)
        store.reset()
        forged = state_of(url)[:-4] + "AAAA"
        attempts = [
            {"state": None, "code": code},
            {"state": forged, "code": code, "binding": "the-admin-browser"},
            {"state": state_of(url), "code": code},  # no binding
            {"state": state_of(url), "code": code, "binding": "another-browser"},
            {"state": state_of(url), "error": "access_denied", "binding": "another-browser"},
            {"state": state_of(url), "error": "access_denied", "binding": "the-admin-browser"},
            {"state": state_of(url), "code": None, "binding": "the-admin-browser"},
        ]
        for attempt in attempts:
            with pytest.raises((InvalidState, AuthorizationDenied, InvalidCallback)):
                await tm.complete_callback(**attempt)  # type: ignore[arg-type]
        assert store.calls.total() == 0
    assert sim.stats.token_requests == 0 and sim.stats.api_calls == 0


async def test_the_binding_is_only_a_hash_in_the_state(tm: TokenManager) -> None:
    import base64

    url = tm.authorization_url("acme", binding="the-browser-cookie-value")
    body = state_of(url).split(".")[0]
    assert b"the-browser-cookie-value" not in base64.urlsafe_b64decode(body + "==")


async def test_an_error_callback_is_typed_and_sends_nothing(tm: TokenManager, sim: FakeFactorial) -> None:
    state = state_of(tm.authorization_url("acme", binding="b" * 40))
    with pytest.raises(AuthorizationDenied) as info:
        await tm.complete_callback(state=state, error="access_denied", binding="b" * 40)
    assert info.value.error == "access_denied" and info.value.tenant == "acme"
    with pytest.raises(AuthorizationDenied) as info:
        await tm.complete_callback(state=state, error="<b>Call 555</b>\r\nX: y", binding="b" * 40)
    assert info.value.error == "bCall555bXy"
    # Without a valid state, nothing of the error is believed or shown.
    for bad in (None, "", "forged.state"):
        with pytest.raises(InvalidState) as refused:
            await tm.complete_callback(state=bad, error="phishing_text", binding="b" * 40)
        assert "phishing" not in str(refused.value)
    assert sim.stats.token_requests == 0 and sim.stats.api_calls == 0


async def test_a_missing_code_does_not_spend_the_state(tm: TokenManager, sim: FakeFactorial) -> None:
    url = tm.authorization_url("acme")
    for bad in (None, "", "x" * 5000, "a\nb", 42):
        with pytest.raises(InvalidCallback):
            await tm.complete_callback(state=state_of(url), code=bad)
    code = await approve(sim, url, 7)
    assert (await tm.complete_callback(state=state_of(url), code=code)).tenant == "acme"


# -- company pinning ---------------------------------------------------------------------------


async def test_takeover_of_a_connected_tenant_is_refused_and_the_new_grant_revoked(
    events_tm: tuple[TokenManager, list[TokenEvent]], sim: FakeFactorial
) -> None:
    """Reproduction: anyone completing a flow for acme with their own company replaced
    acme's grant silently; the old grant stayed live."""
    tm, events = events_tm
    mine = await tm.exchange_code("acme", sim.issue_code(company_id=10001))
    assert (await tm.credentials("acme")).company_id == "10001"
    theirs = sim.issue_code(company_id=10003)
    with pytest.raises(CompanyMismatch) as info:
        await tm.exchange_code("acme", theirs)
    assert (info.value.expected, info.value.got) == ("10001", "10003")
    assert (await tm.tokens("acme")) == mine  # untouched
    assert (await tm.credentials("acme")).company_id == "10001"
    assert sim.stats.revocations_by_company == {10003: 1} and sim.live_pairs(10003) == 0  # revoked
    assert sim.is_active(mine.access_token)
    # A retried callback with the same code gets the same refusal, without a second exchange.
    with pytest.raises(CompanyMismatch):
        await tm.exchange_code("acme", theirs)
    assert sim.stats.exchange_attempts == 2  # acme's own code and the refused one, once each
    assert await tm.flush_events()  # listeners run on a background thread
    mismatch = [e for e in events if e.kind is EventKind.COMPANY_MISMATCH]
    assert [(e.previous_company_id, e.company_id) for e in mismatch] == [("10001", "10003")]
    assert not [e for e in events if e.kind is EventKind.RECONNECTED]


async def test_takeover_through_complete_callback_is_refused(tm: TokenManager, sim: FakeFactorial) -> None:
    first = tm.authorization_url("acme", binding="admin-browser-cookie")
    await tm.complete_callback(
        state=state_of(first), code=await approve(sim, first, 10001), binding="admin-browser-cookie"
    )
    second = tm.authorization_url("acme", binding="attacker-browser-cookie")
    code = await approve(sim, second, 10003)
    with pytest.raises(CompanyMismatch):
        await tm.complete_callback(state=state_of(second), code=code, binding="attacker-browser-cookie")
    assert (await tm.tokens("acme")).company_id == "10001" and sim.live_pairs(10003) == 0


async def test_a_company_change_on_purpose_replaces_and_revokes_the_old_grant(
    events_tm: tuple[TokenManager, list[TokenEvent]], sim: FakeFactorial
) -> None:
    tm, events = events_tm
    old = await tm.exchange_code("acme", sim.issue_code(company_id=10001))
    url = tm.authorization_url("acme")
    code = await approve(sim, url, 10003)
    new = (await tm.complete_callback(state=state_of(url), code=code, allow_company_change=True)).tokens
    assert new.company_id == "10003" and (await tm.credentials("acme")).company_id == "10003"
    assert not sim.is_active(old.access_token) and not sim.is_refresh_usable(old.refresh_token or "")
    assert sim.live_pairs(10001) == 0 and sim.stats.revocations_by_company == {10001: 1}
    assert await tm.flush_events()  # listeners run on a background thread
    reconnected = [e for e in events if e.kind is EventKind.RECONNECTED]
    assert [(e.previous_company_id, e.company_id) for e in reconnected] == [("10001", "10003")]
    assert "10001" in reconnected[0].detail and "10003" in reconnected[0].detail


async def test_every_reconnect_revokes_the_previous_grant(
    events_tm: tuple[TokenManager, list[TokenEvent]], sim: FakeFactorial
) -> None:
    tm, events = events_tm
    first = await tm.exchange_code("acme", sim.issue_code(company_id=5))
    second = await tm.exchange_code("acme", sim.issue_code(company_id=5))
    assert await tm.access_token("acme") == second.access_token
    assert not sim.is_active(first.access_token) and sim.is_active(second.access_token)
    assert sim.stats.revocations_by_company == {5: 1}
    assert await tm.flush_events()  # listeners run on a background thread
    kinds = [e.kind for e in events]
    assert kinds.count(EventKind.EXCHANGED) == 2 and kinds.count(EventKind.RECONNECTED) == 1
    reconnected = next(e for e in events if e.kind is EventKind.RECONNECTED)
    assert (reconnected.previous_company_id, reconnected.company_id) == ("5", "5")


async def test_a_user_token_pins_on_its_company(tm: TokenManager, sim: FakeFactorial) -> None:
    await tm.exchange_code("acme", sim.issue_code(company_id=20, employee_id=1))
    # Another admin of the same company (or a company-wide token of it): accepted.
    await tm.exchange_code("acme", sim.issue_code(company_id=20, employee_id=2))
    await tm.exchange_code("acme", sim.issue_code(company_id=20, company_token=True))
    with pytest.raises(CompanyMismatch):
        await tm.exchange_code("acme", sim.issue_code(company_id=21, employee_id=3))
    assert (await tm.credentials("acme")).company_id == "20"
    assert sim.live_pairs(21) == 0 and sim.stats.revocations_by_company == {20: 2, 21: 1}


@pytest.mark.parametrize("name", BACKENDS)
async def test_two_overlapping_connections_of_one_tenant_are_compared(
    name: str, make_sim: SimFactory, tmp_path: Path
) -> None:
    """Two admins of different companies connecting a new tenant at the same moment: one
    company wins, the other is refused and revoked (never "the last one wins")."""

    class SlowStore(CountingStore):
        """The real store, with a round trip slow enough for the connections to overlap."""

        async def read(self, key: TenantKey) -> Record | None:
            record = await super().read(key)
            await asyncio.sleep(0.05)  # the answer is on its way: other writes can happen
            return record

        async def acquire(
            self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
        ) -> Acquisition:
            won = await super().acquire(key, owner, ttl, unless_fresh=unless_fresh)
            await asyncio.sleep(0.05)
            return won

    async with make_sim() as sim, open_backend(name, tmp_path) as backend:
        async with TokenManager(app_for(sim), SlowStore(backend.store), **BUDGETS) as tm:
            codes = [sim.issue_code(company_id=company) for company in (1, 2, 1, 2)]
            outcomes = await asyncio.gather(
                *(tm.exchange_code("acme", code) for code in codes), return_exceptions=True
            )
            won = {o.company_id for o in outcomes if not isinstance(o, BaseException)}
            refused = [o for o in outcomes if isinstance(o, BaseException)]
            assert len(won) == 1 and len(refused) == 2
            assert all(isinstance(o, CompanyMismatch) for o in refused)
            loser = 2 if won == {"1"} else 1
            stored = await tm.tokens("acme")
            assert stored.company_id in won and sim.is_active(stored.access_token)
            assert sim.live_pairs(loser) == 0 and sim.stats.revocations_by_company[loser] == 2
            # The winner's two grants: one stored, the other replaced and revoked.
            assert sim.live_pairs(3 - loser) == 1


async def test_a_pinned_tenant_is_not_replaced_when_the_company_cannot_be_read(sim: FakeFactorial) -> None:
    budgets = {"lease_ttl": 3.0, "provider_timeout": 0.5, "refresh_deadline": 0.5}
    async with TokenManager(app_for(sim), "memory://", **budgets) as tm:
        mine = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        sim.inject(Fault.HTTP_500, endpoint="api", times=50)
        with pytest.raises(ProviderError):
            await tm.exchange_code("acme", sim.issue_code(company_id=2))
        sim.clear_faults()
        assert await tm.tokens("acme") == mine and sim.live_pairs(2) == 0


async def test_the_company_survives_refreshes(tm: TokenManager, sim: FakeFactorial) -> None:
    await tm.exchange_code("acme", sim.issue_code(company_id=77))
    refreshed = await tm.refresh("acme")
    assert refreshed.company_id == "77" and (await tm.tokens("acme")).company_id == "77"
    with pytest.raises(CompanyMismatch):
        await tm.exchange_code("acme", sim.issue_code(company_id=78))


# -- connect links -------------------------------------------------------------------------------


async def test_connect_links_are_signed_expiring_and_per_tenant(tm: TokenManager) -> None:
    link = tm.connect_link("café ☕", ttl=60)
    parts = urlsplit(link)
    assert f"{parts.scheme}://{parts.netloc}" == "http://127.0.0.1:8765"
    assert parts.path == "/connect/caf%C3%A9%20%E2%98%95"
    token = parse_qs(parts.query)["link"][0]
    tm.check_connect_link(token, "café ☕")
    with pytest.raises(InvalidState, match="another tenant"):
        tm.check_connect_link(token, "acme")
    expired = LinkSigner(tm.app, 600).sign("acme", now=time.time() - 3600)
    with pytest.raises(InvalidState, match="expired"):
        tm.check_connect_link(expired, "acme")
    state = state_of(tm.authorization_url("acme"))
    for bad in (None, "", "x.y", token[:-2] + "AA", state):  # a state is not a link
        with pytest.raises(InvalidState):
            tm.check_connect_link(bad, "café ☕")
    assert tm.connect_link("a", base_url="https://x.example/f/").startswith("https://x.example/f/connect/a?")


@pytest.mark.parametrize(
    "base",
    [
        "javascript:alert(1)//",  # a link an admin clicks runs script
        "data:text/html,<script>",
        "//evil.example",  # no scheme
        "ftp://x.example",
        "x.example/f",  # relative
        "https://x.example/f?next=1",  # the link's own query would be another value
        "https://x.example/f#top",  # the signed token would be a fragment, never sent
        "https://user:pass@x.example",  # a password in every link printed
        "https://x.example/f\n",
        "",
    ],
)
def test_a_connect_link_base_that_is_no_web_origin_is_refused(tm: TokenManager, base: str) -> None:
    """``connect-link --link-base javascript:`` printed a link that runs script when the
    tenant's admin opens it; a query or fragment in the base lost the signed token."""
    with pytest.raises(ConfigurationError, match="base_url") as info:
        tm.connect_link("acme", base_url=base)
    assert "pass" not in str(info.value)


@pytest.mark.parametrize("base", ["http://[::1", "https://[x.example]/f"])
def test_a_connect_link_base_urlsplit_cannot_read_is_a_configuration_error(
    tm: TokenManager, base: str
) -> None:
    """``_check_link_base`` calls ``urlsplit`` unguarded: a base with an unclosed or
    non-IP bracketed host raises a bare ValueError ("Invalid IPv6 URL"), not the
    ConfigurationError the docstring promises (a caller catching FactorialTokensError
    gets a crash; ``connect-link --link-base`` prints a traceback, exit 1)."""
    with pytest.raises(ConfigurationError, match="base_url"):
        tm.connect_link("acme", base_url=base)


@pytest.mark.parametrize("char", ["\x85", "\x9b", "\u2028", "\u00a0"])
def test_a_connect_link_base_with_c1_controls_or_unicode_breaks_is_refused(
    tm: TokenManager, char: str
) -> None:
    """The base check refuses "spaces or control characters" as ``ord(ch) < 0x21 or
    ch == "\\x7f"`` only: C1 controls (U+0085 NEL, U+009B, the 8-bit CSI a terminal reads
    as ESC [), the line separator U+2028 and the no-break space pass, and end up inside
    the printed link (a broken or terminal-rewriting line handed to the admin)."""
    with pytest.raises(ConfigurationError, match="base_url"):
        tm.connect_link("acme", base_url=f"https://x.example/f{char}")


def test_connect_link_with_an_infinite_ttl_is_a_configuration_error(tm: TokenManager) -> None:
    """``connect_link(ttl=float("inf"))`` passes the ``ttl > 0`` check and then
    ``int(issued + ttl)`` in LinkSigner.sign raises OverflowError: not a
    FactorialTokensError (the CLI caps --ttl, the library API does not)."""
    with pytest.raises(ConfigurationError, match="ttl"):
        tm.connect_link("acme", ttl=float("inf"))


# -- tenant ids --------------------------------------------------------------------------------


HOSTILE = [
    "acme\u200b",  # zero-width space (Cf)
    "\u202eemca",  # right-to-left override (Cf)
    "ac\u2066me",  # bidi isolate (Cf)
    "\ufeffacme",  # byte order mark (Cf)
    "acme\ue000",  # private use (Co)
    "acme\u2028",  # line separator (Zl)
    "acme\u2029",  # paragraph separator (Zp)
    "acme\x00",
    "acme\r\nX",
    "acme\x85",  # next line (Cc)
]


@pytest.mark.parametrize("tenant", HOSTILE)
def test_hostile_tenant_ids_are_refused(tenant: str) -> None:
    with pytest.raises(InvalidTenant) as info:
        validate_tenant(tenant)
    assert unicodedata.category(next(c for c in tenant if not c.isalnum())) in str(info.value)


def test_tenant_ids_are_nfc_normalised() -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert validate_tenant(decomposed) == composed == validate_tenant(composed)
    assert validate_tenant("x" * 150 + "e\u0301" * 50) == "x" * 150 + "\u00e9" * 50  # 250 -> 200


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with open_backend(request.param, tmp_path) as opened:
        yield opened


async def test_hostile_tenant_ids_on_every_store(backend: Backend, sim: FakeFactorial) -> None:
    async with TokenManager(app_for(sim), backend.store, **BUDGETS) as tm:
        await tm.exchange_code("cafe\u0301", sim.issue_code(company_id=1))  # stored as NFC
        assert [i.tenant for i in await tm.tenants()] == ["caf\u00e9"]
        assert (await tm.tokens("caf\u00e9")).company_id == "1"
        for tenant in HOSTILE:
            for call in (tm.access_token, tm.tokens, tm.refresh, tm.forget):
                with pytest.raises(InvalidTenant):
                    await call(tenant)
            with pytest.raises(InvalidTenant):
                await tm.exchange_code(tenant, sim.issue_code(company_id=2))
            with pytest.raises(InvalidTenant):
                tm.authorization_url(tenant)
            with pytest.raises(InvalidTenant):
                tm.connect_link(tenant)
        assert [i.tenant for i in await tm.tenants()] == ["caf\u00e9"]
    assert sim.stats.exchange_attempts == 1


# -- sealing defaults: a planted plain record --------------------------------------------------


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "memory"])
async def test_a_planted_plain_record_is_refused_with_a_keyring(
    name: str, sim: FakeFactorial, tmp_path: Path
) -> None:
    """Reproduction: with a keyring, a plain record written without the key was served
    (company 111 became 666 for tenant ``victim``)."""
    ring = Keyring.generate("k1")
    async with open_backend(name, tmp_path) as backend:
        store = backend.store
        events: list[TokenEvent] = []
        async with TokenManager(app_for(sim), store, keyring=ring, on_event=events.append, **BUDGETS) as tm:
            await tm.exchange_code("victim", sim.issue_code(company_id=111))
            attacker = await tm.exchange_code("attacker", sim.issue_code(company_id=666))
            # Someone with write access but no key plants their own grant, in plain JSON.
            key = TenantKey(CLIENT_ID, "victim")
            planted = Update(JsonCodec().encode(key, attacker), expires_at=attacker.expires_at)
            await store.replace(key, planted)
            requests = sim.stats.token_requests + sim.stats.api_calls
            for call in (tm.access_token, tm.tokens, tm.credentials):
                with pytest.raises(TokenSealError, match="not sealed"):
                    await call("victim")
            assert sim.stats.token_requests + sim.stats.api_calls == requests  # nothing used it
            assert await tm.flush_events()  # listeners run on a background thread
            assert [e.kind for e in events].count(EventKind.SEAL_ERROR) == 3
        # Reading plain records takes an explicit migration switch.
        async with TokenManager(app_for(sim), store, keyring=ring, allow_plaintext=True, **BUDGETS) as tm:
            assert (await tm.tokens("victim")).access_token == attacker.access_token


# -- files -------------------------------------------------------------------------------------


async def test_sqlite_database_wal_and_shm_are_created_0600(tmp_path: Path, sim: FakeFactorial) -> None:
    old = os.umask(0o022)  # the usual umask, which gave 0644 before
    try:
        path = tmp_path / "tokens.db"
        store = SQLiteStore(path)
        async with TokenManager(app_for(sim), store, **BUDGETS) as tm:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            files = [path, tmp_path / "tokens.db-wal", tmp_path / "tokens.db-shm"]
            assert all(f.exists() for f in files)
            assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}
        await store.aclose()
    finally:
        os.umask(old)


# -- a grant whose company could not be read is still pinned --------------------------------


async def test_a_tenant_connected_while_its_company_was_unreadable_cannot_be_rebound(
    sim: FakeFactorial,
) -> None:
    """acme connects while the credentials endpoint fails: its grant is stored with no
    company. A grant of another company replaced it silently (and acme's grant was
    revoked) without ``allow_company_change``; now the stored grant's company is asked of
    Factorial with its own access token, and the stranger's grant is refused."""
    async with TokenManager(app_for(sim), "memory://", **BUDGETS) as tm:
        sim.inject(Fault.HTTP_500, endpoint="api", times=50)
        mine = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        sim.clear_faults()
        assert mine.company_id is None
        with pytest.raises(CompanyMismatch) as info:
            await tm.exchange_code("acme", sim.issue_code(company_id=2))
        assert (info.value.expected, info.value.got) == ("1", "2")
        assert await tm.tokens("acme") == mine and sim.is_active(mine.access_token)
        again = await tm.exchange_code("acme", sim.issue_code(company_id=1))  # its own company: fine
        assert again.company_id == "1" and not sim.is_active(mine.access_token)


async def test_a_grant_of_unknown_company_whose_token_expired_is_not_replaced_blindly(
    make_sim: SimFactory,
) -> None:
    """When the stored grant's company cannot be asked (its access token expired), no
    grant replaces it unless the application allows a company change."""
    async with make_sim(access_token_ttl=1) as sim, TokenManager(app_for(sim), "memory://", **BUDGETS) as tm:
        sim.inject(Fault.HTTP_500, endpoint="api", times=50)
        mine = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        sim.clear_faults()
        await asyncio.sleep(1.1)
        with pytest.raises(CompanyMismatch) as info:
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
        assert (info.value.expected, info.value.got) == ("unknown", "1")
        assert await tm.tokens("acme") == mine
        moved = await tm.exchange_code("acme", sim.issue_code(company_id=1), allow_company_change=True)
        assert moved.company_id == "1"


# -- a revoke and a connection take turns ------------------------------------------------------


async def test_a_revoke_in_flight_does_not_wipe_a_grant_connected_meanwhile(sim: FakeFactorial) -> None:
    """``revoke`` read the grant under the tenant's lease, revoked it at Factorial, then
    deleted the record unfenced: a connection stored meanwhile (its write fences the lease
    out) was deleted too, though its callback succeeded and its grant is live at Factorial.
    Now a revoke takes the tenant's connection turn: the connection waits for it."""
    budgets = {"lease_ttl": 6.0, "provider_timeout": 2.0, "refresh_deadline": 3.0}
    async with TokenManager(app_for(sim), "memory://", **budgets) as tm:
        old = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        sim.inject(Fault.SLOW, endpoint="revoke", delay=1.0)
        revoking = asyncio.create_task(tm.revoke("acme"))
        await asyncio.sleep(0.3)  # revoke holds the lease and waits for Factorial's answer
        new = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        await revoking
        assert await tm.tokens("acme") == new
        assert sim.is_active(new.access_token) and not sim.is_active(old.access_token)


# -- a state is single-use for as long as it is valid -----------------------------------------


def test_a_state_cannot_outlive_the_claim_that_spends_it(sim: FakeFactorial) -> None:
    """The claim that spends a state's nonce is kept for ``CLAIM_RETENTION`` (a day) once
    finished: a state valid for longer (``state_ttl`` was unbounded) could complete a second
    connection with another code after the claim was dropped."""
    with pytest.raises(ConfigurationError, match="state_ttl"):
        TokenManager(app_for(sim), "memory://", state_ttl=CLAIM_RETENTION + 1)
    TokenManager(app_for(sim), "memory://", state_ttl=CLAIM_RETENTION)


def test_a_binding_that_is_no_string_is_a_configuration_error(sim: FakeFactorial) -> None:
    tm = TokenManager(app_for(sim), "memory://")
    with pytest.raises(ConfigurationError, match="binding"):
        tm.authorization_url("acme", binding=5)  # type: ignore[arg-type]


async def test_a_revoke_waiting_for_a_refresh_revokes_the_grant_connected_meanwhile(
    sim: FakeFactorial, tmp_path: Path
) -> None:
    """``revoke`` held the connection turn while it waited for the tenant's lease (another
    worker's slow refresh); a connection waits for the turn only ``refresh_deadline``, then
    stored its grant without it, and the revoke deleted that grant, live at Factorial (a
    lost grant). Now the turn is taken after the lease, and the record checked under it:
    whatever is stored when the revoke acts is what it revokes and deletes."""
    budgets = {"lease_ttl": 6.0, "provider_timeout": 2.9, "refresh_deadline": 3.0}
    path = f"sqlite:///{tmp_path / 'tokens.db'}"
    async with (
        TokenManager(app_for(sim), path, **budgets) as one,
        TokenManager(app_for(sim), path, **budgets) as two,
    ):
        old = await one.exchange_code("acme", sim.issue_code(company_id=1))
        sim.inject(Fault.SLOW, endpoint="token", delay=2.5)  # worker two's refresh is slow
        refreshing = asyncio.create_task(two.refresh("acme"))
        await asyncio.sleep(0.2)
        sim.inject(Fault.SLOW, endpoint="revoke", delay=2.0)
        revoking = asyncio.create_task(one.revoke("acme"))
        await asyncio.sleep(0.2)  # revoke waits for the tenant's lease
        new = await one.exchange_code("acme", sim.issue_code(company_id=1))
        await asyncio.gather(refreshing, return_exceptions=True)
        await revoking
        with pytest.raises(TenantNotConnected):
            await one.tokens("acme")
        assert not sim.is_active(new.access_token) and not sim.is_active(old.access_token)


class _WritesDownUntil(CountingStore):
    """A real MemoryStore whose ``replace`` fails like a lost server until ``until`` (loop time)."""

    until = 0.0

    async def replace(self, key: TenantKey, update: Update | None) -> None:
        if asyncio.get_running_loop().time() < self.until:
            raise StoreUnavailable("store is down (test outage)")
        await super().replace(key, update)


async def test_a_store_blip_past_the_exchange_deadline_does_not_refuse_the_same_company(
    sim: FakeFactorial,
) -> None:
    """The stored grant's company is unknown and the same company connects again while the
    store is down: the write is retried for ``lease_ttl``, and each retry asked Factorial
    with the exchange's deadline, long passed: the timeout read as a company mismatch."""
    store = _WritesDownUntil(MemoryStore())
    async with TokenManager(app_for(sim), store, lease_ttl=6.0, provider_timeout=2.0) as tm:
        sim.inject(Fault.HTTP_500, endpoint="api", times=50)
        await tm.exchange_code("acme", sim.issue_code(company_id=1))
        sim.clear_faults()
        store.until = asyncio.get_running_loop().time() + 4.5  # refresh_deadline is 4 s
        new = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        assert new.company_id == "1" and await tm.tokens("acme") == new


# -- a claim's outcome that cannot be recorded leaks no grant (review-exchange) ------------------


class _ClaimStepsDown(CountingStore):
    """A real MemoryStore on which moving a code claim to a state of ``down`` fails like a
    store that is unreachable (nothing written); ``replace`` fails while ``writes_down``."""

    down: frozenset[ClaimState] = frozenset()
    writes_down = False

    async def advance_code(
        self, claim: CodeClaim, state: ClaimState, ttl: float, outcome: str | None = None
    ) -> bool:
        if state in self.down:
            raise StoreUnavailable("store is down (test outage)")
        return await super().advance_code(claim, state, ttl, outcome)

    async def replace(self, key: TenantKey, update: Update | None) -> None:
        if self.writes_down:
            raise StoreUnavailable("store is down (test outage)")
        await super().replace(key, update)


SHORT = {"lease_ttl": 1.5, "provider_timeout": 0.5}


async def test_a_stranger_grant_is_revoked_even_when_the_claim_failure_cannot_be_recorded(
    sim: FakeFactorial,
) -> None:
    """acme is pinned to company 1; company 2's code is exchanged and refused. In
    ``_exchange_holding`` the claim is marked FAILED (``_fail_claim``) *before* the refused
    grant is revoked: when the store cannot record that step, StoreUnavailable escapes,
    ``_revoke_quietly`` never runs, and company 2's grant stays live at Factorial, stored
    nowhere (a leaked grant); the caller gets StoreUnavailable instead of CompanyMismatch."""
    store = _ClaimStepsDown(MemoryStore())
    async with TokenManager(app_for(sim), store, **SHORT) as tm:
        mine = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        store.down = frozenset({ClaimState.FAILED})
        with pytest.raises((CompanyMismatch, StoreUnavailable)):
            await tm.exchange_code("acme", sim.issue_code(company_id=2))
        assert await tm.tokens("acme") == mine
        assert sim.live_pairs(2) == 0, "the refused stranger's grant is live at Factorial, stored nowhere"


async def test_a_replaced_grant_is_revoked_even_when_the_claim_cannot_be_marked_done(
    sim: FakeFactorial,
) -> None:
    """acme reconnects (same company): the new tokens are stored, then the claim is moved
    to DONE under ``_patiently``; when that step keeps failing, StoreUnavailable escapes
    ``_exchange_holding`` before ``_revoke_quietly(old)``: the replaced grant stays live at
    Factorial though no store holds it any more (a leaked grant), and no EXCHANGED event
    is emitted although the tenant is connected with the new grant."""
    store = _ClaimStepsDown(MemoryStore())
    async with TokenManager(app_for(sim), store, **SHORT) as tm:
        old = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        store.down = frozenset({ClaimState.DONE})
        with contextlib.suppress(StoreUnavailable):
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
        stored = await tm.tokens("acme")
        assert stored.access_token != old.access_token  # the new grant is what the store holds
        assert not sim.is_active(old.access_token), "the replaced grant is live at Factorial, stored nowhere"


async def test_exchanged_tokens_that_cannot_be_stored_are_revoked_not_leaked(sim: FakeFactorial) -> None:
    """The code is exchanged, then every write of the new tokens fails until ``_patiently``
    gives up (``lease_ttl``): StoreUnavailable is raised and the tokens exist nowhere but
    at Factorial, live (``_exchange_holding`` only revokes on CompanyMismatch,
    ProviderError and TokenSealError). The company sees itself connected, the tenant is
    not, and the grant is never revoked."""
    store = _ClaimStepsDown(MemoryStore())
    async with TokenManager(app_for(sim), store, **SHORT) as tm:
        store.writes_down = True
        with pytest.raises(StoreUnavailable):
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
        store.writes_down = False
        with pytest.raises(TenantNotConnected):
            await tm.tokens("acme")
        assert sim.live_pairs(1) == 0, "the exchanged grant is live at Factorial, stored nowhere"


class _FirstWriteReplyLost(CountingStore):
    """A real MemoryStore: once ``armed``, the first write of tokens is made, then its reply
    is lost (StoreUnavailable) as soon as another connection of the tenant queues for the
    connection turn (an ``acquire`` of the turn that finds it busy)."""

    armed = False

    def __init__(self, inner: MemoryStore) -> None:
        super().__init__(inner)
        self.queued = asyncio.Event()

    async def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Acquisition:
        won = await super().acquire(key, owner, ttl, unless_fresh=unless_fresh)
        if key.namespace.endswith("/connect-turn") and won.lease is None:
            self.queued.set()
        return won

    async def replace(self, key: TenantKey, update: Update | None) -> None:
        await super().replace(key, update)
        if self.armed and update is not None:
            self.armed = False
            await self.queued.wait()
            raise StoreUnavailable("the reply was lost (test outage)")


async def test_a_write_retried_after_a_lost_reply_does_not_overwrite_a_connection_made_meanwhile(
    sim: FakeFactorial,
) -> None:
    """Connection A stores its grant but the reply is lost; it gives the connection turn
    back and ``_patiently`` retries ``_pin_and_store`` 50 ms later. Connection B (same
    company), queued for the turn, stores its grant in between and revokes A's as the one it
    replaced. A's retry finds B's tokens, takes them for the grant it replaces
    (``replaced[:] = [old]``, ``_exchange.py:279``), writes A's tokens over them and revokes
    B's: the store ends holding A's grant, which B revoked (stored but revoked: the tenant
    is dead), and the grant of the first connection, noted by A's first attempt, is never
    revoked (leaked)."""
    store = _FirstWriteReplyLost(MemoryStore())
    async with TokenManager(app_for(sim), store, **BUDGETS) as tm:
        first = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        store.armed = True
        results = await asyncio.gather(
            tm.exchange_code("acme", sim.issue_code(company_id=1)),
            tm.exchange_code("acme", sim.issue_code(company_id=1)),
            return_exceptions=True,
        )
        assert all(not isinstance(r, BaseException) for r in results), results
        stored = await tm.tokens("acme")
        assert sim.is_active(stored.access_token), "the stored grant was revoked at Factorial"
        assert not sim.is_active(first.access_token), "the first grant was replaced but never revoked"


@pytest.mark.xfail(
    strict=True,
    reason="known, not fixed yet: a SENT claim is not extended while its holder works past lease_ttl",
)
async def test_a_retried_callback_is_not_told_to_reconnect_while_the_exchange_is_still_storing(
    sim: FakeFactorial,
) -> None:
    """The SENT claim lives ``lease_ttl``, but the holder's step can take longer: after the
    exchange (``refresh_deadline``) ``_company_of`` asks Factorial with a deadline of its own
    (``_exchange.py:299``), and ``_patiently`` and the connection turn add more. A retried
    callback arriving once the claim expired gets ExchangeInDoubt ("a worker that died",
    the company must connect again) from ``_exchange.py:162`` while the holder is alive and
    then connects the tenant with that very code."""
    budgets = {"lease_ttl": 3.0, "provider_timeout": 2.5, "refresh_deadline": 2.5}
    store = MemoryStore()
    async with (
        TokenManager(app_for(sim), store, **budgets) as one,
        TokenManager(app_for(sim), store, **budgets) as two,
    ):
        sim.inject(Fault.HTTP_500, endpoint="api", times=50)
        await one.exchange_code("acme", sim.issue_code(company_id=1))  # company unknown
        sim.clear_faults()
        code = sim.issue_code(company_id=1)
        sim.inject(Fault.SLOW, endpoint="token", delay=1.5)
        sim.inject(Fault.SLOW, endpoint="api", delay=0.0)  # the new grant's company
        sim.inject(Fault.SLOW, endpoint="api", delay=2.0)  # the stored grant's company
        holder = asyncio.create_task(one.exchange_code("acme", code))
        await asyncio.sleep(3.2)  # the claim (SENT at ~0) expired; the holder is in _company_of
        assert not holder.done()
        retried = await asyncio.gather(two.exchange_code("acme", code), return_exceptions=True)
        tokens = await holder
        assert await one.tokens("acme") == tokens
        assert retried == [tokens], f"the retried callback got {retried!r} though the tenant is connected"

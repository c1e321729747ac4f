"""The real wire: answers in pieces, answers of other shapes, refreshes without rotation.

Each test counts what the simulator saw: grants, ``invalid_grant``, families revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factorial_tokens import (
    EventKind,
    FactorialTokensError,
    ProviderError,
    RequestInDoubt,
    TenantNotConnected,
    TokenEvent,
    TokenManager,
)
from factorial_tokens._oauth import _EXCERPT_BYTES, OAuthClient, _excerpt, _token_set
from factorial_tokens.store import MemoryStore, TenantStatus, Update
from factorial_tokens.testing import Dialect, FakeFactorial, Fault, RefreshMode

from ._replaying import HookedStore, ReplayingStore
from .conftest import SimFactory, app_for, oauth_client
from .stores import BACKENDS, open_backend


async def _connect(sim: FakeFactorial, tm: TokenManager, tenant: str = "acme") -> None:
    await tm.exchange_code(tenant, sim.issue_code(company_id=1))


def _clean(sim: FakeFactorial) -> None:
    stats = sim.stats
    assert stats.invalid_grant == 0, stats.invalid_grant_by_cause
    assert stats.families_revoked == 0


# -- 1. answers in pieces ----------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_answers_in_pieces_are_read_whole(make_sim: SimFactory, chunked: bool) -> None:
    async with make_sim(answer_pieces=5, piece_delay=0.015, chunked=chunked) as sim:
        async with TokenManager(app_for(sim), "memory://", lease_ttl=6.0, provider_timeout=2.0) as tm:
            await _connect(sim, tm)
            first = await tm.tokens("acme")
            refreshed = await tm.refresh("acme")
            assert refreshed.access_token != first.access_token
            assert sim.is_active(refreshed.access_token)
        stats = sim.stats
        assert (stats.exchanges, stats.refreshes) == (1, 1)
        _clean(sim)


async def test_a_chunked_body_over_the_limit_is_refused_by_what_was_read(raw_server: Any) -> None:
    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b'{"access_token": "' + b"a" * 100)
        for _ in range(40):
            await resp.write(b"b" * 65536)
            await asyncio.sleep(0)
        await resp.write(b'"}')
        await resp.write_eof()
        return resp

    raw_server["handler"] = huge
    client = oauth_client(raw_server["base_url"])
    try:
        deadline = asyncio.get_running_loop().time() + 5
        with pytest.raises(RequestInDoubt) as info:
            await client.exchange_code("some-code", deadline=deadline)
        assert "over 1 MiB" in info.value.description
    finally:
        await client.aclose()


CUT = "QZXJKWQZXJ"  # a secret's cut-off piece, shorter than any length-based threshold


@pytest.mark.parametrize("key", ["access_token", "refresh_token", "code", "client_secret", "id_token"])
async def test_no_piece_of_a_secret_value_reaches_an_error(raw_server: Any, key: str) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        return web.Response(status=400, text=f'{{"{key}": "{CUT}', content_type="application/json")

    raw_server["handler"] = cut
    client = oauth_client(raw_server["base_url"])
    try:
        deadline = asyncio.get_running_loop().time() + 5
        with pytest.raises(ProviderError) as info:
            await client.exchange_code("some-code", deadline=deadline)
        assert CUT[:4] not in f"{info.value} {info.value!r} {info.value.description}"
    finally:
        await client.aclose()


@settings(max_examples=150, deadline=None)
@given(
    key=st.sampled_from(["access_token", "refresh_token", "code", "client_secret", "id_token"]),
    value=st.text(alphabet="QZXJKW", min_size=1, max_size=80),
    before=st.text(alphabet='abcdefgh ",:{}[]', max_size=40),
    cut=st.integers(min_value=0, max_value=200),
    form=st.booleans(),
)
def test_excerpts_redact_secret_keys_by_structure(
    key: str, value: str, before: str, cut: int, form: bool
) -> None:
    whole = f"{before}{key}={value}&x=1" if form else f'{before}{{"{key}": "{value}", "x": 1}}'
    start = whole.index(value)
    body = whole[: max(start + 1, min(cut, len(whole)))].encode()
    assert not set("QZXJKW") & set(_excerpt(body))


async def test_a_malformed_answer_names_the_field_and_holds_no_token(make_sim: SimFactory) -> None:
    async with make_sim() as sim:
        client = OAuthClient(app_for(sim), timeout=2.0)
        try:
            code = sim.issue_code()
            sim.inject(Fault.MALFORMED_JSON)
            with pytest.raises(RequestInDoubt) as info:
                await client.exchange_code(code, deadline=asyncio.get_running_loop().time() + 5)
            assert "0123456789abcdef" not in f"{info.value} {info.value.description}"
            sim.inject(Fault.MISSING_FIELDS)
            with pytest.raises(RequestInDoubt) as info:
                await client.exchange_code(sim.issue_code(), deadline=asyncio.get_running_loop().time() + 5)
            assert "access_token is missing" in info.value.description
        finally:
            await client.aclose()


# -- 2. answers of other shapes ----------------------------------------------------------


@pytest.mark.parametrize("dialect", list(Dialect))
async def test_every_dialect_is_authoritative(make_sim: SimFactory, dialect: Dialect) -> None:
    async with make_sim(dialect=dialect, access_token_ttl=3600) as sim:
        async with TokenManager(app_for(sim), "memory://", lease_ttl=6.0, provider_timeout=2.0) as tm:
            await _connect(sim, tm)
            tokens = await tm.tokens("acme")
            assert tokens.expires_at is not None and abs(tokens.expires_at - time.time() - 3600) < 60
            assert tokens.refresh_token is not None and tokens.scope == "read write"
            for _ in range(2):
                refreshed = await tm.refresh("acme")
            assert sim.is_active(refreshed.access_token)
        stats = sim.stats
        assert (stats.exchanges, stats.refresh_attempts, stats.refreshes) == (1, 2, 2)
        _clean(sim)


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30))
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
#: What a token may hold: printable ASCII without spaces.
_TOKEN_ALPHABET = "".join(map(chr, range(0x21, 0x7F)))
_TOKEN_CHARS = st.sampled_from(_TOKEN_ALPHABET)

_GOOD_FIELDS = {
    "expires_in": st.one_of(
        st.integers(0, 10**6), st.floats(0, 10**6), st.integers(0, 10**6).map(str), st.none()
    ),
    "created_at": st.one_of(
        st.integers(0, 4 * 10**9),
        st.floats(0, 4 * 10**9),
        st.datetimes(timezones=st.just(__import__("datetime").UTC)).map(lambda d: d.isoformat()),
        st.none(),
    ),
    "token_type": st.sampled_from(["Bearer", "bearer", "BEARER", "BeArEr"]),
    "scope": st.one_of(st.text(max_size=20), st.lists(st.sampled_from(["read", "write"]), max_size=3)),
    "refresh_token": st.one_of(st.text(_TOKEN_CHARS, min_size=1, max_size=40), st.none()),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    access=st.text(_TOKEN_CHARS, min_size=1, max_size=60),
    fields=st.fixed_dictionaries({}, optional=_GOOD_FIELDS),
    extra=st.dictionaries(st.text(max_size=10).filter(lambda k: k not in _GOOD_FIELDS), _JSON, max_size=3),
)
def test_every_usable_answer_parses(access: str, fields: dict[str, Any], extra: dict[str, Any]) -> None:
    data = {**extra, **fields, "access_token": access}
    tokens = _token_set(data, sent_at=1000.0)
    assert tokens.access_token == access and tokens.token_type == "Bearer"
    if isinstance(fields.get("refresh_token"), str):
        assert tokens.refresh_token == fields["refresh_token"]
    if fields.get("expires_in") is not None:
        assert tokens.expires_at == pytest.approx(1000.0 + float(fields["expires_in"]))


@settings(max_examples=300, deadline=None)
@given(
    data=st.dictionaries(
        st.sampled_from([*_GOOD_FIELDS, "id_token", "error"]) | st.text(max_size=12), _JSON, max_size=6
    ),
    access=_JSON,
)
def test_any_other_shape_of_optional_fields_still_parses(data: dict[str, Any], access: Any) -> None:
    data = dict(data)
    data["access_token"] = "the-token"
    assert _token_set(data, sent_at=1.0).access_token == "the-token"
    if not (isinstance(access, str) and access and all(c in _TOKEN_ALPHABET for c in access)):
        data["access_token"] = access
        with pytest.raises(ValueError, match="access_token"):
            _token_set(data, sent_at=1.0)


@settings(max_examples=300, deadline=None)
@given(
    good=st.text(_TOKEN_CHARS, max_size=20),
    bad=st.characters(blacklist_characters=_TOKEN_ALPHABET),
    at=st.integers(0, 20),
)
def test_a_token_unfit_for_a_header_or_a_form_is_refused_by_name(good: str, bad: str, at: int) -> None:
    # CR/LF, NUL, a space, a lone surrogate, any non-ASCII: the access token could not be
    # sent (a typed in-doubt error, not aiohttp's ValueError later); a refresh token the
    # same is unreadable, and the current one is kept (but a space is allowed in it: it
    # goes in a form, and RFC 6749 allows it).
    token = good[:at] + bad + good[at:]
    with pytest.raises(ValueError, match=r"^access_token is (empty|not printable ASCII without spaces)$"):
        _token_set({"access_token": token}, sent_at=1.0)
    refresh = _token_set({"access_token": "a", "refresh_token": token}, sent_at=1.0).refresh_token
    assert refresh == (token if bad == " " and token.strip() else None)


_BAD_BODIES = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda n: (b"[" * n) + (b"]" * n)),
    st.integers(1, 3000).map(lambda n: (b'{"a":' * n) + b"1" + (b"}" * n)),
    st.just(b'{"access_token": "' + b"x" * (2 << 20) + b'"}'),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_BAD_BODIES)
def test_any_body_gives_tokens_or_a_typed_error(body: bytes) -> None:
    client = oauth_client("http://127.0.0.1:9")
    try:
        tokens = client._token_answer(200, body, "secret-sent", 1.0)
    except RequestInDoubt as exc:
        assert exc.status == 200 and "secret-sent" not in str(exc)
    else:
        assert tokens.access_token


async def test_a_2xx_with_a_token_is_never_sent_twice(make_sim: SimFactory) -> None:
    """Odd optional fields on a refresh answer never cause a resend of the refresh token."""
    async with make_sim(dialect=Dialect.LOOSE, access_token_ttl=3600) as sim:
        async with TokenManager(app_for(sim), "memory://", lease_ttl=6.0, provider_timeout=2.0) as tm:
            await _connect(sim, tm)
            await tm.refresh("acme")
        assert sim.stats.max_attempts_per_refresh_token == 1
        _clean(sim)


# -- 3. refresh answers without a refresh token ------------------------------------------


@pytest.mark.parametrize("mode", list(RefreshMode))
async def test_a_refresh_without_a_new_refresh_token_keeps_the_old_one(
    make_sim: SimFactory, mode: RefreshMode
) -> None:
    async with make_sim(rotate_refresh_tokens=False, refresh_mode=mode, access_token_ttl=3600) as sim:
        async with TokenManager(app_for(sim), "memory://", lease_ttl=6.0, provider_timeout=2.0) as tm:
            await _connect(sim, tm)
            original = (await tm.tokens("acme")).refresh_token
            for _ in range(3):
                await tm.refresh("acme")
            await asyncio.sleep(0.05)
            report = await tm.keep_alive(max_age=0.01, jitter=0, once=True)
            assert report.refreshed == ("acme",)
            tokens = await tm.tokens("acme")
            assert tokens.refresh_token == original and sim.is_refresh_usable(original)
            assert (await tm.tenants())[0].needs_reauthorization is False
        assert sim.stats.refreshes == 4
        _clean(sim)


async def test_a_kept_refresh_token_survives_a_rekey(make_sim: SimFactory) -> None:
    from factorial_tokens import Keyring

    old = Keyring.generate("k1")
    new = old.rotated("k2")
    async with make_sim(rotate_refresh_tokens=False, access_token_ttl=3600) as sim:
        store = MemoryStore()
        budgets: dict[str, Any] = {"lease_ttl": 6.0, "provider_timeout": 2.0}
        async with TokenManager(app_for(sim), store, keyring=old, **budgets) as tm:
            await _connect(sim, tm)
            original = (await tm.tokens("acme")).refresh_token
            await tm.refresh("acme")
        async with TokenManager(app_for(sim), store, keyring=new, **budgets) as tm:
            assert await tm.rekey(new) == 1
            assert (await tm.tokens("acme")).refresh_token == original
            await tm.refresh("acme")
            assert (await tm.tokens("acme")).refresh_token == original
        assert sim.stats.refreshes == 2
        _clean(sim)


# -- 4. store clients that retry, writes that are refused --------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_replayed_primitives_never_loop_nor_resend(
    make_sim: SimFactory, backend: str, tmp_path: Path
) -> None:
    """Every primitive run twice (a retrying client after lost replies): one exchange per
    code, one refresh, and each call ends with the right tokens."""
    async with make_sim() as sim, open_backend(backend, tmp_path) as opened:
        store = ReplayingStore(opened.store)
        async with TokenManager(app_for(sim), store, lease_ttl=3.0, provider_timeout=1.0) as tm:  # type: ignore[arg-type]
            code = sim.issue_code(company_id=1)
            tokens = await asyncio.wait_for(tm.exchange_code("acme", code), 15)
            again = await asyncio.wait_for(tm.exchange_code("acme", code), 15)
            assert again.access_token == tokens.access_token
            refreshed = await asyncio.wait_for(tm.refresh("acme"), 15)
            assert sim.is_active(refreshed.access_token)
            assert await tm.access_token("acme") == refreshed.access_token
        stats = sim.stats
        assert (stats.exchange_attempts, stats.refresh_attempts) == (1, 1)
        _clean(sim)


class _StuckClaimStore(HookedStore):
    """A store whose claims never advance (what a non-idempotent store answers a replay)."""

    async def advance_code(self, *args: Any, **kwargs: Any) -> bool:
        return False


async def test_every_exchange_loop_ends_by_its_deadline(make_sim: SimFactory) -> None:
    async with make_sim() as sim:
        store = _StuckClaimStore(MemoryStore())
        async with TokenManager(app_for(sim), store, lease_ttl=1.0, provider_timeout=0.5) as tm:  # type: ignore[arg-type]
            with pytest.raises(FactorialTokensError):
                await asyncio.wait_for(tm.exchange_code("acme", sim.issue_code()), 10)
        assert sim.stats.exchange_attempts == 0


async def test_a_refused_dead_mark_is_no_reauthorization(make_sim: SimFactory) -> None:
    """invalid_grant, then someone reconnects before the fenced dead-mark: the tenant is fine."""
    events: list[TokenEvent] = []
    async with make_sim(access_token_ttl=3600) as sim:
        inner = MemoryStore()
        store = HookedStore(inner)
        app = app_for(sim)
        async with (
            TokenManager(app, store, on_event=events.append, lease_ttl=6, provider_timeout=2) as tm,  # type: ignore[arg-type]
            TokenManager(app, inner, lease_ttl=6, provider_timeout=2) as other,
        ):
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            sim.revoke_company(1)
            reconnected: list[str] = []

            async def reconnect_first(lease: Any, update: Update) -> None:
                if update.status is TenantStatus.NEEDS_REAUTH and not reconnected:
                    fresh = await other.exchange_code("acme", sim.issue_code(company_id=1))
                    reconnected.append(fresh.access_token)

            store.hooks["commit"] = reconnect_first
            token = await tm.refresh("acme")
            assert reconnected and token.access_token == reconnected[0]
            assert (await tm.tenants())[0].needs_reauthorization is False
        assert EventKind.REAUTHORIZATION_REQUIRED not in [e.kind for e in events]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_revoking_an_unknown_tenant_leaves_nothing(
    make_sim: SimFactory, backend: str, tmp_path: Path
) -> None:
    async with make_sim() as sim, open_backend(backend, tmp_path) as opened:
        async with TokenManager(app_for(sim), opened.store, lease_ttl=3.0, provider_timeout=1.0) as tm:
            await tm.exchange_code("known", sim.issue_code(company_id=1))
            before = await _rows(opened, tmp_path)
            slots = len(opened.store._slots) if isinstance(opened.store, MemoryStore) else None
            for i in range(50):
                with pytest.raises(TenantNotConnected):
                    await tm.revoke(f"unknown-{i}")
                await tm.forget(f"unknown-{i}")
            assert await _rows(opened, tmp_path) == before
            if isinstance(opened.store, MemoryStore):
                assert len(opened.store._slots) == slots  # the tenant's, and its connection turn's


async def _rows(opened: Any, tmp_path: Path) -> object:
    """What the backend holds: SQLite's tenant rows, else the raw dump (Redis keys, Postgres rows)."""
    if opened.name == "sqlite":
        with contextlib.closing(sqlite3.connect(opened.url.removeprefix("sqlite:///"))) as conn:
            return conn.execute("SELECT namespace, tenant FROM tenants ORDER BY 1, 2").fetchall()
    return await opened.dump() if opened.dump else None


@pytest.mark.parametrize(
    "options",
    [{"answer_pieces": 0}, {"piece_delay": -1}, {"dialect": "loose"}],
)
def test_wire_options_are_checked(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FakeFactorial(**options)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=st.text(alphabet="QZXJKW", min_size=8, max_size=64),
    shape=st.sampled_from(["secret", "run", "json", "form"]),
    into=st.integers(min_value=1, max_value=90),
    filler=st.lists(
        st.one_of(
            st.integers(min_value=1, max_value=4000).map(lambda n: "a" * n),  # runs of 20+ collapse
            st.text(alphabet="bcdefgh -", min_size=1, max_size=30),
            st.just("ECHO"),  # the secret itself, whole: it collapses too
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_an_excerpt_of_a_long_body_shows_nothing_that_its_cut_split(
    value: str, shape: str, into: int, filler: list[str]
) -> None:
    """Only the start of a long body is redacted (a whole megabyte cost the loop a third of
    a second). What the cut splits, however much the redactions before it shrank the text,
    shows nothing of itself: a secret of the request, a long token-like run (``run``: 20+
    characters, not a known secret), the value of a secret key in JSON or in a form."""
    known = value if shape == "secret" else "not-in-the-body-0123456789"
    piece = {
        "secret": value,
        "run": " " + value * 3,  # 24+ characters: a run the whole body hides
        "json": '{"access_token": "' + value + '", "x": 1}',
        "form": "refresh_token=" + value + "&x=1",
    }[shape]
    echoes = shape == "secret"  # an echo of anything else would be a whole, unhidden value
    parts = [value if part == "ECHO" else part for part in filler if echoes or part != "ECHO"] or ["b"]
    at = _EXCERPT_BYTES - min(into, len(piece))  # the cut falls inside the piece (or after it)
    head, index = "", 0
    while len(head) + len(parts[index % len(parts)]) <= at:  # whole parts only: no piece
        head += parts[index % len(parts)]
        index += 1
    body = (head + "b" * (at - len(head)) + piece + " tail " * 10).encode()
    excerpt = _excerpt(body, known)
    assert not set("QZXJKW") & set(excerpt), excerpt


def test_a_nul_in_an_error_body_reads_the_same_whether_or_not_a_secret_is_hidden() -> None:
    """``_without_pieces`` marks what it hides with NUL: a body's own NULs were taken for
    hidden text when a secret was found anywhere in it, and not otherwise."""
    assert _excerpt(b"a\0b") == _excerpt(b"a\0b s3cret-value-1", "s3cret-value-1").removesuffix(" [redacted]")
    assert _excerpt(b"a\0b") == "a\ufffdb"

"""Secret hygiene, audited: no token, code, client secret or key in any log record, repr or
error; TLS verification on; hostile tenant ids confined to their own records on every store.

The secrets searched for are every one the simulator ever issued (read from its books, so
tokens the client never saw, such as the answer of a dropped request, count too), the
client secret, the authorization codes and the sealing keys.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import logging
import os
import ssl
import traceback
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from factorial_tokens import (
    CodeReused,
    ConfigurationError,
    EventKind,
    ExchangeInDoubt,
    FactorialApp,
    InvalidCallback,
    InvalidState,
    InvalidTenant,
    Keyring,
    ManagerClosed,
    ProviderError,
    ReauthorizationRequired,
    RefreshTimeout,
    RotationLost,
    StoreUnavailable,
    TenantNotConnected,
    TokenEvent,
    TokenManager,
    TokenSealError,
)
from factorial_tokens._logs import JsonFormatter
from factorial_tokens.sealing import SealedCodec
from factorial_tokens.store import Acquisition, ClaimState, MemoryStore, TenantKey, TenantStatus, Update
from factorial_tokens.store.sqlite import SQLiteStore
from factorial_tokens.testing import FakeFactorial, Fault

from .conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, SimFactory, app_for
from .stores import BACKENDS, Backend, open_backend

BUDGETS = {"lease_ttl": 3.0, "provider_timeout": 1.0, "refresh_deadline": 2.0}


def issued_secrets(sim: FakeFactorial) -> set[str]:
    """Every access token, refresh token and code the simulator ever issued."""
    found = sim.secrets_issued()
    assert found, "the simulator issued nothing: the audit would prove nothing"
    return found


def key_material(ring: Keyring) -> set[str]:
    out = set()
    for line in ring.export().splitlines():
        encoded = line.partition(":")[2]
        raw = base64.b64decode(encoded)
        out |= {encoded, base64.urlsafe_b64encode(raw).decode(), raw.hex()}
    return out


def assert_clean(texts: Iterable[str], secrets: set[str], where: str) -> int:
    """Fail if any secret occurs in any text; return how many texts were searched."""
    count = 0
    for text in texts:
        count += 1
        for secret in secrets:
            assert secret not in text, f"a secret leaked in {where}: {text[:300]!r}"
    return count


def exception_texts(exc: BaseException) -> list[str]:
    """str, repr, args and the formatted traceback of ``exc`` and its whole chain."""
    texts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current), repr(current.args)]
        current = current.__cause__ or current.__context__
    return texts


def log_texts(records: list[logging.LogRecord]) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    as_json = JsonFormatter()
    texts = []
    for record in records:
        texts += [formatter.format(record), as_json.format(record), repr(record.args), repr(record.msg)]
        if record.exc_info and record.exc_info[1] is not None:
            texts += exception_texts(record.exc_info[1])
    return texts


async def expect(error: type[BaseException], coro: object, caught: list[BaseException]) -> None:
    """Await ``coro`` and record the exception it must raise."""
    with pytest.raises(error) as info:
        await coro  # type: ignore[misc]
    caught.append(info.value)


# -- logs and errors through every path --------------------------------------------------


async def test_no_secret_in_logs_errors_or_events_through_every_path(
    make_sim: SimFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ring = Keyring.generate("k1")
    caught: list[BaseException] = []
    events: list[TokenEvent] = []
    store = SQLiteStore(tmp_path / "tokens.db")
    async with make_sim(access_token_ttl=3600) as sim:
        app = app_for(sim)
        async with TokenManager(app, store, keyring=ring, on_event=events.append, **BUDGETS) as tm:
            # The happy path: connect, serve, refresh, call the API, credentials.
            await tm.exchange_code("acme", sim.issue_code(company_id=1))
            await tm.exchange_code("globex", sim.issue_code(company_id=2))
            await tm.access_token("acme")
            await tm.refresh("acme")
            async with tm.client("acme") as api:
                sim.expire_access_tokens(1)  # a 401, a reload and one retry
                async with api.get(f"/api/{app.api_version}/resources/employees/employees") as resp:
                    assert resp.status == 200
            await tm.credentials("acme")
            # Provider faults: retried, in doubt, answered with HTML.
            for fault in (Fault.HTTP_500, Fault.RATE_LIMITED, Fault.HTML_ERROR, Fault.MALFORMED_JSON):
                sim.inject(fault, retry_after=0.1)
                await tm.refresh("acme")
            sim.inject(Fault.HTTP_503, times=20, retry_after=0.1)
            await expect(ProviderError, tm.refresh("acme"), caught)
            sim.clear_faults()
            # A refresh in doubt whose retry meets invalid_grant: the rotation was lost.
            sim.inject(Fault.DROP_AFTER)
            await expect(RotationLost, tm.refresh("acme"), caught)
            await expect(ReauthorizationRequired, tm.access_token("acme"), caught)
            # A dead grant: invalid_grant on refresh.
            sim.revoke_company(2)
            await expect(ReauthorizationRequired, tm.refresh("globex"), caught)
            # Code exchange: in doubt, refused, reused for another tenant, malformed.
            sim.inject(Fault.DROP_AFTER)
            await expect(ExchangeInDoubt, tm.exchange_code("acme", sim.issue_code(company_id=1)), caught)
            await expect(ProviderError, tm.exchange_code("acme", "not-a-code-" + "z" * 30), caught)
            code = sim.issue_code(company_id=1)
            await tm.exchange_code("acme", code)
            await expect(CodeReused, tm.exchange_code("initech", code), caught)
            await expect(InvalidCallback, tm.exchange_code("acme", "bad\ncode"), caught)
            # State, tenants.
            state = tm.authorization_url("acme").split("state=")[1].split("&")[0]
            await expect(InvalidState, _async(tm.tenant_from_state, state[:-3] + "xyz"), caught)
            await expect(InvalidTenant, tm.access_token("bad\ntenant"), caught)
            await expect(TenantNotConnected, tm.access_token("nobody"), caught)
            # A cross-tenant copy, then a wrong key.
            victim = await store.read(TenantKey(CLIENT_ID, "acme"))
            assert victim is not None
            await store.replace(TenantKey(CLIENT_ID, "initech"), Update(victim.payload))
            await expect(TokenSealError, tm.access_token("initech"), caught)
            async with TokenManager(app, store, keyring=Keyring.generate("k1"), **BUDGETS) as wrong:
                await expect(TokenSealError, wrong.access_token("acme"), caught)
            async with TokenManager(app, store, **BUDGETS) as keyless:
                await expect(TokenSealError, keyless.access_token("acme"), caught)
            # A lease that stays busy.
            held = await store.acquire(TenantKey(CLIENT_ID, "acme"), "someone", 30)
            assert held.lease is not None
            async with TokenManager(
                app, store, keyring=ring, lease_ttl=1, provider_timeout=0.5, wait_timeout=1.2
            ) as impatient:
                await expect(RefreshTimeout, impatient.refresh("acme"), caught)
            await store.release(held.lease)
            # Revoke at the provider, then forget.
            await tm.revoke("acme")
            await expect(TenantNotConnected, tm.access_token("acme"), caught)
            await tm.forget("globex")
        await expect(ManagerClosed, tm.access_token("acme"), caught)
        await store.aclose()
        await expect(StoreUnavailable, store.read(TenantKey(CLIENT_ID, "acme")), caught)
        try:
            Keyring.parse("k1:" + base64.b64encode(b"\x01" * 31).decode())
        except ConfigurationError as exc:
            caught.append(exc)
        secrets = issued_secrets(sim) | {CLIENT_SECRET} | key_material(ring)

    assert sim.stats.exchanges >= 4 and sim.stats.refreshes >= 6 and sim.stats.revocations == 1
    records = caplog.records
    assert {r.levelno for r in records} >= {logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR}
    assert assert_clean(log_texts(records), secrets, "a log record") > 50
    assert len(caught) == 19
    assert assert_clean([t for e in caught for t in exception_texts(e)], secrets, "an error") > 0
    kinds = {e.kind for e in events}
    assert {EventKind.EXCHANGED, EventKind.REFRESHED, EventKind.SEAL_ERROR, EventKind.REVOKED} <= kinds
    assert assert_clean([repr(e) for e in events], secrets, "an event") == len(events)


async def _async(fn: object, *args: object) -> object:
    return fn(*args)  # type: ignore[operator]


# -- reprs --------------------------------------------------------------------------------


async def test_no_secret_in_any_repr(sim: FakeFactorial, tmp_path: Path) -> None:
    ring = Keyring.generate("k1").rotated("k2")
    store = SQLiteStore(tmp_path / "tokens.db")
    key = TenantKey(CLIENT_ID, "acme")
    async with TokenManager(app_for(sim), store, keyring=ring, **BUDGETS) as tm:
        tokens = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        record = await store.read(key)
        assert record is not None
        acquisition = await store.acquire(key, "owner-secret-token-abcdef", 5)
        assert acquisition.lease is not None
        claim = await store.claim_code(key, "hash-of-a-code", "claim-owner-secret-abc", 5)
        infos = await tm.tenants()
        objects: list[object] = [
            tokens,
            app_for(sim),
            tm,
            store,
            MemoryStore(),
            acquisition,
            acquisition.lease,
            record,
            claim,
            Update(record.payload, TenantStatus.ACTIVE),
            Update(b"j1:" + tokens.access_token.encode()),
            ring,
            SealedCodec(ring),
            tm.client("acme"),
            infos[0],
            Acquisition(None, record),
        ]
        await store.release(acquisition.lease)
    await store.aclose()
    secrets = (
        issued_secrets(sim)
        | {CLIENT_SECRET, "owner-secret-token-abcdef", "claim-owner-secret-abc"}
        | key_material(ring)
        | {record.payload.decode()[6:]}  # the sealed body
    )
    texts = [text for obj in objects for text in (repr(obj), str(obj), f"{obj!r:>5}")]
    assert assert_clean(texts, secrets, "a repr") == 3 * len(objects)
    assert "sha256:" in repr(tokens)  # fingerprints stand in for the tokens
    assert claim.state is ClaimState.CLAIMED


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw-S3cret-redis@127.0.0.1:6379/0?prefix=ftreprtest",
        "redis://user:pw-S3cret-redis@127.0.0.1:6379/0?prefix=ftreprtest",
        "postgresql://postgres:pw-S3cret-pg@127.0.0.1:1/test?schema=ft_repr_test&connect_timeout=2",
    ],
)
async def test_store_reprs_and_errors_hide_url_passwords(url: str) -> None:
    from factorial_tokens.store import store_from_url

    store = store_from_url(url)
    try:
        assert "pw-S3cret" not in repr(store) and "pw-S3cret" not in str(store)
        # A password the server does not expect, or no server: an error that must not echo it.
        with pytest.raises(StoreUnavailable) as info:
            await store.check()
        assert assert_clean(exception_texts(info.value), {"pw-S3cret"}, "a store error") > 0
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "nosuchstore://user:pw-S3cret-kit@host/db",  # the registry: an unknown scheme
        "rediss+cluster://:pw-S3cret-kit@127.0.0.1:7000?poll=-1",
        "sqlite:///tokens.db?password=pw-S3cret-kit",  # an unknown option: named, its value not shown
        "redis://:pw-S3cret-kit@127.0.0.1:6379/0?poll=soon",
        "redis://:pw-S3cret-kit@127.0.0.1:notaport/0",
        "postgresql://u:pw-S3cret-kit@127.0.0.1:5432/test?pgbouncer=maybe",
        "postgresql://u:pw-S3cret-kit@127.0.0.1:5432/test?schema=bad;schema",
    ],
)
def test_store_url_errors_never_echo_a_password(url: str) -> None:
    """The kit's registry and URL option parsing, and the plugins' URL checks, refuse a
    bad store URL without quoting its password (an unknown option is named, not shown)."""
    from factorial_tokens.store import store_from_url

    with pytest.raises(ConfigurationError) as info:
        store_from_url(url)
    assert assert_clean(exception_texts(info.value), {"pw-S3cret-kit"}, "a store URL error") > 0


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("base_url", "https://user:pw-S3cret-app@api.factorial.example"),  # sent in every link
        ("redirect_uri", "https://user:pw-S3cret-app@app.example/cb"),
        ("base_url", "ftp://user:pw-S3cret-app@api.factorial.example"),  # refused for its scheme
    ],
)
def test_app_urls_with_credentials_are_refused_without_quoting_them(field: str, url: str) -> None:
    """An app URL holding a password was accepted (and put in every authorization URL a
    browser gets), and a refused one was quoted whole in the error, password included."""
    urls = {"base_url": "https://api.factorial.example", "redirect_uri": "https://app.example/cb", field: url}
    with pytest.raises(ValueError, match=field) as info:
        FactorialApp(client_id="c", client_secret="s", **urls)
    assert "pw-S3cret-app" not in str(info.value)


async def test_a_lost_push_subscription_logs_no_password(caplog: pytest.LogCaptureFixture) -> None:
    """PushListener logs the class of a lost subscription's error, never its message (a
    driver's message may carry the URL, host or user)."""
    from collections.abc import Callable

    from factorial_tokens.store import Notifier, PushListener

    tries = 0

    class Failing(PushListener):
        async def listen(self, connected: Callable[[], None]) -> None:
            nonlocal tries
            tries += 1
            raise ConnectionError("cannot reach redis://:pw-S3cret-push@db.internal:6379/0")

    log = logging.getLogger("factorial_tokens.kit")
    listener = Failing(Notifier(), name="kit", log=log, backoff=(0.01, 0.01))
    caplog.set_level(logging.DEBUG)
    listener.start()
    try:
        await listener.ready(5)
        while tries < 2:
            await asyncio.sleep(0.01)
    finally:
        await listener.aclose()
    records = [r for r in caplog.records if r.name == "factorial_tokens.kit"]
    assert records and "ConnectionError" in records[0].getMessage()
    assert assert_clean([*log_texts(records), repr(listener)], {"pw-S3cret-push"}, "a listener log") > 0


# -- TLS ----------------------------------------------------------------------------------


async def test_tls_verification_is_on_by_default(sim: FakeFactorial) -> None:
    async with TokenManager(app_for(sim), "memory://", **BUDGETS) as tm:
        connector = tm._oauth.session.connector
        assert connector is not None
        assert getattr(connector, "_ssl", None) is not False  # aiohttp's default: verify
        assert tm._oauth.session.connector is tm.client("acme")._session.connector


def _self_signed(tmp_path: Path) -> ssl.SSLContext:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(san, critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


@pytest.fixture
async def self_signed_server(tmp_path: Path) -> AsyncIterator[tuple[str, list[str], Path]]:
    """An https:// server with a self-signed certificate that records what reaches it."""
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"access_token": "x" * 64, "token_type": "Bearer", "expires_in": 60})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_self_signed(tmp_path))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"https://127.0.0.1:{port}", seen, tmp_path / "cert.pem"
    finally:
        await runner.cleanup()


async def test_a_self_signed_provider_is_refused(self_signed_server: tuple[str, list[str], Path]) -> None:
    base_url, seen, cert_path = self_signed_server
    app = FactorialApp(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT_URI, base_url=base_url
    )
    async with TokenManager(app, "memory://", **BUDGETS) as tm:
        with pytest.raises(ProviderError) as info:
            await tm.exchange_code("acme", "a-code-for-a-fake-server")
        assert info.value.status is None and info.value.error == "connection_error"
        assert "ClientConnectorCertificateError" in info.value.description  # refused for its cert
        assert seen == []  # the handshake failed: no request, no client secret, reached it
        with pytest.raises(TenantNotConnected):
            await tm.access_token("acme")
    # The control: a client that trusts this certificate does reach the server.
    trusting = ssl.create_default_context(cafile=str(cert_path))
    async with aiohttp.ClientSession() as session, session.get(base_url + "/ping", ssl=trusting) as resp:
        assert resp.status == 200
    assert seen == ["/ping"]


# -- hostile tenant ids ----------------------------------------------------------------------

#: Valid (if odd) tenant ids that look like key patterns, separators, SQL or wildcards.
ODD = [
    "*",
    "acme*",
    "{acme}",
    "{",
    "}",
    ":",
    "acme:",
    ":acme",
    "acme:lease",
    "a?me",
    "[a-z]*",
    "%",
    "acm%",
    "_cme",
    "'",
    '"',
    "acme' OR '1'='1",
    '"; DROP TABLE tenants; --',
    "\\",
    "acme\\",
    "ACME",
    "acme ",
    " acme",
    "\uff41\uff43\uff4d\uff45",  # a fullwidth lookalike of acme
    "x" * 200,
]
#: Tenant ids refused at the edge: they never reach a store.
REFUSED = ["acme\n", "\nacme", "ac\rme", "acme\x00", "\t", "", "x" * 201, "x" * 10_240, "\x1b[31m"]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with open_backend(request.param, tmp_path) as opened:
        yield opened


async def test_hostile_tenant_ids_stay_in_their_own_record(backend: Backend, sim: FakeFactorial) -> None:
    store = backend.store
    async with TokenManager(app_for(sim), store, **BUDGETS) as tm:
        victim = await tm.exchange_code("acme", sim.issue_code(company_id=1))
        for tenant in ODD:  # nothing to read yet: not the victim's token, not anyone's
            with pytest.raises(TenantNotConnected):
                await tm.access_token(tenant)
        for tenant in REFUSED:
            for call in (tm.access_token, tm.refresh, tm.tokens, tm.forget, tm.revoke):
                with pytest.raises(InvalidTenant):
                    await call(tenant)
            with pytest.raises(InvalidTenant):
                await tm.exchange_code(tenant, sim.issue_code(company_id=99))
        own = {}
        for number, tenant in enumerate(ODD, 10):
            own[tenant] = (await tm.exchange_code(tenant, sim.issue_code(company_id=number))).access_token
        for tenant in ODD:
            await tm.refresh(tenant)
        listed = [info.tenant for info in await tm.tenants()]
        assert sorted(listed) == sorted([*ODD, "acme"])
        assert await tm.access_token("acme") == victim.access_token
        for tenant in ODD:
            token = await tm.access_token(tenant)
            assert token not in (victim.access_token, own[tenant])  # its own, refreshed token
            assert sim.is_active(token)
        for tenant in ODD:  # forgetting every odd id leaves the victim alone
            await tm.forget(tenant)
        assert [info.tenant for info in await tm.tenants()] == ["acme"]
        assert await tm.access_token("acme") == victim.access_token
        assert (await tm.refresh("acme")).access_token != victim.access_token
    assert sim.stats.invalid_grant == 0 and sim.stats.families_revoked == 0


@pytest.mark.parametrize(
    "other", ["*", "%", "app-client-id*", "app-client-id%", "app-client-%", "_pp-client-id"]
)
async def test_a_hostile_client_id_cannot_list_or_read_another_apps_tenants(
    backend: Backend, sim: FakeFactorial, other: str
) -> None:
    store = backend.store
    sim.add_client(other, "other-secret", REDIRECT_URI)
    intruder = FactorialApp(
        client_id=other, client_secret="other-secret", redirect_uri=REDIRECT_URI, base_url=sim.base_url
    )
    async with (
        TokenManager(app_for(sim), store, **BUDGETS) as tm,
        TokenManager(intruder, store, **BUDGETS) as bad,
    ):
        await tm.exchange_code("acme", sim.issue_code(company_id=1))
        assert await bad.tenants() == []
        with pytest.raises(TenantNotConnected):
            await bad.access_token("acme")
        await bad.forget("acme")
        assert [i.tenant for i in await tm.tenants()] == ["acme"]
        assert await store.read(TenantKey(CLIENT_ID, "acme")) is not None


def test_a_ten_kilobyte_tenant_id_is_refused_before_any_work(sim: FakeFactorial) -> None:
    tm = TokenManager(app_for(sim), "memory://", **BUDGETS)
    for hostile in ("x" * 10_240, "{" * 10_240, "'" * 10_240, "*" * 10_240):
        with pytest.raises(InvalidTenant) as info:
            tm.authorization_url(hostile)
        assert len(str(info.value)) < 200  # the error does not echo 10 kB back


# -- the connect server: error pages and redirects ----------------------------------------


async def test_connect_pages_hold_no_secret_and_never_redirect_elsewhere(
    sim: FakeFactorial, tmp_path: Path
) -> None:
    from urllib.parse import parse_qs, urlencode, urlsplit

    from aiohttp.test_utils import TestClient, TestServer

    from factorial_tokens.web import connect_app

    ring = Keyring.generate("k1")
    store = SQLiteStore(tmp_path / "tokens.db")
    provider = urlsplit(sim.base_url).netloc
    pages: list[str] = []
    async with TokenManager(app_for(sim), store, keyring=ring, **BUDGETS) as tm:
        client = TestClient(TestServer(connect_app(tm)))
        await client.start_server()
        try:

            async def get(path: str, **params: str) -> aiohttp.ClientResponse:
                url = path + ("?" + urlencode(params) if params else "")
                resp = await client.get(url, allow_redirects=False)
                pages.append(await resp.text())
                return resp

            def link(tenant: str) -> str:
                return parse_qs(urlsplit(tm.connect_link(tenant)).query)["link"][0]

            async def authorize(tenant: str) -> dict[str, str]:
                resp = await get(f"/connect/{tenant}", link=link(tenant))
                assert resp.status == 302
                query = parse_qs(urlsplit(await sim.authorize(resp.headers["Location"])).query)
                return {name: values[0] for name, values in query.items()}

            # The happy path, a replay, the same state with another code, a refused code.
            first = await authorize("acme")
            assert (await get("/oauth/callback", **first)).status == 200
            assert (await get("/oauth/callback", **first)).status == 200
            other = sim.issue_code(company_id=1)
            assert (await get("/oauth/callback", state=first["state"], code=other)).status == 409
            fresh = await authorize("globex")
            refused = await get("/oauth/callback", state=fresh["state"], code="bogus-" + "c" * 40)
            assert refused.status == 502
            assert (await get("/oauth/callback", state=first["state"][:-4] + "AAAA", code="x")).status == 400
            hostile = await get("/oauth/callback", error="<script>alert(1)</script>", state=fresh["state"])
            assert hostile.status == 400 and "<script>" not in pages[-1]
            # Open-redirect attempts: the callback never redirects; /connect only to Factorial.
            lures = {"next": "https://evil.example/", "redirect_uri": "https://evil.example/cb"}
            lures |= {"return_to": "//evil.example", "error_uri": "https://evil.example/"}
            for params in ({**first, **lures}, {**lures}, {"error": "access_denied", **lures}):
                resp = await get("/oauth/callback", **params)
                assert resp.status < 300 or resp.status >= 400
                assert "Location" not in resp.headers and "evil.example" not in pages[-1]
            for path, tenant in (
                ("/connect/acme", "acme"),
                ("/connect/%2F%2Fevil.example", "//evil.example"),
                ("/connect/https:%2F%2Fevil.x", "https://evil.x"),
            ):
                resp = await get(path, link=link(tenant), **lures)
                assert resp.status == 302
                target = urlsplit(resp.headers["Location"])
                assert target.netloc == provider and target.path == "/oauth/authorize"
                assert parse_qs(target.query)["redirect_uri"] == [REDIRECT_URI]
            assert (await get("/connect/" + "x" * 300)).status == 400
        finally:
            await client.close()
        assert await tm.access_token("acme")
    await store.aclose()
    secrets = issued_secrets(sim) | {CLIENT_SECRET} | key_material(ring)
    assert assert_clean(pages, secrets, "a connect page") == len(pages) == 15


# -- the CLI ---------------------------------------------------------------------------


def test_cli_output_holds_no_secret_but_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import subprocess
    import sys

    from click.testing import CliRunner

    from factorial_tokens.cli._commands import main

    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("FACTORIAL_TOKENS_KEYS", raising=False)
    db = tmp_path / "tokens.db"
    with FakeFactorial(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uri=REDIRECT_URI
    ).serve_in_thread() as sim:
        env = {
            "FACTORIAL_CLIENT_ID": CLIENT_ID,
            "FACTORIAL_CLIENT_SECRET": CLIENT_SECRET,
            "FACTORIAL_REDIRECT_URI": REDIRECT_URI,
            "FACTORIAL_BASE_URL": sim.base_url,
            "FACTORIAL_TOKENS_STORE": f"sqlite:///{db}",
        }
        runner = CliRunner(env=env)
        outputs: list[str] = []

        def cli(*args: str, code: int = 0) -> str:
            result = runner.invoke(main, list(args), catch_exceptions=False)
            assert result.exit_code == code, (args, result.stdout, result.stderr)
            outputs.extend([result.stdout, result.stderr])
            return result.stdout

        cli("keygen", "--keys-file", f"{db}.keys")  # keys only where told
        ring = Keyring.from_file(f"{db}.keys")
        env["FACTORIAL_TOKENS_KEYS"] = ring.export().strip()
        runner.env = env

        async def connect() -> None:
            async with TokenManager(app_for(sim), f"sqlite:///{db}", keyring=ring, **BUDGETS) as tm:
                await tm.exchange_code("acme", sim.issue_code(company_id=1))
                await tm.exchange_code("globex", sim.issue_code(company_id=2))

        asyncio.run(connect())
        cli("status")
        cli("status", "--json")
        cli("refresh", "acme")
        cli("whoami", "acme")
        cli("whoami", "--json", "globex")
        cli("connect-url", "acme")
        cli("keepalive", "--once", "--max-age", "1s", "--jitter", "0")
        cli("rekey")
        cli("refresh", "nobody", code=3)
        # A real process with -vv: DEBUG logs on its real stderr.
        verbose = subprocess.run(
            [sys.executable, "-m", "factorial_tokens", "-vv", "refresh", "acme"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert verbose.returncode == 0 and "DEBUG" in verbose.stderr, verbose.stderr
        outputs += [verbose.stdout, verbose.stderr]
        sim.revoke_company(2)
        cli("refresh", "globex", code=4)
        runner.env = {**env, "FACTORIAL_TOKENS_KEYS": Keyring.generate("k1").export().strip()}
        cli("refresh", "acme", code=6)  # a wrong key: a seal error, no token printed
        runner.env = env
        printed = runner.invoke(main, ["token", "acme"])  # the one command that prints a token
        assert printed.exit_code == 0 and printed.stdout.strip() in sim.secrets_issued()
        assert sim.is_active(printed.stdout.strip())
        cli("revoke", "acme")
        cli("token", "acme", code=3)
        cli("token", "globex", code=4)
        secrets = issued_secrets(sim) | {CLIENT_SECRET} | key_material(ring)
    assert assert_clean(outputs, secrets, "CLI output") == len(outputs) == 32
    assert assert_clean(log_texts(caplog.records), secrets, "a CLI log record") > 10
    assert sim.stats.revocations == 1

"""The simulator itself: every behaviour the suites rely on, driven with plain aiohttp."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import pytest

from factorial_tokens.testing import FakeFactorial, Fault, RefreshMode, SimulatorStats
from factorial_tokens.testing._server import AuthorizationRejected

HEX64 = re.compile(r"^[0-9a-f]{64}$")


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)


@pytest.fixture
async def sim() -> AsyncIterator[FakeFactorial]:
    async with FakeFactorial() as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    sim: FakeFactorial,
    path: str,
    data: dict[str, str],
    **kwargs: Any,
) -> Answer:
    async with http.post(sim.base_url + path, data=data, **kwargs) as resp:
        return Answer(resp.status, dict(resp.headers), await resp.text())


async def get(http: aiohttp.ClientSession, sim: FakeFactorial, path: str, token: str | None = None) -> Answer:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with http.get(sim.base_url + path, headers=headers) as resp:
        return Answer(resp.status, dict(resp.headers), await resp.text())


async def exchange(http: aiohttp.ClientSession, sim: FakeFactorial, code: str, **overrides: str) -> Answer:
    data = {
        "client_id": sim.client_id,
        "client_secret": sim.client_secret,
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": sim.redirect_uri,
    }
    data.update(overrides)
    return await post(http, sim, "/oauth/token", data)


async def refresh(
    http: aiohttp.ClientSession, sim: FakeFactorial, refresh_token: str, **kwargs: Any
) -> Answer:
    data = {
        "client_id": sim.client_id,
        "client_secret": sim.client_secret,
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
    }
    return await post(http, sim, "/oauth/token", data, **kwargs)


async def revoke(
    http: aiohttp.ClientSession,
    sim: FakeFactorial,
    token: str,
    client_id: str | None = None,
    client_secret: str | None = None,
) -> Answer:
    data = {
        "client_id": client_id or sim.client_id,
        "client_secret": client_secret or sim.client_secret,
        "token": token,
    }
    return await post(http, sim, "/oauth/revoke", data)


async def connect(http: aiohttp.ClientSession, sim: FakeFactorial, **issue: Any) -> dict[str, Any]:
    answer = await exchange(http, sim, sim.issue_code(**issue))
    assert answer.status == 200, answer.text
    body: dict[str, Any] = answer.json
    return body


def credentials_path(version: str = "2025-10-01") -> str:
    return f"/api/{version}/resources/api_public/credentials"


def authorize_url(sim: FakeFactorial, **params: str) -> str:
    query = {
        "client_id": sim.client_id,
        "redirect_uri": sim.redirect_uri,
        "response_type": "code",
    }
    query.update(params)
    return f"{sim.base_url}/oauth/authorize?{urllib.parse.urlencode(query)}"


# ---------------------------------------------------------------------- authorize


async def test_authorize_redirects_with_code_and_echoes_state(
    sim: FakeFactorial, http: aiohttp.ClientSession
) -> None:
    state = "a b&c=d/é+%"
    location = await sim.authorize(authorize_url(sim, state=state, scope="read"))
    assert location.startswith(sim.redirect_uri + "?")
    params = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
    assert params["state"] == [state]
    (code,) = params["code"]
    answer = await exchange(http, sim, code)
    assert answer.status == 200
    assert answer.json["scope"] == "read"
    stats = sim.stats
    assert (stats.authorize_requests, stats.codes_issued, stats.exchanges) == (1, 1, 1)


async def test_authorize_without_state_has_no_state(sim: FakeFactorial) -> None:
    location = await sim.authorize(authorize_url(sim))
    params = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
    assert set(params) == {"code"}


async def test_authorize_uses_queued_owner_then_fresh_ids(
    sim: FakeFactorial, http: aiohttp.ClientSession
) -> None:
    sim.next_owner(company_id=42, employee_id=7)
    sim.next_owner(company_id=43)
    owners = []
    for _ in range(3):
        location = await sim.authorize(authorize_url(sim))
        code = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["code"][0]
        tokens = (await exchange(http, sim, code)).json
        owners.append((await get(http, sim, credentials_path(), tokens["access_token"])).json)
    first, second, third = (o["data"][0] for o in owners)
    assert (first["company_id"], first["employee_id"]) == (42, 7)
    assert second["company_id"] == 43
    assert isinstance(second["employee_id"], int)
    assert third["company_id"] not in (42, 43)
    assert sim.stats.exchanges_by_company == {42: 1, 43: 1, third["company_id"]: 1}


async def test_authorize_company_token(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    sim.next_owner(company_id=5)
    location = await sim.authorize(authorize_url(sim, resource_owner_type="company"))
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["code"][0]
    tokens = (await exchange(http, sim, code)).json
    assert "expires_in" not in tokens
    assert "refresh_token" not in tokens
    item = (await get(http, sim, credentials_path(), tokens["access_token"])).json["data"][0]
    assert item["company_id"] == 5
    assert "employee_id" not in item


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"client_id": "nope"}, "invalid_client"),
        ({"redirect_uri": "http://127.0.0.1/other"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"resource_owner_type": "robot"}, "invalid_request"),
    ],
)
async def test_authorize_errors(sim: FakeFactorial, params: dict[str, str], error: str) -> None:
    with pytest.raises(AuthorizationRejected) as info:
        await sim.authorize(authorize_url(sim, **params))
    assert info.value.status == 400
    assert json.loads(info.value.body)["error"] == error
    assert sim.stats.codes_issued == 0


# ---------------------------------------------------------------------- code exchange


async def test_token_response_shape(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    answer = await exchange(http, sim, sim.issue_code(scope="read write"))
    assert answer.status == 200
    assert answer.headers["Cache-Control"] == "no-store"
    body = answer.json
    assert set(body) == {
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "scope",
        "created_at",
    }
    assert HEX64.match(body["access_token"])
    assert HEX64.match(body["refresh_token"])
    assert body["access_token"] != body["refresh_token"]
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 7200
    assert body["scope"] == "read write"
    assert isinstance(body["created_at"], int)
    assert abs(body["created_at"] - time.time()) < 5


async def test_expires_in_is_an_integer_of_the_ttl(http: aiohttp.ClientSession) -> None:
    async with FakeFactorial(access_token_ttl=90.4) as sim:
        body = await connect(http, sim)
    assert body["expires_in"] == 90


async def test_code_is_single_use_and_reuse_revokes_family(
    sim: FakeFactorial, http: aiohttp.ClientSession
) -> None:
    code = sim.issue_code(company_id=1)
    tokens = (await exchange(http, sim, code)).json
    assert sim.is_active(tokens["access_token"])
    second = await exchange(http, sim, code)
    assert second.status == 400
    assert second.json["error"] == "invalid_grant"
    assert not sim.is_active(tokens["access_token"])
    assert not sim.is_refresh_usable(tokens["refresh_token"])
    assert not sim.family_alive(1)
    stats = sim.stats
    assert stats.exchanges == 1
    assert stats.exchanges_by_code == {code: 1}
    assert stats.exchange_attempts_by_code == {code: 2}
    assert stats.max_attempts_per_code == 2
    assert stats.invalid_grant == 1
    assert stats.invalid_grant_by_cause == {"code_reused": 1}
    assert stats.families_revoked == 1
    assert stats.families_revoked_by_cause == {"code_reused": 1}
    # The family is dead for the refresh token too.
    answer = await refresh(http, sim, tokens["refresh_token"])
    assert answer.json["error"] == "invalid_grant"
    assert sim.stats.invalid_grant_by_cause["family_revoked"] == 1


async def test_code_reuse_without_reuse_detection_keeps_tokens(
    http: aiohttp.ClientSession,
) -> None:
    async with FakeFactorial(reuse_detection=False) as sim:
        code = sim.issue_code(company_id=1)
        tokens = (await exchange(http, sim, code)).json
        assert (await exchange(http, sim, code)).json["error"] == "invalid_grant"
        assert sim.is_active(tokens["access_token"])
        assert sim.stats.families_revoked == 0


async def test_code_errors(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    assert (await exchange(http, sim, "no-such-code")).json["error"] == "invalid_grant"

    code = sim.issue_code()
    wrong = await exchange(http, sim, code, redirect_uri="http://127.0.0.1/elsewhere")
    assert wrong.json["error"] == "invalid_grant"
    # A mismatched redirect does not consume the code.
    assert (await exchange(http, sim, code)).status == 200

    late = sim.issue_code()
    sim.advance_time(601)
    assert (await exchange(http, sim, late)).json["error"] == "invalid_grant"

    sim.add_client("other", "other-secret", "http://127.0.0.1/other")
    foreign = sim.issue_code(client_id="other")
    assert (await exchange(http, sim, foreign)).json["error"] == "invalid_grant"

    assert sim.stats.invalid_grant_by_cause == {
        "code_unknown": 1,
        "redirect_mismatch": 1,
        "code_expired": 1,
        "code_client_mismatch": 1,
    }
    assert sim.stats.exchanges == 1
    assert sim.stats.families_revoked == 0


async def test_client_authentication_and_malformed_requests(
    sim: FakeFactorial, http: aiohttp.ClientSession
) -> None:
    code = sim.issue_code()
    bad = await exchange(http, sim, code, client_secret="wrong")
    assert bad.status == 401
    assert bad.json["error"] == "invalid_client"
    assert "error_description" in bad.json

    as_json = await http.post(
        sim.base_url + "/oauth/token",
        json={
            "client_id": sim.client_id,
            "client_secret": sim.client_secret,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": sim.redirect_uri,
        },
    )
    async with as_json:
        assert as_json.status == 400
        assert (await as_json.json())["error"] == "invalid_request"

    no_grant = await post(http, sim, "/oauth/token", {"client_id": sim.client_id, "client_secret": "x"})
    assert (no_grant.status, no_grant.json["error"]) == (400, "invalid_request")
    password = await exchange(http, sim, code, grant_type="password")
    assert (password.status, password.json["error"]) == (400, "unsupported_grant_type")
    no_code = await exchange(http, sim, "")
    assert (no_code.status, no_code.json["error"]) == (400, "invalid_request")

    # HTTP Basic client authentication works; the code was never consumed above.
    basic_credentials = base64.b64encode(f"{sim.client_id}:{sim.client_secret}".encode()).decode()
    basic = await post(
        http,
        sim,
        "/oauth/token",
        {"grant_type": "authorization_code", "code": code, "redirect_uri": sim.redirect_uri},
        headers={"Authorization": "Basic " + basic_credentials},
    )
    assert basic.status == 200
    stats = sim.stats
    assert stats.invalid_client == 1
    assert stats.invalid_request == 3
    assert stats.unsupported_grant_type == 1
    assert stats.token_requests == 6
    assert stats.exchanges == 1
    assert stats.invalid_grant == 0


# ---------------------------------------------------------------------- refresh


async def test_refresh_revoke_at_refresh(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    first = await connect(http, sim, company_id=9)
    answer = await refresh(http, sim, first["refresh_token"])
    assert answer.status == 200
    assert answer.headers["Cache-Control"] == "no-store"
    second = answer.json
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert second["scope"] == first["scope"]
    assert not sim.is_active(first["access_token"])
    assert sim.is_active(second["access_token"])
    assert sim.live_pairs(9) == 1
    owner = (await get(http, sim, credentials_path(), second["access_token"])).json
    assert owner["data"][0]["company_id"] == 9
    assert sim.stats.refreshes_by_company == {9: 1}

    # Reuse of the rotated refresh token: invalid_grant, and the whole family dies.
    reused = await refresh(http, sim, first["refresh_token"])
    assert (reused.status, reused.json["error"]) == (400, "invalid_grant")
    assert not sim.is_active(second["access_token"])
    assert not sim.family_alive(9)
    stats = sim.stats
    assert stats.refreshes == 1
    assert stats.invalid_grant_by_cause == {"refresh_rotated": 1}
    assert stats.families_revoked_by_cause == {"refresh_reused": 1}
    assert stats.refresh_attempts_by_token == {first["refresh_token"]: 2}


async def test_rotated_token_without_reuse_detection(http: aiohttp.ClientSession) -> None:
    async with FakeFactorial(reuse_detection=False) as sim:
        first = await connect(http, sim, company_id=1)
        second = (await refresh(http, sim, first["refresh_token"])).json
        assert (await refresh(http, sim, first["refresh_token"])).status == 400
        assert sim.is_active(second["access_token"])
        assert sim.stats.families_revoked == 0
        assert sim.stats.invalid_grant_by_cause == {"refresh_rotated": 1}


async def test_unknown_refresh_token(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    answer = await refresh(http, sim, "f" * 64)
    assert (answer.status, answer.json["error"]) == (400, "invalid_grant")
    assert sim.stats.invalid_grant_by_cause == {"refresh_unknown": 1}


async def test_concurrent_refresh_revoke_at_refresh_one_wins(
    sim: FakeFactorial, http: aiohttp.ClientSession
) -> None:
    first = await connect(http, sim, company_id=3)
    answers = await asyncio.gather(*(refresh(http, sim, first["refresh_token"]) for _ in range(5)))
    assert sorted(a.status for a in answers) == [200, 400, 400, 400, 400]
    stats = sim.stats
    assert stats.refreshes == 1
    assert stats.refresh_attempts == 5
    assert stats.invalid_grant == 4
    # The first loser presented a rotated token: a strict server kills the grant, and
    # the later losers hit a revoked family.
    assert stats.invalid_grant_by_cause == {"refresh_rotated": 1, "family_revoked": 3}
    assert stats.families_revoked == 1
    assert not sim.family_alive(3)


async def test_concurrent_refresh_revoke_on_first_use_all_succeed(
    http: aiohttp.ClientSession,
) -> None:
    async with FakeFactorial(refresh_mode=RefreshMode.REVOKE_ON_FIRST_USE) as sim:
        first = await connect(http, sim, company_id=3)
        answers = await asyncio.gather(*(refresh(http, sim, first["refresh_token"]) for _ in range(5)))
        assert [a.status for a in answers] == [200] * 5
        assert len({a.json["access_token"] for a in answers}) == 5
        assert sim.live_pairs(3) == 6
        assert sim.stats.refreshes == 5
        # The first use of one new access token revokes the pair it came from.
        used = answers[0].json["access_token"]
        assert (await get(http, sim, credentials_path(), used)).status == 200
        assert sim.live_pairs(3) == 5
        assert not sim.is_active(first["access_token"])
        # Any later use of the superseded refresh token fails and kills the grant.
        late = await refresh(http, sim, first["refresh_token"])
        assert late.json["error"] == "invalid_grant"
        assert sim.live_pairs(3) == 0
        assert sim.stats.invalid_grant_by_cause == {"refresh_rotated": 1}
        assert sim.stats.families_revoked == 1


async def test_revoke_on_first_use_old_pair_lives_until_new_token_used(
    http: aiohttp.ClientSession,
) -> None:
    async with FakeFactorial(refresh_mode=RefreshMode.REVOKE_ON_FIRST_USE) as sim:
        first = await connect(http, sim)
        second = (await refresh(http, sim, first["refresh_token"])).json
        assert (await get(http, sim, credentials_path(), first["access_token"])).status == 200
        assert sim.is_refresh_usable(first["refresh_token"])
        assert (await get(http, sim, credentials_path(), second["access_token"])).status == 200
        old = await get(http, sim, credentials_path(), first["access_token"])
        assert old.status == 401
        assert not sim.is_refresh_usable(first["refresh_token"])
        assert sim.is_active(second["access_token"])


async def test_revoke_on_first_use_refreshing_with_new_token_revokes_previous(
    http: aiohttp.ClientSession,
) -> None:
    async with FakeFactorial(refresh_mode=RefreshMode.REVOKE_ON_FIRST_USE) as sim:
        first = await connect(http, sim)
        second = (await refresh(http, sim, first["refresh_token"])).json
        assert sim.is_active(first["access_token"])
        third = (await refresh(http, sim, second["refresh_token"])).json
        assert not sim.is_active(first["access_token"])
        assert sim.is_active(second["access_token"])
        assert sim.is_active(third["access_token"])
        assert sim.stats.refreshes == 2


async def test_refresh_token_ttl(http: aiohttp.ClientSession) -> None:
    async with FakeFactorial(refresh_token_ttl=100) as sim:
        tokens = await connect(http, sim)
        sim.advance_time(101)
        answer = await refresh(http, sim, tokens["refresh_token"])
        assert answer.json["error"] == "invalid_grant"
        assert sim.stats.invalid_grant_by_cause == {"refresh_expired": 1}
        assert sim.stats.families_revoked == 0


async def test_refresh_with_another_clients_token(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    tokens = await connect(http, sim)
    sim.add_client("other", "other-secret", "http://127.0.0.1/other")
    answer = await post(
        http,
        sim,
        "/oauth/token",
        {
            "client_id": "other",
            "client_secret": "other-secret",
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
        },
    )
    assert answer.json["error"] == "invalid_grant"
    assert sim.is_refresh_usable(tokens["refresh_token"])


# ---------------------------------------------------------------------- company tokens


async def test_company_tokens_never_expire_by_default(
    sim: FakeFactorial, http: aiohttp.ClientSession
) -> None:
    tokens = await connect(http, sim, company_id=8, company_token=True)
    assert set(tokens) == {"access_token", "token_type", "scope", "created_at"}
    sim.advance_time(10**7)
    assert sim.is_active(tokens["access_token"])
    assert (await get(http, sim, credentials_path(), tokens["access_token"])).status == 200
    assert sim.live_pairs(8) == 1


async def test_company_tokens_expire_when_configured(http: aiohttp.ClientSession) -> None:
    async with FakeFactorial(company_tokens_expire=True, access_token_ttl=60) as sim:
        tokens = await connect(http, sim, company_token=True)
        assert tokens["expires_in"] == 60
        assert HEX64.match(tokens["refresh_token"])


# ---------------------------------------------------------------------- API


async def test_api_rejects_unknown_expired_and_revoked_tokens(
    sim: FakeFactorial, http: aiohttp.ClientSession
) -> None:
    missing = await get(http, sim, credentials_path())
    assert missing.status == 401
    unknown = await get(http, sim, credentials_path(), "0" * 64)
    assert unknown.status == 401
    assert unknown.json["error"] == "invalid_token"
    assert unknown.headers["WWW-Authenticate"].startswith("Bearer")

    tokens = await connect(http, sim, company_id=2)
    assert (await get(http, sim, credentials_path(), tokens["access_token"])).status == 200
    sim.advance_time(7200)
    expired = await get(http, sim, credentials_path(), tokens["access_token"])
    assert (expired.status, expired.json["error"]) == (401, "invalid_token")
    # Refresh still works after the access token expired.
    fresh = (await refresh(http, sim, tokens["refresh_token"])).json
    assert (await revoke(http, sim, fresh["access_token"])).status == 200
    revoked = await get(http, sim, credentials_path(), fresh["access_token"])
    assert revoked.status == 401
    stats = sim.stats
    assert (stats.api_calls, stats.api_ok, stats.api_unauthorized) == (5, 1, 4)


async def test_expire_access_tokens_helper(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    a = await connect(http, sim, company_id=1)
    b = await connect(http, sim, company_id=2)
    assert sim.expire_access_tokens(company_id=1) == 1
    assert not sim.is_active(a["access_token"])
    assert sim.is_active(b["access_token"])
    assert sim.is_refresh_usable(a["refresh_token"])
    assert sim.family_alive(1)


@pytest.mark.parametrize(("version", "kind"), [("2025-10-01", int), ("v2", int), ("2026-01-01", str)])
async def test_credentials_id_types_by_version(
    sim: FakeFactorial, http: aiohttp.ClientSession, version: str, kind: type
) -> None:
    tokens = await connect(http, sim, company_id=12, employee_id=34)
    answer = await get(http, sim, credentials_path(version), tokens["access_token"])
    assert answer.status == 200
    body = answer.json
    assert "meta" in body
    (item,) = body["data"]
    for key in ("id", "company_id", "employee_id"):
        assert type(item[key]) is kind
    assert str(item["company_id"]) == "12"
    assert str(item["employee_id"]) == "34"
    assert {"email", "first_name", "last_name", "role"} <= set(item)


async def test_employees_endpoint(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    tokens = await connect(http, sim, company_id=4)
    path = "/api/2026-01-01/resources/employees/employees"
    answer = await get(http, sim, path, tokens["access_token"])
    assert answer.status == 200
    data = answer.json["data"]
    assert len(data) >= 1
    assert all(e["company_id"] == "4" for e in data)
    assert (await get(http, sim, path, "bad")).status == 401


# ---------------------------------------------------------------------- revoke


async def test_revoke_semantics(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    a = await connect(http, sim, company_id=1)
    answer = await revoke(http, sim, a["access_token"])
    assert (answer.status, answer.json) == (200, {})
    assert not sim.is_active(a["access_token"])
    assert not sim.is_refresh_usable(a["refresh_token"])  # one record
    again = await revoke(http, sim, a["access_token"])
    assert (again.status, again.json) == (200, {})
    unknown = await revoke(http, sim, "1" * 64)
    assert (unknown.status, unknown.json) == (200, {})
    after = await refresh(http, sim, a["refresh_token"])
    assert after.json["error"] == "invalid_grant"

    b = await connect(http, sim, company_id=1)
    assert (await revoke(http, sim, b["refresh_token"])).status == 200
    assert not sim.is_active(b["access_token"])

    stats = sim.stats
    assert stats.revoke_requests == 4
    assert stats.revocations == 2
    assert stats.invalid_grant_by_cause == {"refresh_revoked": 1}
    assert stats.families_revoked == 0


async def test_revoke_other_clients_token_is_forbidden(
    sim: FakeFactorial, http: aiohttp.ClientSession
) -> None:
    sim.add_client("other", "other-secret", "http://127.0.0.1/other")
    tokens = await connect(http, sim)
    answer = await revoke(http, sim, tokens["access_token"], "other", "other-secret")
    assert (answer.status, answer.json["error"]) == (403, "unauthorized_client")
    assert sim.is_active(tokens["access_token"])
    bad_secret = await revoke(http, sim, tokens["access_token"], sim.client_id, "nope")
    assert (bad_secret.status, bad_secret.json["error"]) == (401, "invalid_client")
    assert sim.is_active(tokens["access_token"])
    with pytest.raises(ValueError, match="already registered"):
        sim.add_client("other", "x", "http://127.0.0.1/x")


async def test_revoke_company_and_reauthorize(http: aiohttp.ClientSession) -> None:
    async with FakeFactorial(revoke_on_reauthorize=True) as sim:
        first = await connect(http, sim, company_id=6, employee_id=1)
        second = await connect(http, sim, company_id=6, employee_id=1)
        assert not sim.is_active(first["access_token"])
        assert sim.is_active(second["access_token"])
        assert sim.revoke_company(6) == 1
        assert not sim.family_alive(6)
        answer = await refresh(http, sim, second["refresh_token"])
        assert answer.json["error"] == "invalid_grant"
        stats = sim.stats
        assert stats.families_revoked_by_cause == {"reauthorized": 1, "admin": 1}
        assert stats.invalid_grant_by_cause == {"family_revoked": 1}
        assert sim.families_revoked_for(6) == 2


# ---------------------------------------------------------------------- faults

PRE_FAULTS = [
    (Fault.HTTP_500, 500, "application/json"),
    (Fault.HTTP_502, 502, "application/json"),
    (Fault.HTTP_503, 503, "application/json"),
    (Fault.HTTP_504, 504, "application/json"),
    (Fault.HTML_ERROR, 502, "text/html"),
    (Fault.RATE_LIMITED, 429, "application/json"),
    (Fault.HTML_200, 200, "text/html"),
    (Fault.MALFORMED_JSON, 200, "application/json"),
    (Fault.MISSING_FIELDS, 200, "application/json"),
]


@pytest.mark.parametrize(("fault", "status", "content_type"), PRE_FAULTS)
async def test_faults_answered_before_processing(
    sim: FakeFactorial,
    http: aiohttp.ClientSession,
    fault: Fault,
    status: int,
    content_type: str,
) -> None:
    tokens = await connect(http, sim)
    sim.inject(fault)
    assert sim.pending_faults("token") == 1
    answer = await refresh(http, sim, tokens["refresh_token"])
    assert answer.status == status
    assert answer.headers["Content-Type"].startswith(content_type)
    if fault is Fault.MALFORMED_JSON:
        with pytest.raises(json.JSONDecodeError):
            json.loads(answer.text)
    elif fault is Fault.MISSING_FIELDS:
        assert "access_token" not in answer.json
    elif fault is Fault.RATE_LIMITED:
        assert answer.headers["Retry-After"] == "1"
    elif content_type == "text/html":
        assert answer.text.lstrip().startswith("<")
    # Nothing was consumed: the same refresh token still works, exactly once.
    assert sim.is_refresh_usable(tokens["refresh_token"])
    assert sim.is_active(tokens["access_token"])
    retry = await refresh(http, sim, tokens["refresh_token"])
    assert retry.status == 200
    stats = sim.stats
    assert stats.refreshes == 1
    assert stats.faults_injected == 1
    assert stats.faults_by_kind == {fault.name: 1}
    assert stats.token_requests == 3
    assert stats.invalid_grant == 0
    assert sim.pending_faults() == 0


async def test_fault_before_exchange_does_not_consume_code(
    sim: FakeFactorial, http: aiohttp.ClientSession
) -> None:
    code = sim.issue_code()
    sim.inject(Fault.HTTP_503, times=2)
    assert (await exchange(http, sim, code)).status == 503
    assert (await exchange(http, sim, code)).status == 503
    assert (await exchange(http, sim, code)).status == 200
    assert sim.stats.exchanges == 1
    assert sim.stats.exchange_attempts_by_code == {code: 1}


async def test_drop_before_does_not_process(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    tokens = await connect(http, sim)
    sim.inject(Fault.DROP_BEFORE)
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await refresh(http, sim, tokens["refresh_token"])
    assert sim.is_refresh_usable(tokens["refresh_token"])
    assert sim.stats.refreshes == 0
    assert sim.stats.refresh_attempts == 0
    assert (await refresh(http, sim, tokens["refresh_token"])).status == 200


async def test_drop_after_rotates_then_disconnects(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    tokens = await connect(http, sim, company_id=11)
    sim.inject(Fault.DROP_AFTER)
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await refresh(http, sim, tokens["refresh_token"])
    # The refresh really happened: the presented token is rotated, a new pair lives.
    assert sim.stats.refreshes == 1
    assert not sim.is_refresh_usable(tokens["refresh_token"])
    assert not sim.is_active(tokens["access_token"])
    assert sim.live_pairs(11) == 1
    # A blind retry is exactly the mistake a strict server punishes.
    retry = await refresh(http, sim, tokens["refresh_token"])
    assert retry.json["error"] == "invalid_grant"
    assert not sim.family_alive(11)


async def test_drop_after_on_exchange_consumes_code(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    code = sim.issue_code(company_id=5)
    sim.inject(Fault.DROP_AFTER)
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await exchange(http, sim, code)
    assert sim.stats.exchanges == 1
    assert sim.live_pairs(5) == 1


async def test_slow_processes_then_delays(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    tokens = await connect(http, sim, company_id=2)
    sim.inject(Fault.SLOW, delay=5.0)
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await refresh(http, sim, tokens["refresh_token"], timeout=aiohttp.ClientTimeout(total=0.3))
    assert time.monotonic() - started < 2
    assert sim.stats.refreshes == 1
    assert not sim.is_refresh_usable(tokens["refresh_token"])
    assert sim.live_pairs(2) == 1


async def test_slow_answers_eventually(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    tokens = await connect(http, sim)
    sim.inject(Fault.SLOW, delay=0.2)
    started = time.monotonic()
    answer = await refresh(http, sim, tokens["refresh_token"])
    assert answer.status == 200
    assert time.monotonic() - started >= 0.2


async def test_stop_cuts_slow_answers_short(http: aiohttp.ClientSession) -> None:
    sim = FakeFactorial()
    await sim.start()
    tokens = await connect(http, sim)
    sim.inject(Fault.SLOW, delay=60)
    pending = asyncio.ensure_future(refresh(http, sim, tokens["refresh_token"]))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await sim.stop()
    assert time.monotonic() - started < 3
    with pytest.raises(aiohttp.ClientError):
        await pending


async def test_rate_limited_fault_retry_after_and_times(
    sim: FakeFactorial, http: aiohttp.ClientSession
) -> None:
    tokens = await connect(http, sim)
    sim.inject(Fault.RATE_LIMITED, times=2, retry_after=2.5)
    for _ in range(2):
        answer = await refresh(http, sim, tokens["refresh_token"])
        assert answer.status == 429
        assert answer.headers["Retry-After"] == "2.5"
    assert (await refresh(http, sim, tokens["refresh_token"])).status == 200


async def test_faults_on_other_endpoints(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    tokens = await connect(http, sim)
    sim.inject(Fault.HTTP_503, endpoint="api")
    sim.inject(Fault.HTML_ERROR, endpoint="revoke")
    sim.inject(Fault.HTML_200, endpoint="authorize")
    assert (await get(http, sim, credentials_path(), tokens["access_token"])).status == 503
    assert (await get(http, sim, credentials_path(), tokens["access_token"])).status == 200
    assert (await revoke(http, sim, tokens["access_token"])).status == 502
    assert sim.is_active(tokens["access_token"])
    with pytest.raises(AuthorizationRejected) as info:
        await sim.authorize(authorize_url(sim))
    assert info.value.status == 200
    assert sim.stats.faults_injected == 3
    assert sim.stats.codes_issued == 1  # only the one connect() minted


async def test_drop_after_on_api_counts_first_use(http: aiohttp.ClientSession) -> None:
    async with FakeFactorial(refresh_mode=RefreshMode.REVOKE_ON_FIRST_USE) as sim:
        first = await connect(http, sim)
        second = (await refresh(http, sim, first["refresh_token"])).json
        # aiohttp retries an idempotent GET once after a disconnect: two drops reach the
        # caller, and both requests were processed.
        sim.inject(Fault.DROP_AFTER, endpoint="api", times=2)
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await get(http, sim, credentials_path(), second["access_token"])
        assert not sim.is_active(first["access_token"])
        assert sim.stats.api_ok == 2
        assert sim.stats.api_calls == 2
        assert sim.stats.faults_by_kind == {"DROP_AFTER": 2}


def test_inject_validation() -> None:
    sim = FakeFactorial()
    with pytest.raises(ValueError, match="endpoint"):
        sim.inject(Fault.HTTP_500, endpoint="nope")
    with pytest.raises(ValueError, match="times"):
        sim.inject(Fault.HTTP_500, times=0)
    sim.inject(Fault.HTTP_500, times=3, endpoint="api")
    assert sim.pending_faults() == 3
    sim.clear_faults()
    assert sim.pending_faults("api") == 0
    with pytest.raises(ValueError):
        FakeFactorial(access_token_ttl=0)
    with pytest.raises(RuntimeError):
        _ = sim.base_url


async def test_unavailable_switch(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    tokens = await connect(http, sim)
    sim.unavailable = True
    assert (await refresh(http, sim, tokens["refresh_token"])).status == 503
    assert (await revoke(http, sim, tokens["access_token"])).status == 503
    assert (await get(http, sim, credentials_path(), tokens["access_token"])).status == 503
    with pytest.raises(AuthorizationRejected):
        await sim.authorize(authorize_url(sim))
    assert sim.stats.unavailable == 4
    assert sim.stats.refreshes == 0
    sim.unavailable = False
    assert (await refresh(http, sim, tokens["refresh_token"])).status == 200


async def test_rate_limit_per_minute(http: aiohttp.ClientSession) -> None:
    async with FakeFactorial(rate_limit_per_minute=3) as sim:
        statuses = [(await refresh(http, sim, "x")).status for _ in range(4)]
        assert statuses == [400, 400, 400, 429]
        limited = await refresh(http, sim, "x")
        assert limited.status == 429
        assert int(limited.headers["Retry-After"]) >= 1
        # Endpoint families are limited separately; GETs are not limited.
        assert (await revoke(http, sim, "y")).status == 200
        assert (await get(http, sim, credentials_path(), "z")).status == 401
        stats = sim.stats
        assert stats.rate_limited == 2
        assert stats.token_requests == 5
        assert stats.refresh_attempts == 3


async def test_latency(http: aiohttp.ClientSession) -> None:
    async with FakeFactorial(latency=0.15) as sim:
        started = time.monotonic()
        assert (await refresh(http, sim, "x")).status == 400
        assert time.monotonic() - started >= 0.15


# ---------------------------------------------------------------------- stats, lifecycle


async def test_stats_are_frozen_snapshots(sim: FakeFactorial, http: aiohttp.ClientSession) -> None:
    before = sim.stats
    assert isinstance(before, SimulatorStats)
    await connect(http, sim, company_id=1)
    assert before.exchanges == 0
    assert before.exchanges_by_company == {}
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        before.exchanges = 5  # type: ignore[misc]
    after = sim.stats
    assert after.exchanges == 1
    sim.reset_stats()
    assert sim.stats == SimulatorStats()
    assert after.exchanges == 1


async def test_start_twice_and_restart(http: aiohttp.ClientSession) -> None:
    sim = FakeFactorial()
    await sim.start()
    try:
        with pytest.raises(RuntimeError):
            await sim.start()
        tokens = await connect(http, sim)
    finally:
        await sim.stop()
    await sim.stop()  # idempotent
    assert not sim.running
    async with sim:
        assert sim.is_active(tokens["access_token"])
        answer = await get(http, sim, credentials_path(), tokens["access_token"])
        assert answer.status == 200


def test_serve_in_thread_from_sync_code() -> None:
    sim = FakeFactorial()
    with sim.serve_in_thread() as running:
        assert running is sim
        sim.next_owner(company_id=77)
        query = urllib.parse.urlencode(
            {
                "client_id": sim.client_id,
                "redirect_uri": sim.redirect_uri,
                "response_type": "code",
                "state": "s1",
            }
        )
        location = sim.authorize_sync(f"{sim.base_url}/oauth/authorize?{query}")
        params = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
        assert params["state"] == ["s1"]
        form = urllib.parse.urlencode(
            {
                "client_id": sim.client_id,
                "client_secret": sim.client_secret,
                "grant_type": "authorization_code",
                "code": params["code"][0],
                "redirect_uri": sim.redirect_uri,
            }
        ).encode()
        with urllib.request.urlopen(sim.base_url + "/oauth/token", data=form) as resp:
            body = json.loads(resp.read())
        assert resp.status == 200
        assert sim.is_active(body["access_token"])
        stats = sim.stats
        assert stats.exchanges == 1
        assert stats.exchanges_by_company == {77: 1}
    assert not sim.running
    with pytest.raises(RuntimeError):
        _ = sim.base_url

"""The OAuth client's parsing and redaction rules (pure functions) and its HTTP edges."""

from __future__ import annotations

import asyncio
import time

import pytest

from factorial_tokens import FactorialApp, ProviderError, RequestInDoubt
from factorial_tokens._oauth import OAuthClient, _excerpt, _retry_after, _token_set
from factorial_tokens.testing import FakeFactorial, Fault

from .conftest import SimFactory, app_for

TOKEN = "de6780bc506a0446309bd9362820ba8aed28aa506c71eedbe1c5c4f9dd350e54"


def test_expiry_counts_from_when_the_request_was_sent() -> None:
    tokens = _token_set({"access_token": "a", "expires_in": 7200, "refresh_token": "r"}, sent_at=1000.0)
    assert tokens.expires_at == 8200.0 and tokens.obtained_at == 1000.0 and tokens.lifetime == 7200.0


def test_blank_keys_mean_a_non_expiring_token() -> None:
    tokens = _token_set({"access_token": "a", "token_type": "bearer"}, sent_at=1.0)
    assert tokens.expires_at is None and tokens.refresh_token is None and tokens.lifetime is None


@pytest.mark.parametrize(
    "body",
    [{}, {"access_token": ""}, {"access_token": 5}, {"access_token": None}, {"access_token": ["a"]}],
)
def test_answers_without_a_usable_access_token_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="access_token"):
        _token_set(body, sent_at=1.0)


@pytest.mark.parametrize(
    "body",
    [
        {"access_token": "a", "token_type": "mac"},
        {"access_token": "a", "expires_in": -1},
        {"access_token": "a", "expires_in": True},
        {"access_token": "a", "expires_in": "soon"},
        {"access_token": "a", "refresh_token": 3},
        {"access_token": "a", "created_at": "yesterday"},
    ],
)
def test_odd_optional_fields_never_lose_an_issued_token(body: dict[str, object]) -> None:
    """A 2xx with an access token is authoritative: odd fields get safe defaults."""
    tokens = _token_set(body, sent_at=1.0)
    assert tokens.access_token == "a" and tokens.token_type == "Bearer"
    assert tokens.expires_at is None or tokens.expires_at > 1.0


def test_excerpts_hold_no_token() -> None:
    body = f"<html><body>Bad gateway for {TOKEN} and Bearer abcDEF0123456789abcDEF0123</body></html>".encode()
    text = _excerpt(body, "client-secret")
    assert TOKEN not in text and "abcDEF0123456789abcDEF0123" not in text
    assert len(_excerpt(b"x " * 5000)) <= 161


def test_retry_after_forms() -> None:
    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    delay = _retry_after(http_date)
    assert delay is not None and 25 <= delay <= 31


async def test_every_call_has_a_deadline(sim: FakeFactorial) -> None:
    sim.latency = 2.0
    client = OAuthClient(app_for(sim), timeout=5)
    try:
        deadline = asyncio.get_running_loop().time() + 0.3
        with pytest.raises(ProviderError) as info:
            await client.revoke("token", deadline=deadline)
        assert info.value.error == "timeout"
    finally:
        await client.aclose()


async def test_an_injected_session_is_not_closed(sim: FakeFactorial) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        client = OAuthClient(app_for(sim), session=session)
        await client.aclose()
        assert not session.closed


def test_repr_holds_no_secret(app: FactorialApp) -> None:
    assert app.client_secret not in repr(OAuthClient(app)) and app.client_secret not in repr(app)


async def test_a_retry_is_not_sent_without_a_whole_attempt_left_before_the_deadline(
    make_sim: SimFactory,
) -> None:
    """A refresh retried late in its budget went out with what was left of it, was answered
    after the deadline (in doubt) though Factorial had rotated the token, and another worker
    then sent the same refresh token again (in strict mode: invalid_grant, the grant lost; a
    flake of the advisory-outage test on a loaded machine). A try of a token request now
    starts only with its whole timeout left; otherwise the last answer (the 503) is the
    outcome, and nothing was rotated."""
    async with make_sim() as sim:
        client = OAuthClient(app_for(sim), timeout=0.5, backoff=0.2)
        try:
            loop = asyncio.get_running_loop()
            tokens = await client.exchange_code(sim.issue_code(company_id=1), deadline=loop.time() + 5)
            assert tokens.refresh_token is not None
            sim.inject(Fault.HTTP_503)
            sim.inject(Fault.SLOW, delay=1.0)  # the retry would be answered after the deadline
            with pytest.raises(ProviderError) as info:
                await client.refresh(tokens.refresh_token, deadline=loop.time() + 0.6)
            assert info.value.status == 503 and not isinstance(info.value, RequestInDoubt), repr(info.value)
            assert sim.stats.refreshes == 0 and sim.pending_faults() == 1
        finally:
            await client.aclose()

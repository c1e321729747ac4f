"""``TokenManager.token_rejected``: what an HTTP client calls after a 401."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import aiohttp
import pytest
from multidict import MultiDict

from factorial_tokens import TokenManager
from factorial_tokens.testing import FakeFactorial

from .test_sync import EMPLOYEES


@pytest.mark.timeout(20)
async def test_many_reports_of_one_rejected_token_refresh_once(sim: FakeFactorial, tm: TokenManager) -> None:
    # Reports arrive at every point of a flight's life, including between its end and
    # the moment it is forgotten (a report that joined such a flight once spun forever).
    await tm.exchange_code("acme", sim.issue_code(company_id=1))
    old = await tm.access_token("acme")
    sim.expire_access_tokens()

    async def report(ticks: int) -> str:
        for _ in range(ticks):
            await asyncio.sleep(0)
        return await tm.token_rejected("acme", old)

    tokens = set(await asyncio.gather(*(report(i % 40) for i in range(400))))
    assert len(tokens) == 1 and old not in tokens and sim.is_active(tokens.pop())
    assert sim.stats.refreshes == 1 and sim.stats.invalid_grant == 0


async def test_a_newer_stored_token_is_used_without_refreshing(sim: FakeFactorial, tm: TokenManager) -> None:
    await tm.exchange_code("acme", sim.issue_code(company_id=1))
    old = await tm.access_token("acme")
    newer = await tm.refresh("acme")  # as if another worker had refreshed
    assert await tm.token_rejected("acme", old) == newer.access_token
    assert sim.stats.refreshes == 1


async def test_a_401_to_a_stream_body_is_returned_not_retried_empty(
    sim: FakeFactorial, tm: TokenManager
) -> None:
    """``tm.client`` retried a 401 with the same arguments: a stream, consumed by the first
    send, went out empty the second time, and its answer (200) came back as if all was well."""
    await tm.exchange_code("acme", sim.issue_code(company_id=1))
    token = await tm.access_token("acme")
    sim.expire_access_tokens()  # the cached token now gets a 401
    produced: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:  # a one-shot stream
        for chunk in (b"hello ", b"world"):
            produced.append(chunk)
            yield chunk

    before = sim.stats.api_calls
    raised: BaseException | None = None
    status = None
    try:
        async with tm.client("acme") as api:
            async with api.get(EMPLOYEES, data=body()) as resp:
                status = resp.status
    except Exception as exc:
        raised = exc
    sent = sim.stats.api_calls - before
    # Either the 401 comes back / an error says the body cannot be resent, or the body
    # is really sent twice. A second request with an empty body must not be sent silently.
    assert raised is None and status == 401 and sent == 1, (raised, status, sent)
    assert await tm.access_token("acme") != token  # renewed for the next request


def _fields_form() -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("note", "x" * 100)
    return form


@pytest.mark.parametrize(
    "make_body",
    [_fields_form, lambda: MultiDict([("note", "x" * 100)]), lambda: memoryview(b"x" * 100)],
    ids=["FormData-fields", "MultiDict", "memoryview"],
)
async def test_a_401_to_a_resendable_body_is_still_retried(
    sim: FakeFactorial, tm: TokenManager, make_body: object
) -> None:
    """aiohttp sends these bodies whole a second time: their 401 is retried, as before the
    check for bodies a first send consumes (which turned them away at first)."""
    await tm.exchange_code("acme", sim.issue_code(company_id=1))
    await tm.access_token("acme")
    sim.expire_access_tokens()
    async with tm.client("acme") as api, api.get(EMPLOYEES, data=make_body()) as resp:  # type: ignore[operator]
        status = resp.status
    assert status == 200, f"a resendable body's 401 was not retried (got {status})"


class _CountingFile(io.BytesIO):
    read_total = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.read_total += len(chunk)
        return chunk


async def test_a_401_to_a_dict_with_a_file_is_not_retried_with_the_file_empty(
    sim: FakeFactorial, tm: TokenManager
) -> None:
    """``data={"f": file}``: aiohttp makes a multipart form of it that consumes the file, and
    the retry went out with the file empty (its 200 came back as if all was well)."""
    await tm.exchange_code("acme", sim.issue_code(company_id=1))
    await tm.access_token("acme")
    sim.expire_access_tokens()
    upload = _CountingFile(b"x" * 100)
    before = sim.stats.api_calls
    async with tm.client("acme") as api, api.get(EMPLOYEES, data={"f": upload}) as resp:
        status = resp.status
    sent = sim.stats.api_calls - before
    assert (status, sent, upload.read_total) == (401, 1, 100)


# -- review-sync: failing tests ------------------------------------------------------------


async def test_a_401_to_a_multipart_form_holding_a_stream_is_not_resent(
    sim: FakeFactorial, tm: TokenManager
) -> None:
    """``_resendable`` looks at ``FormData._fields`` *after* the first send, but aiohttp
    empties that list when it builds a multipart body (``_gen_form_data`` clears it): a
    form holding a one-shot stream looks like a form of nothing, and the request is sent a
    second time with the stream already spent (its 200 comes back as if all was well)."""
    await tm.exchange_code("acme", sim.issue_code(company_id=1))
    await tm.access_token("acme")
    sim.expire_access_tokens()
    produced: list[bytes] = []

    async def stream() -> AsyncIterator[bytes]:  # a one-shot stream
        for chunk in (b"hello ", b"world"):
            produced.append(chunk)
            yield chunk

    form = aiohttp.FormData()
    form.add_field("upload", stream(), filename="upload.bin")
    before = sim.stats.api_calls
    async with tm.client("acme") as api, api.get(EMPLOYEES, data=form) as resp:
        status = resp.status
    sent = sim.stats.api_calls - before
    assert (status, sent) == (401, 1), f"a spent stream was sent again: status {status}, {sent} sends"


async def test_a_401_from_the_origin_a_redirect_led_to_forces_no_refresh(
    sim: FakeFactorial, tm: TokenManager
) -> None:
    """``tm.client`` lets aiohttp follow redirects (which drops the token on leaving the
    origin) and then takes the final answer's 401 for Factorial's: a 401 from another
    host forces a refresh (a rotation for nothing) and a resend, on every such request."""
    from urllib.parse import urlencode

    from .test_sync import other_origin

    await tm.exchange_code("acme", sim.issue_code(company_id=1))
    with other_origin(401) as (elsewhere, _seen):
        sim.add_client("other-app", "other-secret", elsewhere + "/cb")
        query = urlencode(
            {"client_id": "other-app", "redirect_uri": elsewhere + "/cb", "response_type": "code"}
        )
        sim.reset_stats()
        async with tm.client("acme") as api:
            for _ in range(3):
                async with api.get(f"/oauth/authorize?{query}") as resp:
                    assert resp.status == 401
        assert sim.stats.refreshes == 0, f"{sim.stats.refreshes} refreshes for 401s Factorial never sent"


async def test_tm_client_keeps_no_cookie_from_one_tenants_answer_for_another(tm: TokenManager) -> None:
    """Every tenant's requests share the manager's HTTP session: a cookie Factorial set in
    an answer to tenant A (a Rails session cookie, a load balancer's) went out with tenant
    B's requests, one company's session beside another company's token."""
    from yarl import URL

    async with tm.client("acme") as api:
        jar = api._session.cookie_jar
    jar.update_cookies({"_factorial_session": "of-company-a"}, URL("http://api.factorial.example/"))
    assert len(jar) == 0
    assert jar.filter_cookies(URL("http://api.factorial.example/api")) == {}


async def test_a_rejected_token_reported_under_the_decomposed_tenant_id_refreshes_that_tenant(
    sim: FakeFactorial, tm: TokenManager
) -> None:
    """``token_rejected`` validates the tenant id but drops the NFC-normalised result
    (``_manager.py:301``): ``_reload_after_401`` forgets the cache under the decomposed
    id (a no-op), reads the cached (rejected) token under the normalised one, then forces
    a refresh under the decomposed id, whose store key holds nothing: TenantNotConnected
    for a connected tenant (``credentials`` has the same flaw)."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    await tm.exchange_code(composed, sim.issue_code(company_id=1))
    old = await tm.access_token(composed)
    sim.expire_access_tokens()
    fresh = await tm.token_rejected(decomposed, old)
    assert fresh != old and sim.is_active(fresh)
    assert await tm.access_token(composed) == fresh

"""Keyed hashes under the client secret: stable across releases (workers of two versions
share a store during a rolling deploy), and one per purpose."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs, urlsplit

import pytest

from factorial_tokens import FactorialApp, InvalidCallback, TokenManager
from factorial_tokens._secret import AppSecret
from factorial_tokens.store import MemoryStore
from factorial_tokens.testing import CountingStore, FakeFactorial

from .conftest import CLIENT_ID, app_for

APP = FactorialApp(client_id="app-1", client_secret="s3cret", redirect_uri="https://example.com/callback")


def _hmac(message: bytes) -> bytes:
    return hmac.new(b"s3cret", message, hashlib.sha256).digest()


def test_the_keyed_hashes_keep_their_format() -> None:
    secret = AppSecret(APP)
    assert secret.signing_key(b"state") == _hmac(b"factorial-tokens/state/v1/app-1")
    assert secret.code_hash("the-code") == _hmac(b"the-code").hex()
    assert secret.code_binding("the-code") == _hmac(b"state-binding\x00the-code").hex()
    assert "s3cret" not in repr(secret)


def test_no_code_hashes_to_a_signing_key() -> None:
    # A callback whose "code" is the signing key's message would leave the state-signing key
    # in the store (as that code's claim): a store reader could then sign states and links.
    secret = AppSecret(APP)
    with pytest.raises(ValueError, match="signing prefix"):
        secret.code_hash("factorial-tokens/state/v1/app-1")


async def test_a_callback_whose_code_is_a_signing_message_claims_nothing(sim: FakeFactorial) -> None:
    store = CountingStore(MemoryStore())
    async with TokenManager(app_for(sim), store) as tm:
        url = tm.authorization_url("acme", binding="b")
        state = parse_qs(urlsplit(url).query)["state"][0]
        with pytest.raises(InvalidCallback):
            await tm.complete_callback(
                state=state, code=f"factorial-tokens/state/v1/{CLIENT_ID}", binding="b"
            )
    assert store.calls["claim_code"] == 0 and store.calls["advance_code"] == 0
    assert sim.stats.token_requests == 0

"""Signed OAuth ``state`` values: bound to the app and the tenant, with a nonce and expiry.

Format: ``base64url(json payload) "." base64url(HMAC-SHA256)``, keyed by a key derived
from the app's client secret, so every worker of the app can verify what any other signed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

from ._errors import InvalidState, InvalidTenant
from ._models import FactorialApp, validate_tenant

__all__ = ["StateSigner"]

_MAX_STATE = 2048


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StateSigner:
    """Signs and verifies ``state`` values for one app."""

    def __init__(self, app: FactorialApp, ttl: float = 600.0) -> None:
        self._key = hmac.new(
            app.client_secret.encode(), b"factorial-tokens/state/v1/" + app.client_id.encode(), hashlib.sha256
        ).digest()
        self.ttl = ttl

    def __repr__(self) -> str:
        return f"StateSigner(ttl={self.ttl})"

    def sign(self, tenant: str, *, now: float | None = None) -> str:
        """A fresh state for ``tenant``, valid for ``ttl`` seconds."""
        issued = time.time() if now is None else now
        payload = {"t": tenant, "n": secrets.token_urlsafe(12), "e": int(issued + self.ttl)}
        body = _b64(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())
        return f"{body}.{_b64(self._mac(body))}"

    def verify(self, state: object, *, now: float | None = None) -> tuple[str, str]:
        """Return ``(tenant, nonce)`` of a valid state; raise InvalidState otherwise."""
        if not isinstance(state, str) or not state or len(state) > _MAX_STATE:
            raise InvalidState("state is missing or too long")
        body, sep, mac = state.partition(".")
        try:
            given = _unb64(mac)
        except ValueError:
            raise InvalidState("state is malformed") from None
        if not sep or not hmac.compare_digest(given, self._mac(body)):
            raise InvalidState("state signature does not match (tampered, or another app's)")
        try:
            payload = json.loads(_unb64(body))
            tenant, nonce, expires = payload["t"], payload["n"], payload["e"]
            validate_tenant(tenant)
        except (ValueError, KeyError, TypeError, InvalidTenant):
            raise InvalidState("state is malformed") from None
        if not isinstance(nonce, str) or not isinstance(expires, int):
            raise InvalidState("state is malformed")
        if (time.time() if now is None else now) > expires:
            raise InvalidState("state has expired: start the connection again")
        return tenant, nonce

    def _mac(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode(), hashlib.sha256).digest()

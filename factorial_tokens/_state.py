"""Signed values the connect flow hands out: OAuth ``state`` values and connect links.

Format of both: ``base64url(json payload) "." base64url(HMAC-SHA256)``, keyed by a key
derived from the app's client secret and the value's purpose, so every worker of the app
can verify what any other signed, and a value of one purpose never passes as the other.

* A **state** names the tenant, a random nonce (spent once by the manager), its expiry,
  and optionally a keyed hash of the *binding*: a value the application ties to the
  browser that started the flow (a cookie), so a callback from another browser is refused.
* A **connect link** names the tenant and its expiry: it lets whoever holds it start
  connecting that tenant (``/connect/{tenant}?link=...``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import attrs

from ._errors import InvalidState, InvalidTenant
from ._models import FactorialApp, validate_tenant
from ._secret import AppSecret

__all__ = ["StateSigner"]  # LinkSigner and VerifiedState are shared with the manager only

_MAX_STATE = 2048


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _Signer:
    """HMAC-signed JSON payloads for one app and one purpose."""

    _purpose = b""
    _what = "value"

    def __init__(self, app: FactorialApp, ttl: float) -> None:
        self._key = AppSecret(app).signing_key(self._purpose)
        self.ttl = ttl

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ttl={self.ttl})"

    def _mac(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode(), hashlib.sha256).digest()

    def _seal(self, payload: dict[str, Any]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())
        return f"{body}.{_b64(self._mac(body))}"

    def _open(self, value: object, now: float | None) -> tuple[str, dict[str, Any]]:
        """The tenant and payload of a valid value; raise InvalidState otherwise."""
        what = self._what
        if not isinstance(value, str) or not value or len(value) > _MAX_STATE:
            raise InvalidState(f"{what} is missing or too long")
        if not value.isascii():  # a signed value is base64 text; a lone surrogate cannot be hashed
            raise InvalidState(f"{what} is malformed")
        body, sep, mac = value.partition(".")
        try:
            given = _unb64(mac)
        except ValueError:
            raise InvalidState(f"{what} is malformed") from None
        if not sep or not hmac.compare_digest(given, self._mac(body)):
            raise InvalidState(f"{what} signature does not match (tampered, or another app's)")
        try:
            payload = json.loads(_unb64(body))
            tenant, expires = payload["t"], payload["e"]
            tenant = validate_tenant(tenant)
        except (ValueError, KeyError, TypeError, InvalidTenant):
            raise InvalidState(f"{what} is malformed") from None
        if not isinstance(expires, int) or not isinstance(payload, dict):
            raise InvalidState(f"{what} is malformed")
        if (time.time() if now is None else now) > expires:
            raise InvalidState(f"{what} has expired: start the connection again")
        return tenant, payload

    def binding_hash(self, binding: str) -> str:
        """A keyed, non-reversible hash of a browser binding, as kept in a state."""
        # surrogatepass: a cookie's raw bytes reach the app as lone surrogates (aiohttp
        # decodes headers with surrogateescape); they hash, and simply do not match.
        data = b"binding\x00" + binding.encode("utf-8", "surrogatepass")
        return _b64(hmac.new(self._key, data, hashlib.sha256).digest()[:18])


@attrs.frozen
class VerifiedState:
    """What a valid ``state`` says: its tenant, its nonce, and its binding's hash (or None)."""

    tenant: str
    nonce: str = attrs.field(repr=False)
    binding_hash: str | None = attrs.field(repr=False, default=None)

    def binding_matches(self, binding: str | None, signer: StateSigner) -> bool:
        """True when ``binding`` is the value the state was issued with (None for none)."""
        if self.binding_hash is None or binding is None:
            return self.binding_hash is None and binding is None
        return hmac.compare_digest(self.binding_hash, signer.binding_hash(binding))


class StateSigner(_Signer):
    """Signs and verifies ``state`` values for one app."""

    _purpose = b"state"
    _what = "state"

    def __init__(self, app: FactorialApp, ttl: float = 600.0) -> None:
        super().__init__(app, ttl)

    def sign(self, tenant: str, *, binding: str | None = None, now: float | None = None) -> str:
        """A fresh state for ``tenant``, valid for ``ttl`` seconds, bound to ``binding`` if given."""
        issued = time.time() if now is None else now
        payload: dict[str, Any] = {"t": tenant, "n": secrets.token_urlsafe(12), "e": int(issued + self.ttl)}
        if binding is not None:
            payload["b"] = self.binding_hash(binding)
        return self._seal(payload)

    def check(self, state: object, *, now: float | None = None) -> VerifiedState:
        """The claims of a valid state; raise InvalidState otherwise."""
        tenant, payload = self._open(state, now)
        nonce, bound = payload.get("n"), payload.get("b")
        if not isinstance(nonce, str) or not nonce or not (bound is None or isinstance(bound, str)):
            raise InvalidState("state is malformed")
        return VerifiedState(tenant, nonce, bound)

    def verify(self, state: object, *, now: float | None = None) -> tuple[str, str]:
        """Return ``(tenant, nonce)`` of a valid state; raise InvalidState otherwise."""
        claims = self.check(state, now=now)
        return claims.tenant, claims.nonce


class LinkSigner(_Signer):
    """Signs and verifies connect links: who may start connecting a tenant, until when."""

    _purpose = b"connect-link"
    _what = "connect link"

    def sign(self, tenant: str, *, ttl: float | None = None, now: float | None = None) -> str:
        """A link token for ``tenant``, valid for ``ttl`` seconds (default: the signer's)."""
        issued = time.time() if now is None else now
        return self._seal({"t": tenant, "e": int(issued + (self.ttl if ttl is None else ttl))})

    def verify(self, link: object, tenant: str, *, now: float | None = None) -> None:
        """Raise InvalidState unless ``link`` is a valid, unexpired link for ``tenant``."""
        linked, _ = self._open(link, now)
        if linked != tenant:
            raise InvalidState("connect link is for another tenant")

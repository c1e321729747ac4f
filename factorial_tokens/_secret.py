"""Every keyed hash under the app's client secret, in one place.

Each use has a message of its own form, so that a value made for one purpose does not pass
as another's. Every worker of the app computes the same values, so any of them can check
what another made.
"""

from __future__ import annotations

import hashlib
import hmac

from ._models import FactorialApp

__all__: list[str] = []

#: Every signing key's message starts with this. A code is hashed as it is (so claims keep
#: their names across releases during a rolling deploy), so a code with this prefix is
#: refused: its hash would be a signing key, stored as the code's claim name.
SIGNING_PREFIX = "factorial-tokens/"


class AppSecret:
    """The keyed hashes of one app (HMAC-SHA256 under its client secret)."""

    __slots__ = ("_client_id", "_secret")

    def __init__(self, app: FactorialApp) -> None:
        self._secret = app.client_secret.encode()
        self._client_id = app.client_id.encode()

    def __repr__(self) -> str:
        return f"AppSecret(client_id={self._client_id.decode()!r})"

    def _mac(self, message: bytes) -> bytes:
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def signing_key(self, purpose: bytes) -> bytes:
        """The key that signs values of ``purpose`` (``b"state"``, ``b"connect-link"``)."""
        return self._mac(SIGNING_PREFIX.encode() + purpose + b"/v1/" + self._client_id)

    def code_hash(self, code: str) -> str:
        """The name an authorization code is claimed under in the store (hex): the code
        itself never reaches the store. A code in the signing keys' namespace is refused."""
        if code.startswith(SIGNING_PREFIX):
            raise ValueError("an authorization code may not start with the signing prefix")
        return self._mac(code.encode()).hex()

    def code_binding(self, code: str) -> str:
        """What ties a state's nonce to the code it first arrived with (hex); a duplicate
        of the same callback computes the same value."""
        return self._mac(b"state-binding\x00" + code.encode()).hex()

"""How a token set becomes the opaque payload a store keeps, and back.

The default codec writes plain JSON. A sealing codec (AES-GCM under a keyring) plugs in
through the same two methods, so stores never change when encryption is switched on.
"""

from __future__ import annotations

import json
from typing import Protocol

from ._errors import TokenSealError
from ._models import TokenSet
from .store import TenantKey

__all__ = ["JsonCodec", "PayloadCodec"]


class PayloadCodec(Protocol):
    """Turns a tenant's token set into bytes for the store and back."""

    def encode(self, key: TenantKey, tokens: TokenSet) -> bytes:
        """Serialize (and possibly seal) ``tokens`` for ``key``."""
        ...

    def decode(self, key: TenantKey, payload: bytes) -> TokenSet:
        """Open a payload written for ``key``; raise TokenSealError if it cannot be read."""
        ...


_PLAIN = b"j1:"


class JsonCodec:
    """Plain JSON, prefixed ``j1:``: readable by anyone who can read the store."""

    def encode(self, key: TenantKey, tokens: TokenSet) -> bytes:
        return _PLAIN + json.dumps(tokens.to_dict(), separators=(",", ":")).encode()

    def decode(self, key: TenantKey, payload: bytes) -> TokenSet:
        if not payload.startswith(_PLAIN):
            raise TokenSealError(
                f"the record of tenant {key.tenant!r} is not plain JSON (sealed? configure the keyring)"
            )
        try:
            return TokenSet.from_dict(json.loads(payload[len(_PLAIN) :]))
        except (ValueError, TypeError) as exc:
            raise TokenSealError(f"the record of tenant {key.tenant!r} is corrupt") from exc

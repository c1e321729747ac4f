"""How a token set becomes the opaque payload a store keeps, and back.

The default codec writes plain JSON. The sealing codec (AES-GCM under a keyring) plugs in
through the same two methods, so stores never change when encryption is switched on.
"""

from __future__ import annotations

import json
from typing import Protocol

from .._errors import ConfigurationError, TokenSealError
from .._models import TokenSet
from ..store import TenantKey
from ._keyring import SEALED, Keyring, sealed_with

__all__ = ["JsonCodec", "PayloadCodec", "SealedCodec"]


class PayloadCodec(Protocol):
    """Turns a tenant's token set into bytes for the store and back."""

    def encode(self, key: TenantKey, tokens: TokenSet) -> bytes:
        """Serialize (and possibly seal) ``tokens`` for ``key``."""
        ...

    def decode(self, key: TenantKey, payload: bytes) -> TokenSet:
        """Open a payload written for ``key``; raise TokenSealError if it cannot be read."""
        ...


_PLAIN = b"j1:"


def _check_written(key: TenantKey, payload: bytes) -> None:
    """TokenSealError for the empty payload a store gives for a row it cannot read back
    (``unreadable_record``): no codec ever writes one."""
    if not payload:
        raise TokenSealError(
            f"the stored record of tenant {key.tenant!r} is malformed (its columns were changed "
            "outside this library); forget the tenant and connect it again"
        )


class JsonCodec:
    """Plain JSON, prefixed ``j1:``: readable by anyone who can read the store."""

    def encode(self, key: TenantKey, tokens: TokenSet) -> bytes:
        return _PLAIN + json.dumps(tokens.to_dict(), separators=(",", ":")).encode()

    def decode(self, key: TenantKey, payload: bytes) -> TokenSet:
        _check_written(key, payload)
        if not payload.startswith(_PLAIN):
            raise TokenSealError(
                f"the record of tenant {key.tenant!r} is not plain JSON (sealed? configure the keyring)"
            )
        try:
            return TokenSet.from_dict(json.loads(payload[len(_PLAIN) :]))
        except (ValueError, TypeError, RecursionError) as exc:
            raise TokenSealError(f"the record of tenant {key.tenant!r} is corrupt") from exc


class SealedCodec:
    """A :class:`~factorial_tokens.sealing.PayloadCodec` that seals token sets with AES-GCM.

    Writes always seal under the keyring's newest key. Reads open any key of the ring.
    A plain ``j1:`` record is refused (TokenSealError): with a keyring, a record the key
    did not seal was written by someone without the key. ``allow_plaintext=True`` reads
    them anyway, for the migration of a store written before sealing was switched on:
    :meth:`TokenManager.rekey <factorial_tokens.TokenManager.rekey>` then seals every
    plain record, after which the default applies again.
    Anything that cannot be opened raises TokenSealError.
    """

    def __init__(self, keyring: Keyring, *, allow_plaintext: bool = False) -> None:
        if not isinstance(keyring, Keyring):
            raise ConfigurationError("SealedCodec needs a Keyring")
        self.keyring = keyring
        self.allow_plaintext = allow_plaintext
        self._plain = JsonCodec()

    def __repr__(self) -> str:
        return f"SealedCodec({self.keyring!r}, allow_plaintext={self.allow_plaintext})"

    def encode(self, key: TenantKey, tokens: TokenSet) -> bytes:
        """Seal ``tokens`` for ``key`` under the newest key."""
        plain = self._plain.encode(key, tokens)
        return self.keyring.seal(key, plain[len(_PLAIN) :])

    def decode(self, key: TenantKey, payload: bytes) -> TokenSet:
        """Open a payload written for ``key``; raises TokenSealError."""
        return self._plain.decode(key, _PLAIN + self._plaintext(key, payload))

    def reseal(self, key: TenantKey, payload: bytes) -> bytes:
        """The same token set sealed anew under the newest key (for rotation)."""
        return self.keyring.seal(key, self._plaintext(key, payload))

    def is_current(self, payload: bytes) -> bool:
        """True when ``payload`` is already sealed under the newest key."""
        return sealed_with(payload) == self.keyring.newest

    def _plaintext(self, key: TenantKey, payload: bytes) -> bytes:
        _check_written(key, payload)
        if payload.startswith(SEALED):
            return self.keyring.unseal(key, payload)
        if payload.startswith(_PLAIN):
            if not self.allow_plaintext:
                raise TokenSealError(
                    f"the record of tenant {key.tenant!r} is not sealed, but a keyring is set: it was "
                    "not written with the key (to migrate a store sealed late, open it with "
                    "allow_plaintext=True and run rekey)"
                )
            return payload[len(_PLAIN) :]
        raise TokenSealError(f"the record of tenant {key.tenant!r} has an unknown payload format")

"""A keyring: named AES-256 keys, the newest seals, every key opens; the ``s1:`` payload format.

See :mod:`factorial_tokens.sealing` for the format. Key material never appears in a repr,
a log line or an error message; only key ids do.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import os
import secrets
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._errors import ConfigurationError, TokenSealError
from ..store import TenantKey
from ._keyfile import KEY_BYTES, KID, format_keys, parse_keys, read_key_file, write_key_file

__all__ = ["KEYS_ENV", "SEALED", "Keyring", "sealed_with"]

#: The environment variable a :class:`~factorial_tokens.TokenManager` reads its keyring from.
KEYS_ENV = "FACTORIAL_TOKENS_KEYS"

_VERSION = b"s1"
#: Every sealed payload starts with this.
SEALED = _VERSION + b":"
_NONCE_BYTES = 12


def _aad(kid: str, key: TenantKey) -> bytes:
    """The associated data: binds a ciphertext to its format, key id, namespace and tenant."""
    text = [kid, key.namespace, key.tenant]
    parts = [b"factorial-tokens", _VERSION, *(t.encode("utf-8", "surrogatepass") for t in text)]
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


def _check_kid(kid: object) -> str:
    if not isinstance(kid, str) or not KID.fullmatch(kid):
        raise ConfigurationError("a key id is 1-40 characters of A-Z, a-z, 0-9, '_', '.', '-'")
    return kid


def _new_kid() -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    return f"k{stamp}-{secrets.token_hex(2)}"


class Keyring:
    """Named 32-byte AES keys, oldest first: the newest (last) seals, every key opens.

    Build one from ``(key id, key bytes)`` pairs, from text (:meth:`parse`), from the
    ``FACTORIAL_TOKENS_KEYS`` environment variable (:meth:`from_env`), from a key file
    (:meth:`from_file`), or :meth:`generate` a new one. Nothing here creates keys on its
    own: a keyring is always named explicitly (``factorial-tokens keygen`` writes one).

    Raises ConfigurationError for an empty keyring, a duplicate or malformed key id, or
    a key that is not 32 bytes. Neither the repr nor any error shows key material.
    """

    __slots__ = ("_aead", "_keys")

    def __init__(self, keys: Iterable[tuple[str, bytes]] | Mapping[str, bytes]) -> None:
        pairs = list(keys.items() if isinstance(keys, Mapping) else keys)
        if not pairs:
            raise ConfigurationError("a keyring needs at least one key")
        self._keys: dict[str, bytes] = {}
        for kid, key in pairs:
            _check_kid(kid)
            if kid in self._keys:
                raise ConfigurationError(f"key id {kid!r} appears twice in the keyring")
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise ConfigurationError(f"key {kid!r} must be {KEY_BYTES} bytes (AES-256)")
            self._keys[kid] = key
        self._aead = {kid: AESGCM(key) for kid, key in self._keys.items()}

    def __repr__(self) -> str:
        return f"Keyring(kids={self.kids!r}, newest={self.newest!r})"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Keyring is not picklable (it would copy key material)")

    @property
    def kids(self) -> tuple[str, ...]:
        """The key ids, oldest first."""
        return tuple(self._keys)

    @property
    def newest(self) -> str:
        """The id of the key that seals new writes."""
        return next(reversed(self._keys))

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    # -- building ----------------------------------------------------------------------

    @classmethod
    def generate(cls, kid: str | None = None) -> Keyring:
        """A keyring of one new random key (``kid`` defaults to ``k<UTC time>-<random>``)."""
        return cls([(_check_kid(kid) if kid is not None else _new_kid(), secrets.token_bytes(KEY_BYTES))])

    def rotated(self, kid: str | None = None) -> Keyring:
        """This keyring plus a new random key, which becomes the newest."""
        return Keyring([*self._keys.items(), *Keyring.generate(kid)._keys.items()])

    def without(self, *kids: str) -> Keyring:
        """This keyring without the given keys (raises ConfigurationError if none would remain)."""
        unknown = [kid for kid in kids if kid not in self._keys]
        if unknown:
            raise ConfigurationError(f"no key {unknown[0]!r} in the keyring (known: {', '.join(self.kids)})")
        return Keyring([(k, v) for k, v in self._keys.items() if k not in kids])

    @classmethod
    def parse(cls, text: str, *, source: str = "keyring text") -> Keyring:
        """Read ``kid:base64`` entries separated by commas or newlines, newest last.

        Blank entries and lines starting with ``#`` are ignored. Errors name ``source`` and
        the entry's position, never its content.
        """
        return cls(parse_keys(text, source))

    @classmethod
    def from_env(cls, name: str = KEYS_ENV, environ: Mapping[str, str] | None = None) -> Keyring | None:
        """The keyring in environment variable ``name``, or ``None`` when it is unset or blank."""
        text = (os.environ if environ is None else environ).get(name, "")
        if not text.strip():
            return None
        return cls.parse(text, source=name)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read a key file, refusing one that group or others may read or write.

        Raises ConfigurationError if the file is missing, too open, or malformed.
        """
        path = Path(path)
        return cls.parse(read_key_file(path), source=f"key file {str(path)!r}")

    def export(self) -> str:
        """The keyring as text (``kid:base64`` lines, newest last). This IS the secret:
        write it only to a 0600 file or a secret manager."""
        return format_keys(self._keys.items())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the keyring to ``path`` atomically with mode 0600 (replacing the file)."""
        write_key_file(Path(path), self.export())

    # -- sealing -----------------------------------------------------------------------

    def seal(self, key: TenantKey, plaintext: bytes) -> bytes:
        """``plaintext`` sealed for ``key`` under the newest key, as an ``s1:`` payload."""
        kid = self.newest
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead[kid].encrypt(nonce, plaintext, _aad(kid, key))
        return SEALED + kid.encode() + b":" + base64.urlsafe_b64encode(nonce + sealed)

    def unseal(self, key: TenantKey, payload: bytes) -> bytes:
        """The plaintext of an ``s1:`` payload sealed for ``key`` under any key of the ring;
        raises TokenSealError (unknown key id, tampered, another tenant's, malformed)."""
        kid_bytes, sep, body = payload[len(SEALED) :].partition(b":")
        kid = kid_bytes.decode("ascii", "replace")
        if not sep or not KID.fullmatch(kid):
            raise TokenSealError(f"the record of tenant {key.tenant!r} has a malformed sealed payload")
        aead = self._aead.get(kid)
        if aead is None:
            raise TokenSealError(
                f"the record of tenant {key.tenant!r} is sealed with key {kid!r}, which is not in the "
                f"keyring (known: {', '.join(self.kids)}); add that key to open it"
            )
        try:
            raw = base64.urlsafe_b64decode(body)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) < _NONCE_BYTES + 16:
            raise TokenSealError(f"the record of tenant {key.tenant!r} has a truncated sealed payload")
        try:
            return aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _aad(kid, key))
        except InvalidTag:
            raise TokenSealError(
                f"the record of tenant {key.tenant!r} failed authentication under key {kid!r}: "
                "a different key with the same id, a tampered record, or a record copied "
                "from another tenant"
            ) from None


def sealed_with(payload: bytes) -> str | None:
    """The key id a payload was sealed with, or ``None`` for a payload that is not sealed."""
    if not payload.startswith(SEALED):
        return None
    kid = payload[len(SEALED) :].partition(b":")[0].decode("ascii", "replace")
    return kid if KID.fullmatch(kid) else None

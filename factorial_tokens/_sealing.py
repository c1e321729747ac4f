"""Token material sealed at rest: AES-GCM under a keyring, bound to its tenant.

A :class:`SealedCodec` turns a token set into a payload that only a holder of the key can
open, and only for the tenant it was written for. Stores never change: they keep the
payload as opaque bytes, next to the metadata they need in the clear (status, expiry,
version) for listings.

Payload format (version ``s1``), ASCII only, so any store column can hold it::

    s1:<key id>:<base64url(nonce || ciphertext || tag)>

* ``nonce``: 12 random bytes (96 bits), fresh for every write;
* ``ciphertext || tag``: AES-256-GCM of the token set's JSON (what the plain codec
  writes after ``j1:``), with a 16-byte tag;
* associated data: ``b"factorial-tokens"`` followed by the format version, the key id,
  the namespace and the tenant id, each as a 4-byte big-endian length and its UTF-8
  bytes. A payload copied into another tenant's (or another app's) record, or relabelled
  with another key id, fails authentication and raises :class:`TokenSealError`.

Keys are 32 random bytes, each named by a key id (``[A-Za-z0-9_.-]``, at most 40
characters). A keyring lists them oldest first: the **last** key seals, every key opens.
The textual form, used by ``FACTORIAL_TOKENS_KEYS`` and key files, is one
``<key id>:<base64 key>`` entry per key, separated by commas or newlines, newest last;
in files, blank lines and lines starting with ``#`` are ignored.

Key material never appears in a repr, a log line or an error message; only key ids do.

Limitations: sealing hides token material, not metadata (tenant ids, expiry times,
status, versions stay readable). An attacker who can write to the store can put back an
older sealed record of the *same* tenant (a rollback); GCM cannot tell an old genuine
record from the current one. See ``docs/security.md``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import logging
import os
import re
import secrets
import stat
import struct
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._codec import JsonCodec
from ._errors import ConfigurationError, FactorialTokensError, RefreshTimeout, TokenSealError
from ._models import TokenSet
from .store import Lease, Record, Store, TenantKey, Update, acquire_within

if TYPE_CHECKING:
    from ._manager import TokenManager

__all__ = ["Keyring", "SealedCodec", "rekey"]

log = logging.getLogger("factorial_tokens")

#: The environment variable a :class:`~factorial_tokens.TokenManager` reads its keyring from.
KEYS_ENV = "FACTORIAL_TOKENS_KEYS"

_VERSION = b"s1"
_SEALED = _VERSION + b":"
_PLAIN = b"j1:"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_KID = re.compile(r"[A-Za-z0-9_.\-]{1,40}")


def _aad(kid: str, key: TenantKey) -> bytes:
    """The associated data: binds a ciphertext to its format, key id, namespace and tenant."""
    text = [kid, key.namespace, key.tenant]
    parts = [b"factorial-tokens", _VERSION, *(t.encode("utf-8", "surrogatepass") for t in text)]
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


def _check_kid(kid: object) -> str:
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
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
            if not isinstance(key, bytes) or len(key) != _KEY_BYTES:
                raise ConfigurationError(f"key {kid!r} must be {_KEY_BYTES} bytes (AES-256)")
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
        return cls([(_check_kid(kid) if kid is not None else _new_kid(), secrets.token_bytes(_KEY_BYTES))])

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
        pairs: list[tuple[str, bytes]] = []
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        entries = [e.strip() for line in lines for e in line.split(",") if e.strip()]
        for position, entry in enumerate(entries, 1):
            kid, sep, encoded = entry.partition(":")
            kid = kid.strip()
            if not sep or not _KID.fullmatch(kid):
                raise ConfigurationError(f"{source}: entry {position} is not '<key id>:<base64 key>'")
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise ConfigurationError(
                    f"{source}: key {kid!r} (entry {position}) is not valid base64"
                ) from None
            if len(key) != _KEY_BYTES:
                raise ConfigurationError(
                    f"{source}: key {kid!r} (entry {position}) decodes to {len(key)} bytes, not {_KEY_BYTES}"
                )
            pairs.append((kid, key))
        if not pairs:
            raise ConfigurationError(f"{source}: no key found")
        return cls(pairs)

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
        try:
            with path.open("rb") as handle:
                mode = os.fstat(handle.fileno()).st_mode
                if os.name == "posix" and mode & 0o077:
                    raise ConfigurationError(
                        f"key file {str(path)!r} is accessible to group or others "
                        f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
                    )
                data = handle.read()
        except FileNotFoundError:
            raise ConfigurationError(f"key file {str(path)!r} does not exist") from None
        except OSError as exc:
            raise ConfigurationError(f"key file {str(path)!r} cannot be read: {exc.strerror}") from None
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise ConfigurationError(f"key file {str(path)!r} is not a text key file") from None
        return cls.parse(text, source=f"key file {str(path)!r}")

    def export(self) -> str:
        """The keyring as text (``kid:base64`` lines, newest last). This IS the secret:
        write it only to a 0600 file or a secret manager."""
        return "".join(f"{kid}:{base64.b64encode(key).decode()}\n" for kid, key in self._keys.items())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the keyring to ``path`` atomically with mode 0600 (replacing the file)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                os.fchmod(handle.fileno(), 0o600)
                handle.write("# factorial-tokens keys: <key id>:<base64 key>, newest last\n")
                handle.write(self.export())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- sealing -----------------------------------------------------------------------

    def _seal(self, key: TenantKey, plaintext: bytes) -> bytes:
        kid = self.newest
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead[kid].encrypt(nonce, plaintext, _aad(kid, key))
        return _SEALED + kid.encode() + b":" + base64.urlsafe_b64encode(nonce + sealed)

    def _open(self, key: TenantKey, payload: bytes) -> bytes:
        kid_bytes, sep, body = payload[len(_SEALED) :].partition(b":")
        kid = kid_bytes.decode("ascii", "replace")
        if not sep or not _KID.fullmatch(kid):
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
    if not payload.startswith(_SEALED):
        return None
    kid = payload[len(_SEALED) :].partition(b":")[0].decode("ascii", "replace")
    return kid if _KID.fullmatch(kid) else None


class SealedCodec:
    """A :class:`~factorial_tokens.PayloadCodec` that seals token sets with AES-GCM.

    Writes always seal under the keyring's newest key. Reads open any key of the ring.
    A plain ``j1:`` record is refused (TokenSealError): with a keyring, a record the key
    did not seal was written by someone without the key. ``allow_plaintext=True`` reads
    them anyway, for the migration of a store written before sealing was switched on:
    :func:`rekey` then seals every plain record, after which the default applies again.
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
        return self.keyring._seal(key, plain[len(_PLAIN) :])

    def decode(self, key: TenantKey, payload: bytes) -> TokenSet:
        """Open a payload written for ``key``; raises TokenSealError."""
        return self._plain.decode(key, _PLAIN + self._plaintext(key, payload))

    def reseal(self, key: TenantKey, payload: bytes) -> bytes:
        """The same token set sealed anew under the newest key (for rotation)."""
        return self.keyring._seal(key, self._plaintext(key, payload))

    def is_current(self, payload: bytes) -> bool:
        """True when ``payload`` is already sealed under the newest key."""
        return sealed_with(payload) == self.keyring.newest

    def _plaintext(self, key: TenantKey, payload: bytes) -> bytes:
        if payload.startswith(_SEALED):
            return self.keyring._open(key, payload)
        if payload.startswith(_PLAIN):
            if not self.allow_plaintext:
                raise TokenSealError(
                    f"the record of tenant {key.tenant!r} is not sealed, but a keyring is set: it was "
                    "not written with the key (to migrate a store sealed late, open it with "
                    "allow_plaintext=True and run rekey)"
                )
            return payload[len(_PLAIN) :]
        raise TokenSealError(f"the record of tenant {key.tenant!r} has an unknown payload format")


# -- rotation ----------------------------------------------------------------------------


async def rekey(
    target: TokenManager | Store,
    keyring: Keyring,
    namespace: str | None = None,
    *,
    lease_ttl: float = 10.0,
    wait_timeout: float = 60.0,
) -> int:
    """Re-seal every record of ``namespace`` under ``keyring``'s newest key; return how many.

    ``target`` is a TokenManager (its store and, by default, its app's client id as the
    namespace) or a Store (``namespace`` required). Plain ``j1:`` records are sealed too:
    this completes a migration to sealing (workers opened with ``allow_plaintext=True``
    until then).
    Records already sealed under the newest key are left alone.

    Safe while workers run: each tenant is re-sealed under its lease (a busy tenant is
    retried after the others, waiting for its holder to finish) and written with a fenced
    ``commit`` that keeps status and expiry, so a concurrent refresh is never overwritten.
    Workers must already know every key of ``keyring`` (see ``docs/security.md``).

    Raises TokenSealError after processing every other tenant if some records could not
    be opened (their count and tenant ids in the message; those records are left intact),
    RefreshTimeout if a tenant's lease stayed busy for ``wait_timeout``, StoreUnavailable.
    """
    from ._manager import TokenManager

    if isinstance(target, TokenManager):
        store: Store = target.store
        namespace = target.app.client_id if namespace is None else namespace
    else:
        store = target
    if namespace is None:
        raise ConfigurationError("rekey on a store needs the namespace (the app's client id)")
    codec = SealedCodec(keyring, allow_plaintext=True)
    pending = [r.key for r in await store.tenants(namespace) if not codec.is_current(r.payload)]
    done = 0
    unopened: list[str] = []
    busy: list[TenantKey] = []
    for key in pending:  # first pass: never wait, defer busy tenants
        outcome = await _reseal_one(store, codec, key, lease_ttl, wait=None)
        if outcome is None:
            busy.append(key)
        elif isinstance(outcome, TokenSealError):
            unopened.append(key.tenant)
        else:
            done += outcome
    for key in busy:
        outcome = await _reseal_one(store, codec, key, lease_ttl, wait=wait_timeout)
        if isinstance(outcome, TokenSealError):
            unopened.append(key.tenant)
        elif outcome is None:
            raise RefreshTimeout(
                f"rekey: tenant {key.tenant!r}'s lease stayed busy for {wait_timeout:g}s "
                f"({done} records re-sealed so far; run rekey again)"
            )
        else:
            done += outcome
    log.info("rekey: %d records of %r re-sealed under key %r", done, namespace, keyring.newest)
    if unopened:
        shown = ", ".join(repr(t) for t in unopened[:10]) + (", ..." if len(unopened) > 10 else "")
        raise TokenSealError(
            f"rekey: {done} records re-sealed, {len(unopened)} could not be opened and were left "
            f"intact: {shown}"
        )
    return done


async def _reseal_one(
    store: Store, codec: SealedCodec, key: TenantKey, ttl: float, *, wait: float | None
) -> int | TokenSealError | None:
    """Re-seal one tenant under its lease: 1 if written, 0 if nothing to do, the error if
    its record cannot be opened, ``None`` if its lease stayed busy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (wait or 0.0)
    while True:
        won = await acquire_within(store, key, ttl, deadline - loop.time())
        if won is None or won.lease is None:
            return None
        result = await _reseal_held(store, codec, won.lease, won.record)
        if result is not None:
            return result
        # Fenced out (a replace in between): read again under a new lease.


async def _reseal_held(
    store: Store, codec: SealedCodec, lease: Lease, record: Record | None
) -> int | TokenSealError | None:
    committed = False
    try:
        if record is None or codec.is_current(record.payload):
            return 0  # forgotten, or re-sealed (by a writer with the new key) since we listed it
        try:
            payload = codec.reseal(lease.key, record.payload)
        except TokenSealError as exc:
            log.error("rekey: %s", exc)
            return exc
        update = Update(payload, record.status, record.expires_at, record.updated_at)
        committed = True
        return None if await store.commit(lease, update) is None else 1
    finally:
        if not committed:
            with contextlib.suppress(FactorialTokensError):
                await asyncio.shield(store.release(lease))

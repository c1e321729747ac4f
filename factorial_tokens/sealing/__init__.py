"""Token material sealed at rest: AES-GCM under a keyring, bound to its tenant.

The package holds the keyring (:class:`Keyring`, key files), the codecs that turn a token
set into a store payload (:class:`JsonCodec`, :class:`SealedCodec`, the
:class:`PayloadCodec` protocol); re-sealing a store under a new key is
:meth:`TokenManager.rekey <factorial_tokens.TokenManager.rekey>`.

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

from ._codec import JsonCodec, PayloadCodec, SealedCodec
from ._keyring import KEYS_ENV, Keyring, sealed_with

__all__ = ["KEYS_ENV", "JsonCodec", "Keyring", "PayloadCodec", "SealedCodec", "sealed_with"]

"""Notices: what a refresh's announcement carries to the workers waiting for it.

A worker refused a tenant's lease waits for the holder's announcement, then would read the
record. The holder's commit can carry the record in its announcement instead (the store
publishes ``Update.notice`` with the digest), which saves that read. Announcement channels
are wider than the records (any role that can connect to Postgres may LISTEN and NOTIFY;
Redis ACLs grant channels apart from keys), so a notice is sealed with AES-GCM under a key
derived from the app's client secret, bound to the tenant's digest: listeners without the
secret learn nothing, and a forged notice is refused (its reader reads the record, as
before). A replayed notice is genuine but old: the reader takes one only when its version
is above the version the reader's refused acquisition saw.
"""

from __future__ import annotations

import math
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._secret import AppSecret
from .store import Record, TenantKey, TenantStatus, Update

__all__: list[str] = []

_AAD = b"factorial-tokens/notice/v1\x00"
_HEAD = struct.Struct(">Qdd")  # version, expires_at (NaN: none), updated_at
_STATUS = {status: index for index, status in enumerate(TenantStatus)}
_STATUSES = list(TenantStatus)
_NONCE = 12


class Notices:
    """Seals a commit's record into its notice, and opens notices other workers sealed."""

    __slots__ = ("_aead",)

    def __init__(self, secret: AppSecret) -> None:
        self._aead = AESGCM(secret.signing_key(b"notice"))

    def __repr__(self) -> str:
        return "Notices()"

    def seal(self, key: TenantKey, version: int, update: Update) -> bytes:
        """The notice of ``update`` written as ``version`` of ``key``'s record."""
        expires = math.nan if update.expires_at is None else update.expires_at
        plain = (
            _HEAD.pack(version, expires, update.updated_at)
            + bytes((_STATUS[update.status],))
            + update.payload
        )
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, plain, _AAD + key.digest.encode())

    def open(self, key: TenantKey, notice: bytes) -> Record | None:
        """The record a notice sealed for ``key`` carries; ``None`` if it is not one."""
        if len(notice) <= _NONCE + _HEAD.size:
            return None
        try:
            plain = self._aead.decrypt(notice[:_NONCE], notice[_NONCE:], _AAD + key.digest.encode())
        except InvalidTag:
            return None
        if len(plain) <= _HEAD.size or plain[_HEAD.size] >= len(_STATUSES):
            return None
        version, expires, updated = _HEAD.unpack_from(plain)
        status = _STATUSES[plain[_HEAD.size]]
        payload = plain[_HEAD.size + 1 :]
        return Record(key, payload, status, version, None if math.isnan(expires) else expires, updated)

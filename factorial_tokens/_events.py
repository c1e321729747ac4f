"""Events the manager emits: for alerts (a company must reconnect) and audit trails."""

from __future__ import annotations

import enum
import time

import attrs

__all__ = ["EventKind", "TokenEvent"]


class EventKind(enum.Enum):
    """What happened to a tenant's tokens."""

    EXCHANGED = "exchanged"  # a code became tokens
    REFRESHED = "refreshed"  # this process refreshed the tenant's tokens
    REFRESH_FAILED = "refresh_failed"  # a background refresh failed; callers kept the token
    REAUTHORIZATION_REQUIRED = "reauthorization_required"  # the grant is dead
    REVOKED = "revoked"  # revoked at Factorial and forgotten
    FORGOTTEN = "forgotten"  # removed from the store
    SEAL_ERROR = "seal_error"  # a stored record could not be opened


@attrs.frozen
class TokenEvent:
    """One event. ``fingerprint`` identifies the access token without revealing it."""

    kind: EventKind
    tenant: str
    fingerprint: str | None = None
    version: int | None = None
    detail: str = ""
    at: float = attrs.field(factory=time.time)

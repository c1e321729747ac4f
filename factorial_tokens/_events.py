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
    RECONNECTED = "reconnected"  # a new grant replaced the tenant's previous one (revoked)
    COMPANY_MISMATCH = "company_mismatch"  # a grant of another company was refused and revoked


@attrs.frozen
class TokenEvent:
    """One event. ``fingerprint`` identifies the access token without revealing it.

    ``company_id`` is the grant's company where known (``exchanged``, ``reconnected``,
    ``company_mismatch``); ``previous_company_id`` the company of the replaced or kept grant.
    """

    kind: EventKind
    tenant: str
    fingerprint: str | None = None
    version: int | None = None
    detail: str = ""
    at: float = attrs.field(factory=time.time)
    company_id: str | None = None
    previous_company_id: str | None = None

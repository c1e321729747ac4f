"""The exceptions factorial-tokens raises, all rooted at one class.

::

    FactorialTokensError
    ├── ConfigurationError          bad settings, unknown store URL, time budgets that do not fit
    ├── InvalidTenant (ValueError)  a tenant id that is empty, too long, or holds control, format,
    │                               private-use, surrogate or line/paragraph separator characters
    ├── InvalidState                a callback ``state`` (or connect link) forged, expired, another
    │   │                           app's, or from another browser than the one that started it
    │   └── StateReused             a ``state`` already completed with another authorization code
    ├── AuthorizationDenied         the callback carried ``error=`` (the admin did not grant access)
    ├── CompanyMismatch             a grant of another company than the one the tenant is pinned to
    ├── InvalidCallback (ValueError) a callback's code is missing or malformed
    ├── CodeReused                  an authorization code already presented for another tenant
    ├── TenantNotConnected          no tokens are stored for this tenant
    ├── ReauthorizationRequired     the grant is dead: the company must connect again
    │   ├── RotationLost            a refresh in doubt was followed by ``invalid_grant``
    │   └── ExchangeInDoubt         a code was sent but its answer was never seen
    ├── ProviderError               Factorial answered with an error (status, error, description)
    │   └── RequestInDoubt          the request may have been processed; its answer was not seen
    ├── StoreUnavailable            the token store cannot be reached or answered nonsense
    ├── RefreshTimeout              waited longer than ``wait_timeout`` for another worker's refresh
    ├── TokenSealError              a stored record cannot be opened (wrong key, tampered, moved)
    └── ManagerClosed               the manager was used after ``aclose()``

No message built here ever holds a token or a client secret: callers pass fingerprints.
"""

from __future__ import annotations

__all__ = [
    "AuthorizationDenied",
    "CodeReused",
    "CompanyMismatch",
    "ConfigurationError",
    "ExchangeInDoubt",
    "FactorialTokensError",
    "InvalidCallback",
    "InvalidState",
    "InvalidTenant",
    "ManagerClosed",
    "ProviderError",
    "ReauthorizationRequired",
    "RefreshTimeout",
    "RequestInDoubt",
    "RotationLost",
    "StateReused",
    "StoreUnavailable",
    "TenantNotConnected",
    "TokenSealError",
]


class FactorialTokensError(Exception):
    """Root of every error this library raises."""


class ConfigurationError(FactorialTokensError):
    """The library was configured in a way that cannot work."""


class InvalidTenant(FactorialTokensError, ValueError):
    """A tenant id was rejected at the edge: empty, longer than 200 characters, or holding a
    character of the Unicode categories Cc, Cf, Co, Cs, Zl or Zp (controls, zero-width and
    bidi marks, private use, surrogates, line and paragraph separators)."""


class InvalidState(FactorialTokensError):
    """An OAuth ``state`` value (or a connect link) failed verification: tampered, expired,
    malformed, or presented by another browser than the one it was bound to."""


class StateReused(InvalidState):
    """A ``state`` was already completed with another authorization code: each is single-use."""


class AuthorizationDenied(FactorialTokensError):
    """The callback carried an OAuth ``error`` (the admin refused, or Factorial failed).

    Raised only for a callback whose ``state`` is valid; nothing is sent to Factorial.
    ``error`` is the OAuth error code, reduced to at most 64 characters of ``[A-Za-z0-9_.-]``.
    """

    def __init__(self, tenant: str, error: str) -> None:
        super().__init__(f"access to Factorial was not granted for tenant {tenant!r} ({error})")
        self.tenant = tenant
        self.error = error


class CompanyMismatch(FactorialTokensError):
    """A tenant connected to one company received a grant of another company.

    The tenant's stored tokens are left untouched and the unwanted new grant is revoked at
    Factorial. Pass ``allow_company_change=True`` to replace the company on purpose.
    Company ids are not secrets; no token appears in the message.
    """

    def __init__(self, tenant: str, expected: str, got: str) -> None:
        super().__init__(
            f"tenant {tenant!r} is connected to company {expected}, but this authorization is for "
            f"company {got}: refused and revoked at Factorial (to move the tenant to another "
            "company on purpose, pass allow_company_change=True)"
        )
        self.tenant = tenant
        self.expected = expected
        self.got = got


class InvalidCallback(FactorialTokensError, ValueError):
    """A callback parameter (the authorization code) is missing or malformed."""


class CodeReused(FactorialTokensError):
    """An authorization code was presented for a tenant other than the one that first claimed it."""


class TenantNotConnected(FactorialTokensError, LookupError):
    """No token set is stored for the tenant: it never connected, or was forgotten."""

    def __init__(self, tenant: str) -> None:
        super().__init__(f"tenant {tenant!r} is not connected: no tokens are stored for it")
        self.tenant = tenant


class ReauthorizationRequired(FactorialTokensError):
    """The tenant's grant is dead; the company must go through the authorization flow again.

    Raised to every waiter at once; no further refresh is attempted for the tenant until
    a new code is exchanged.
    """

    def __init__(self, tenant: str, reason: str) -> None:
        super().__init__(f"tenant {tenant!r} must connect again: {reason}")
        self.tenant = tenant
        self.reason = reason


class RotationLost(ReauthorizationRequired):
    """A refresh whose answer was lost was retried once and then refused with ``invalid_grant``.

    The provider most likely rotated the refresh token in the request whose answer never
    arrived, so the new tokens are gone.
    """


class ExchangeInDoubt(ReauthorizationRequired):
    """An authorization code was sent but no answer was seen; a code is never sent twice."""


class ProviderError(FactorialTokensError):
    """Factorial (or a proxy in front of it) answered with an error or an unreadable body.

    Attributes:
        status: the HTTP status, or ``None`` when no answer arrived.
        error: the OAuth ``error`` code (``invalid_grant``, ...) or a code of ours such as
            ``invalid_response``, ``timeout``, ``connection_error``.
        description: a short, token-free explanation or body excerpt.
    """

    def __init__(self, status: int | None, error: str, description: str = "") -> None:
        text = f"Factorial answered {status}: {error}" if status else f"Factorial request failed: {error}"
        super().__init__(f"{text} ({description})" if description else text)
        self.status = status
        self.error = error
        self.description = description


class RequestInDoubt(ProviderError):
    """The request may have been processed by Factorial, but its answer was not seen.

    Raised for token requests (exchange, refresh) after a read timeout, a dropped
    connection, a gateway error or an unreadable success body. Never retried blindly.
    """


class StoreUnavailable(FactorialTokensError):
    """The token store could not be reached, or failed mid-operation."""


class RefreshTimeout(FactorialTokensError):
    """Another worker held the tenant's lease for longer than this caller may wait."""


class TokenSealError(FactorialTokensError):
    """A stored token record could not be opened: unknown key, tampering, or another tenant's."""


class ManagerClosed(FactorialTokensError):
    """The TokenManager was used after it was closed."""

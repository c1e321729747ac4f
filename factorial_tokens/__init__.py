"""factorial-tokens: keep Factorial HR OAuth tokens valid for many companies at once,
across many worker processes and hosts, without ever breaking a company's grant."""

from . import _errors
from ._client import TenantSession
from ._codec import JsonCodec, PayloadCodec
from ._errors import (
    AuthorizationDenied,
    CodeReused,
    CompanyMismatch,
    ConfigurationError,
    ExchangeInDoubt,
    FactorialTokensError,
    InvalidCallback,
    InvalidState,
    InvalidTenant,
    ManagerClosed,
    ProviderError,
    ReauthorizationRequired,
    RefreshTimeout,
    RequestInDoubt,
    RotationLost,
    StateReused,
    StoreUnavailable,
    TenantNotConnected,
    TokenSealError,
)
from ._events import EventKind, TokenEvent
from ._health import Health
from ._keepalive import KeepAliveReport
from ._manager import CallbackResult, TenantInfo, TokenManager
from ._memory import MemoryStore
from ._models import Credentials, FactorialApp, TokenSet
from ._sealing import Keyring, SealedCodec, rekey
from ._sqlite import SQLiteStore
from ._store import (
    CLAIM_RETENTION,
    Acquisition,
    ChangeListener,
    ClaimState,
    CodeClaim,
    Lease,
    Notifier,
    Record,
    Store,
    TenantKey,
    TenantStatus,
    Throttle,
    ThrottleState,
    Update,
    Watch,
    hold_digest,
    store_from_url,
)

__version__ = "0.1.0"

# Errors read as ``factorial_tokens.InvalidState`` in tracebacks and reprs, where users
# import them from (as httpx does); pickling finds them here too.
for _name in _errors.__all__:
    getattr(_errors, _name).__module__ = __name__
del _name

__all__ = [
    "CLAIM_RETENTION",
    "Acquisition",
    "AuthorizationDenied",
    "CallbackResult",
    "ChangeListener",
    "ClaimState",
    "CodeClaim",
    "CodeReused",
    "CompanyMismatch",
    "ConfigurationError",
    "Credentials",
    "EventKind",
    "ExchangeInDoubt",
    "FactorialApp",
    "FactorialTokensError",
    "Health",
    "InvalidCallback",
    "InvalidState",
    "InvalidTenant",
    "JsonCodec",
    "KeepAliveReport",
    "Keyring",
    "Lease",
    "ManagerClosed",
    "MemoryStore",
    "Notifier",
    "PayloadCodec",
    "ProviderError",
    "ReauthorizationRequired",
    "Record",
    "RefreshTimeout",
    "RequestInDoubt",
    "RotationLost",
    "SQLiteStore",
    "SealedCodec",
    "StateReused",
    "Store",
    "StoreUnavailable",
    "TenantInfo",
    "TenantKey",
    "TenantNotConnected",
    "TenantSession",
    "TenantStatus",
    "Throttle",
    "ThrottleState",
    "TokenEvent",
    "TokenManager",
    "TokenSealError",
    "TokenSet",
    "Update",
    "Watch",
    "hold_digest",
    "rekey",
    "store_from_url",
]

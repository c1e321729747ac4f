"""factorial-tokens: keep Factorial HR OAuth tokens valid for many companies at once,
across many worker processes and hosts, without ever breaking a company's grant."""

from . import _errors
from ._client import TenantSession
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
from ._manager import TokenManager
from ._models import CallbackResult, Credentials, FactorialApp, TenantInfo, TokenSet
from ._version import __version__ as __version__
from .sealing import Keyring

# Errors read as ``factorial_tokens.InvalidState`` in tracebacks and reprs, where users
# import them from (as httpx does); pickling finds them here too.
for _name in _errors.__all__:
    getattr(_errors, _name).__module__ = __name__
del _name

__all__ = [
    "AuthorizationDenied",
    "CallbackResult",
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
    "KeepAliveReport",
    "Keyring",
    "ManagerClosed",
    "ProviderError",
    "ReauthorizationRequired",
    "RefreshTimeout",
    "RequestInDoubt",
    "RotationLost",
    "StateReused",
    "StoreUnavailable",
    "TenantInfo",
    "TenantNotConnected",
    "TenantSession",
    "TokenEvent",
    "TokenManager",
    "TokenSealError",
    "TokenSet",
]

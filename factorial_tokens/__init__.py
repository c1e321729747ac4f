"""factorial-tokens: keep Factorial HR OAuth tokens valid for many companies at once,
across many worker processes and hosts, without ever breaking a company's grant."""

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
from ._models import (
    CallbackResult,
    Credentials,
    FactorialApp,
    TenantInfo,
    TokenSet,
    fingerprint,
    validate_tenant,
)
from ._serve import ConnectCheck, connect_app
from ._telemetry import Telemetry, TenantCounts
from ._version import __version__ as __version__
from .sealing import Keyring

__all__ = [
    "AuthorizationDenied",
    "CallbackResult",
    "CodeReused",
    "CompanyMismatch",
    "ConfigurationError",
    "ConnectCheck",
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
    "Telemetry",
    "TenantCounts",
    "TenantInfo",
    "TenantNotConnected",
    "TenantSession",
    "TokenEvent",
    "TokenManager",
    "TokenSealError",
    "TokenSet",
    "connect_app",
    "fingerprint",
    "validate_tenant",
]

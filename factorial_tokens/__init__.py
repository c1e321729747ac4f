"""factorial-tokens: keep Factorial HR OAuth tokens valid for many companies at once,
across many worker processes and hosts, without ever breaking a company's grant."""

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
from ._models import Credentials, FactorialApp, TokenSet, fingerprint, validate_tenant
from ._sealing import Keyring, SealedCodec, rekey
from ._serve import ConnectCheck, connect_app
from ._telemetry import Telemetry, TenantCounts

__version__ = "0.1.0"

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
    "JsonCodec",
    "KeepAliveReport",
    "Keyring",
    "ManagerClosed",
    "PayloadCodec",
    "ProviderError",
    "ReauthorizationRequired",
    "RefreshTimeout",
    "RequestInDoubt",
    "RotationLost",
    "SealedCodec",
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
    "rekey",
    "validate_tenant",
]

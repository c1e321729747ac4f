"""Value types: the app's credentials, a token set, a token's owner, tenant ids, and what
the manager answers about tenants (listings, completed callbacks)."""

from __future__ import annotations

import hashlib
import math
import time
import unicodedata
from typing import Any
from urllib.parse import SplitResult, urlsplit

import attrs

from ._errors import InvalidTenant
from .store import TenantStatus

__all__ = [
    "DEFAULT_API_VERSION",
    "MAX_TENANT_LENGTH",
    "CallbackResult",
    "Credentials",
    "FactorialApp",
    "TenantInfo",
    "TokenSet",
    "fingerprint",
    "validate_tenant",
]

DEFAULT_API_VERSION = "2025-10-01"
MAX_TENANT_LENGTH = 200


def fingerprint(secret: str | None) -> str:
    """A short, stable, non-reversible label for a secret, safe for logs (``sha256:1a2b3c4d``)."""
    if not secret:
        return "none"
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def redact_url(url: str) -> str:
    """``url`` without its password (store URLs may hold one)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL urlsplit can read: nothing of it is shown
        return "<unreadable URL>"
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _redacted(value: str | None) -> str:
    return "None" if value is None else f"<{fingerprint(value)}>"


#: Unicode categories refused in tenant ids: controls, format characters (zero-width,
#: bidi overrides), private use, surrogates, line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Zl", "Zp"})


def validate_tenant(tenant: object) -> str:
    """Return ``tenant`` NFC-normalised if it is a valid tenant id, else raise :class:`InvalidTenant`.

    A tenant id is a non-empty string of at most 200 characters (after NFC normalisation)
    with no character of the categories Cc, Cf, Co, Cs, Zl or Zp, so two ids that look
    the same are the same id (``"acme\\u200b"`` is refused; a decomposed ``"café"`` is the
    composed one), and not ``"."`` or ``".."``, which no URL path can carry (a connect
    link's ``/connect/..`` is read as the parent path). Stores never build keys or
    queries by pasting it in: they hash it or bind it as a parameter.
    """
    if not isinstance(tenant, str):
        raise InvalidTenant(f"tenant id must be a string, not {type(tenant).__name__}")
    if not tenant:
        raise InvalidTenant("tenant id must not be empty")
    if tenant in (".", ".."):
        raise InvalidTenant("tenant id must not be '.' or '..' (URL paths drop such segments)")
    if len(tenant) > 4 * MAX_TENANT_LENGTH:
        raise InvalidTenant(f"tenant id is {len(tenant)} characters long; at most {MAX_TENANT_LENGTH}")
    if not (tenant.isascii() and tenant.isprintable()):
        for ch in tenant:
            category = unicodedata.category(ch)
            if category in _REFUSED_CATEGORIES:
                raise InvalidTenant(
                    "tenant id holds a control, invisible or separator character "
                    f"(U+{ord(ch):04X}, {category})"
                )
        tenant = unicodedata.normalize("NFC", tenant)
    if len(tenant) > MAX_TENANT_LENGTH:
        raise InvalidTenant(f"tenant id is {len(tenant)} characters long; at most {MAX_TENANT_LENGTH}")
    return tenant


def _strip_slash(url: str) -> str:
    return str(url).rstrip("/")


def split_url(url: str) -> SplitResult | None:
    """``urlsplit(url)``, or None when it cannot be read: an unclosed or invalid [host],
    an impossible port (which ``urlsplit`` reports only when they are asked for)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - an impossible port (and a bad [host]) raises here
    except ValueError:
        return None
    return parts


def _check_url(name: str, value: str) -> None:
    parts = split_url(value)
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{name} must be an absolute http(s) URL, got {redact_url(value)!r}")
    if parts.username is not None or parts.password is not None:
        # Not quoted: it holds a password.
        raise ValueError(f"{name} must not hold user credentials (user:password@)")


def _check_encodable(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    """Refuse a value that is no text UTF-8 can carry (a lone surrogate from a mis-decoded
    environment); the value itself is not shown (it may be the secret)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{attribute.name} is not valid UTF-8 text") from None


@attrs.frozen
class FactorialApp:
    """One OAuth application registered at Factorial.

    ``client_secret`` never appears in a repr. ``base_url`` is production by default;
    point it at a demo host or a local simulator for tests. ``api_version`` picks the
    dated API version used for the credentials endpoint.
    """

    client_id: str = attrs.field(
        validator=attrs.validators.and_(attrs.validators.min_len(1), _check_encodable)
    )
    client_secret: str = attrs.field(
        repr=False, validator=attrs.validators.and_(attrs.validators.min_len(1), _check_encodable)
    )
    redirect_uri: str = attrs.field()
    base_url: str = attrs.field(default="https://api.factorialhr.com", converter=_strip_slash)
    scope: str | None = None
    api_version: str = DEFAULT_API_VERSION

    @redirect_uri.validator
    def _check_redirect(self, _: attrs.Attribute[str], value: str) -> None:
        _check_url("redirect_uri", value)

    @base_url.validator
    def _check_base(self, _: attrs.Attribute[str], value: str) -> None:
        _check_url("base_url", value)


@attrs.frozen
class TokenSet:
    """An access token with its refresh token and lifetime, as Factorial issued it.

    ``expires_at`` is the wall-clock time the request was sent plus ``expires_in``;
    ``None`` means the token does not expire (Factorial's company tokens). ``company_id``
    is the Factorial company the grant belongs to, learnt from the credentials endpoint
    when the code was exchanged (the tenant is pinned to it); ``None`` if unknown. ``repr``
    and ``str`` show fingerprints, never the tokens.
    """

    access_token: str = attrs.field(repr=_redacted, validator=attrs.validators.min_len(1))
    refresh_token: str | None = attrs.field(default=None, repr=_redacted)
    token_type: str = "Bearer"
    scope: str | None = None
    expires_at: float | None = None
    obtained_at: float = attrs.field(factory=time.time)
    created_at: int | None = None
    company_id: str | None = None

    @property
    def lifetime(self) -> float | None:
        """Seconds between obtaining the token and its expiry, or ``None`` if it never expires."""
        return None if self.expires_at is None else self.expires_at - self.obtained_at

    def refresh_due_at(self, leeway: float) -> float:
        """When this token should be replaced: ``leeway`` before expiry, but never before
        half its lifetime, so a lifetime shorter than the leeway does not refresh on every call.
        """
        if self.expires_at is None:
            return math.inf
        lifetime = max(self.expires_at - self.obtained_at, 0.0)
        return self.expires_at - min(leeway, lifetime / 2)

    def is_expired(self, now: float | None = None) -> bool:
        """True once the access token's expiry has passed."""
        return self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at

    @property
    def fingerprint(self) -> str:
        """The access token's fingerprint, for logs and events."""
        return fingerprint(self.access_token)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict holding the secrets: for stores and sealing only."""
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenSet:
        """Rebuild a token set written by :meth:`to_dict`; ValueError if ``data`` is not
        one (a field unknown, or of another type: a store's contents may be tampered with)."""
        if not isinstance(data, dict):
            raise ValueError(f"a token set is an object, not a {type(data).__name__}")
        for name, value in data.items():
            kinds = _STORED_KINDS.get(name)
            if kinds is None:
                raise ValueError(f"unknown token set field {name!r}")
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"token set field {name!r} is a {type(value).__name__}")
        return cls(**data)

    def __str__(self) -> str:
        return repr(self)


#: The types :meth:`TokenSet.from_dict` accepts for each field (as JSON gives them back).
_STORED_KINDS: dict[str, tuple[type, ...]] = {
    "access_token": (str,),
    "refresh_token": (str, type(None)),
    "token_type": (str,),
    "scope": (str, type(None)),
    "expires_at": (int, float, type(None)),
    "obtained_at": (int, float),
    "created_at": (int, type(None)),
    "company_id": (str, type(None)),
}


def _id(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected an id (int or string), got {type(value).__name__}")
    return str(value)


@attrs.frozen
class Credentials:
    """Who granted a token: Factorial's ``api_public/credentials`` record.

    Ids are strings whatever the API version sent (ints before 2026, strings since).
    ``employee_id`` and the personal fields are ``None`` for company tokens.
    """

    id: str | None
    company_id: str | None
    employee_id: str | None = None
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    role: str | None = None

    @classmethod
    def from_api(cls, item: dict[str, Any]) -> Credentials:
        """Build from one item of the endpoint's ``data`` list; raises ValueError if malformed."""

        def text(key: str) -> str | None:
            value = item.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"credentials field {key!r} is not a string")
            return value

        return cls(
            id=_id(item.get("id")),
            company_id=_id(item.get("company_id")),
            employee_id=_id(item.get("employee_id")),
            email=text("email"),
            first_name=text("first_name"),
            last_name=text("last_name"),
            role=text("role"),
        )

    @property
    def is_company(self) -> bool:
        """True for a company token (no employee behind it)."""
        return self.employee_id is None


@attrs.frozen
class TenantInfo:
    """A tenant as listed by :meth:`TokenManager.tenants` (metadata only, no tokens)."""

    tenant: str
    status: TenantStatus
    expires_at: float | None
    refreshed_at: float
    version: int

    @property
    def needs_reauthorization(self) -> bool:
        """True when the company must connect again."""
        return self.status is TenantStatus.NEEDS_REAUTH


@attrs.frozen
class CallbackResult:
    """What :meth:`TokenManager.complete_callback` returns: the tenant the callback was for
    (from its signed state) and the tenant's tokens (``tokens.company_id`` names the company)."""

    tenant: str
    tokens: TokenSet

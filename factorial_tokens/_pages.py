"""What the connect routes answer, whatever the web framework: the small HTML pages, their
security headers, the browser-binding cookie, and the page for each callback failure.

The route steps (``_connect``) answer with these, whatever the framework; the callback's
checks themselves live in :meth:`TokenManager.complete_callback`.
"""

from __future__ import annotations

import html
import re

from ._errors import (
    AuthorizationDenied,
    CodeReused,
    CompanyMismatch,
    ExchangeInDoubt,
    FactorialTokensError,
    InvalidCallback,
    InvalidState,
    ManagerClosed,
    ProviderError,
    ReauthorizationRequired,
    RefreshTimeout,
    StateReused,
    StoreUnavailable,
    TenantNotConnected,
)

__all__ = ["BINDING_COOKIE", "PAGE_HEADERS", "callback_failure", "page_html", "valid_binding"]

#: The cookie that binds a connection to the browser that started it.
BINDING_COOKIE = "factorial_tokens_binding"
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{32,64}")

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
}
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:4em auto;line-height:1.5}}</style>
</head><body><h1>{title}</h1><p>{message}</p></body></html>
"""


def page_html(title: str, message: str) -> str:
    """A plain HTML page; both strings are escaped here."""
    return _PAGE.format(title=html.escape(title), message=html.escape(message))


def valid_binding(value: str | None) -> str | None:
    """The cookie's value if it has the shape the connect route gives it, else None."""
    return value if value is not None and _COOKIE_VALUE.fullmatch(value) else None


def callback_failure(exc: FactorialTokensError, tenant: str) -> tuple[int, str, str]:
    """``(status, title, message)`` of the page for a callback that failed with ``exc``.

    Messages hold the tenant id and error codes, never a token, code or secret.
    """
    if isinstance(exc, StateReused):
        return (
            409,
            "Connection link already used",
            f"This connection of {tenant!r} was already completed with another authorization; "
            "start the connection again.",
        )
    if isinstance(exc, InvalidState | InvalidCallback):
        return 400, "Connection failed", f"{exc}."
    if isinstance(exc, AuthorizationDenied):
        if exc.error == "access_denied":
            return 403, "Access not granted", f"Access to Factorial was not granted for {tenant!r}."
        return 400, "Connection failed", f"Factorial answered {exc.error!r} for {tenant!r}; start again."
    if isinstance(exc, CompanyMismatch):
        return (
            409,
            "Another company",
            f"Tenant {tenant!r} is connected to Factorial company {exc.expected}; this authorization "
            f"was for company {exc.got}, so it was refused and revoked. Sign in to Factorial with "
            "the right company and connect again.",
        )
    if isinstance(exc, CodeReused):
        return 409, "Connection failed", "This authorization code was already used for another tenant."
    if isinstance(exc, ExchangeInDoubt):
        return (
            409,
            "Connect again",
            f"The answer from Factorial for {tenant!r} was lost; connect the company again.",
        )
    if isinstance(exc, ReauthorizationRequired):
        return 409, "Connect again", f"{exc}."
    if isinstance(exc, TenantNotConnected):
        # This callback was completed before, and the tenant disconnected since (a reload).
        return 409, "Connect again", f"Tenant {tenant!r} is not connected; start the connection again."
    if isinstance(exc, ProviderError):
        detail = f" ({exc.error})" if exc.error else ""
        return (
            502,
            "Factorial refused the connection",
            f"Factorial did not accept the authorization of {tenant!r}{detail}; start the connection again.",
        )
    if isinstance(exc, StoreUnavailable | RefreshTimeout | ManagerClosed):
        return 503, "Try again", "The token store is unavailable; try again in a moment."
    return 500, "Connection failed", "The connection failed; start it again."

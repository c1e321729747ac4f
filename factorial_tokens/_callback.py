"""The connect flow's signed values and the OAuth callback: authorization URLs, connect
links, and completing a callback (state, binding, single-use nonce, exchange).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
from urllib.parse import quote, urlencode, urlsplit

from ._errors import AuthorizationDenied, ConfigurationError, InvalidState, StateReused
from ._exchange import Exchanges, check_code
from ._models import CallbackResult, validate_tenant
from .store import ClaimState

log = logging.getLogger("factorial_tokens")


def _oauth_error_code(error: object) -> str:
    """A callback's ``error=`` reduced to what is safe to show: ``[A-Za-z0-9_.-]``, 64 at most."""
    text = re.sub(r"[^A-Za-z0-9_.\-]", "", error if isinstance(error, str) else "")[:64]
    return text or "unknown_error"


def _check_link_base(base_url: object) -> None:
    """Refuse a connect link's base that is not a plain web address: another scheme
    (``javascript:``) would run in the admin's browser, a query or fragment would swallow
    the signed token, and a password would be printed in every link."""
    text = base_url if isinstance(base_url, str) else ""
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:  # an unclosed or invalid [IPv6] host
        parts, host = None, None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        problem = "must be an absolute http(s) URL"
    elif not all("\x21" <= ch <= "\x7e" for ch in text):
        problem = "must be printable ASCII, without spaces (percent-encode the rest)"
    elif parts.query or parts.fragment or "?" in text or "#" in text:
        problem = "must not hold a query or a fragment"
    elif parts.username is not None or parts.password is not None:
        problem = "must not hold user credentials"
    else:
        return
    # The value is not quoted: it may hold a password.
    raise ConfigurationError(f"a connect link's base_url {problem}")


class Callbacks(Exchanges):
    """Authorization URLs, connect links and OAuth callbacks."""

    def authorization_url(
        self,
        tenant: str,
        *,
        company: bool = False,
        scope: str | None = None,
        binding: str | None = None,
    ) -> str:
        """The Factorial URL that lets ``tenant``'s admin grant access, with a signed state.

        ``company=True`` asks for a company token (``resource_owner_type=company``).
        ``binding`` is a value the application ties to the browser that starts the flow
        (e.g. a random value in an HttpOnly cookie); only a keyed hash of it goes into the
        state, and :meth:`complete_callback` then requires the same value, so a callback
        completed in another browser (a victim's admin sent this URL) is refused.
        """
        tenant = validate_tenant(tenant)
        if binding is not None and (not isinstance(binding, str) or not binding):
            raise ConfigurationError("binding must be a non-empty string, or None")
        state = self._signer.sign(tenant, binding=binding)
        return self._oauth.authorization_url(state, company=company, scope=scope)

    def tenant_from_state(self, state: object) -> str:
        """The tenant a callback's ``state`` was issued for; raises InvalidState."""
        return self._signer.verify(state)[0]

    def verify_state(self, state: object) -> tuple[str, str]:
        """``(tenant, nonce)`` of a valid state; raises InvalidState."""
        return self._signer.verify(state)

    def connect_link(self, tenant: str, *, ttl: float = 3600.0, base_url: str | None = None) -> str:
        """A signed link that lets its holder start connecting ``tenant`` for ``ttl`` seconds.

        The link is ``<base_url>/connect/<tenant>?link=<signed token>``; ``base_url``
        defaults to the redirect URI's origin (where ``factorial-tokens serve`` and
        :func:`~factorial_tokens.web.connect_app` answer); pass the mount point when the routes
        live under a prefix (``https://example.com/factorial``). ``connect_app`` refuses
        ``/connect/{tenant}`` without a valid link (403) unless built with ``open_routes=True``.
        Anyone holding the link can start the flow: send it to the tenant's admin only.
        A ``base_url`` that is not a plain http(s) address (another scheme, a query, a
        fragment, user credentials) raises ConfigurationError.
        """
        tenant = validate_tenant(tenant)
        if not (isinstance(ttl, int | float) and 0 < ttl < math.inf):
            raise ConfigurationError("a connect link's ttl must be a positive, finite number of seconds")
        if base_url is None:
            parts = urlsplit(self.app.redirect_uri)
            base_url = f"{parts.scheme}://{parts.netloc}"
        else:
            _check_link_base(base_url)
        token = self._links.sign(tenant, ttl=ttl)
        return f"{base_url.rstrip('/')}/connect/{quote(tenant, safe='')}?{urlencode({'link': token})}"

    def check_connect_link(self, link: object, tenant: str) -> None:
        """Raise InvalidState unless ``link`` (the ``link`` query value of a
        :meth:`connect_link`) is valid, unexpired and for ``tenant``."""
        self._links.verify(link, validate_tenant(tenant))

    async def complete_callback(
        self,
        *,
        state: object,
        code: object = None,
        error: object = None,
        binding: str | None = None,
        allow_company_change: bool = False,
    ) -> CallbackResult:
        """Finish an OAuth callback, whatever the web framework: verify, spend, exchange.

        Pass the callback's query values as they came (``state``, ``code``, ``error``)
        and the browser's ``binding`` (the value given to :meth:`authorization_url`; None
        if none was). In order:

        1. the state's signature, app and expiry are checked (InvalidState); nothing of a
           callback without a valid state is shown or sent anywhere;
        2. the binding must be the one the state was issued with: a bound state needs the
           same value, an unbound one needs None (InvalidState: "another browser");
        3. ``error=`` raises AuthorizationDenied (no request to Factorial);
        4. the code must be present and well-formed (InvalidCallback; the state is not spent);
        5. the state's nonce is spent once, fleet-wide, through the store: the same state
           with the same code again (a retried callback) goes on and gets the same result,
           the same state with another code raises StateReused (nothing sent);
        6. the code is exchanged exactly once (:meth:`exchange_code`), pinned to the
           tenant's company (CompanyMismatch unless ``allow_company_change``).

        Returns a :class:`CallbackResult` ``(tenant, tokens)``. Also raises what
        :meth:`exchange_code` raises (CodeReused, ProviderError, ExchangeInDoubt,
        StoreUnavailable, RefreshTimeout).
        """
        self._check_open()
        claims = self._signer.check(state)
        tenant = claims.tenant
        if binding is not None and (not isinstance(binding, str) or not binding):
            binding = "\x00"  # a malformed binding never matches anything
        if not claims.binding_matches(binding, self._signer):
            raise InvalidState(
                "this connection was started in another browser (or its cookie is missing): "
                "start the connection again from this browser"
            )
        if error is not None:
            raise AuthorizationDenied(tenant, _oauth_error_code(error))
        code = check_code(code)
        if not await self._spend_nonce(tenant, claims.nonce, code):
            raise StateReused(
                f"this connection of tenant {tenant!r} was already completed with another "
                "authorization; start the connection again"
            )
        tokens = await self.exchange_code(tenant, code, allow_company_change=allow_company_change)
        return CallbackResult(tenant, tokens)

    async def _spend_nonce(self, tenant: str, nonce: str, code: str) -> bool:
        """Bind a state's nonce to the first code it arrives with; True for that code.

        The first callback claims the nonce for its code in the store, so every worker
        agrees; the same code again passes (the exchange itself is idempotent), another
        code is refused. Finished claims are kept for a day, longer than any state lives.
        """
        nonce_hash = "state:" + hashlib.sha256(nonce.encode()).hexdigest()
        # The claim's owner is derived from the code, so a duplicate of the same callback
        # holds the same claim; it is also kept as the finished claim's outcome.
        binding = self._secret.code_binding(code)
        key = self._key(tenant)
        for _ in range(3):
            claim = await self._store.claim_code(key, nonce_hash, binding, self.lease_ttl)
            # An outcome that is not ASCII was not written by a manager (compare_digest refuses it).
            outcome = claim.outcome
            same = claim.won or (
                outcome is not None and outcome.isascii() and hmac.compare_digest(outcome, binding)
            )
            if claim.key != key or not same:
                return False
            if claim.state is not ClaimState.CLAIMED:
                return True
            if await self._store.advance_code(claim, ClaimState.DONE, self.lease_ttl, binding):
                return True
            # A duplicate of this very callback finished the claim first: read it again.
        return False

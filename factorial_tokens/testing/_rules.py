"""The simulator's grant rules, as Doorkeeper applies them: clients, codes, token pairs and
their families, rotation (:class:`RefreshMode`), reuse detection and revocation.

No HTTP here: :class:`Rules` takes a request's parameters and answers a token pair to
render or a :class:`GrantError`; the server (``_server``) reads requests and writes
answers. Rules are not thread-safe: the server calls them holding its lock. Settings
are read from the simulator at every use, so a test may change them while it runs.
"""

from __future__ import annotations

import base64
import enum
import itertools
import secrets
import time
import urllib.parse
from collections import deque
from collections.abc import Mapping
from typing import Any, Final, Protocol

import attrs

from ._stats import Counters

__all__ = [
    "INVALID_GRANT_CAUSES",
    "Client",
    "GrantError",
    "Issued",
    "Owner",
    "Pair",
    "RefreshMode",
    "RuleSettings",
    "Rules",
]


class RefreshMode(enum.Enum):
    """How a refresh treats the pair (access + refresh token) it was made from."""

    #: The old pair is revoked at once. Of two concurrent refreshes presenting the same
    #: refresh token one wins; the other gets ``invalid_grant``.
    REVOKE_AT_REFRESH = "revoke_at_refresh"
    #: Factorial's documented behaviour (Doorkeeper ``refresh_token_revoked_on_use``):
    #: the old pair stays valid until the new access token is first used on the API, or
    #: the new refresh token is used to refresh; then the old pair is revoked. Until then
    #: the old refresh token can be presented again and succeeds again, so concurrent
    #: refreshes presenting the same refresh token all succeed (several live pairs;
    #: siblings stay live, as in Doorkeeper).
    REVOKE_ON_FIRST_USE = "revoke_on_first_use"


#: Causes counted in ``SimulatorStats.invalid_grant_by_cause``. For a token whose family
#: is revoked the cause is ``family_revoked``, whatever else is wrong with it.
INVALID_GRANT_CAUSES: Final = (
    "code_unknown",  # no such code was ever issued
    "code_client_mismatch",  # the code was issued to another client
    "code_reused",  # the code was already exchanged
    "code_expired",  # older than code_ttl
    "redirect_mismatch",  # redirect_uri differs from the one the code was issued for
    "refresh_unknown",  # no such refresh token was ever issued
    "refresh_client_mismatch",  # the refresh token belongs to another client
    "refresh_rotated",  # a superseded (rotated) refresh token presented again
    "refresh_revoked",  # a refresh token revoked through /oauth/revoke or admin action
    "refresh_expired",  # older than refresh_token_ttl
    "family_revoked",  # any token of a family revoked by reuse detection or an admin
)

_DESC_INVALID_GRANT: Final = (
    "The provided authorization grant is invalid, expired, revoked, does not match the "
    "redirection URI used in the authorization request, or was issued to another client."
)
_DESC_INVALID_CLIENT: Final = (
    "Client authentication failed due to unknown client, no client authentication "
    "included, or unsupported authentication method."
)
_DESC_UNSUPPORTED_GRANT: Final = "The authorization grant type is not supported by the authorization server."
_AUTO_ID_START: Final = 10_001


class RuleSettings(Protocol):
    """What the rules read from the simulator's settings (see ``FakeFactorial``)."""

    refresh_mode: RefreshMode
    reuse_detection: bool
    access_token_ttl: float
    refresh_token_ttl: float | None
    company_tokens_expire: bool
    revoke_on_reauthorize: bool
    code_ttl: float
    default_scope: str
    rotate_refresh_tokens: bool
    authorize_page: bool


@attrs.define
class Client:
    client_id: str
    client_secret: str = attrs.field(repr=False)
    redirect_uri: str


@attrs.define(frozen=True)
class Owner:
    company_id: int
    employee_id: int | None


@attrs.define(eq=False)
class Family:
    """All tokens descending from one authorization code."""

    id: int
    client_id: str
    owner: Owner
    company_token: bool
    scope: str
    revoked: bool = False


@attrs.define(eq=False)
class Code:
    value: str = attrs.field(repr=False)
    client_id: str
    redirect_uri: str
    owner: Owner
    company_token: bool
    scope: str
    expires_at: float
    used: bool = False
    family: Family | None = None


@attrs.define(eq=False)
class Pair:
    """One Doorkeeper access-token record: an access token and its refresh token."""

    access: str = attrs.field(repr=False)
    refresh: str | None = attrs.field(repr=False)
    family: Family
    created_at: float
    expires_at: float | None
    refresh_expires_at: float | None
    previous: Pair | None = None
    revoked: bool = False
    #: "rotated" / "superseded" (refresh), "revoked" (/oauth/revoke), "admin".
    revoked_reason: str | None = None
    used: bool = False


class GrantError(Exception):
    """A refused request: the HTTP status, the OAuth ``error`` and its description."""

    def __init__(
        self,
        status: int,
        error: str,
        description: str,
        *,
        cause: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.description = description
        self.cause = cause
        self.headers = dict(headers or {})


@attrs.frozen
class Issued:
    """A token pair a grant issued, to render as the token endpoint's answer."""

    pair: Pair
    #: False when the refresh token was not rotated: the answer carries none.
    with_refresh: bool = True


class Rules:
    """The provider's state and rules (see the module doc). ``c`` counts what happened."""

    def __init__(self, settings: RuleSettings, client: Client, counters: Counters) -> None:
        self._settings = settings
        self.c = counters
        self.clients: dict[str, Client] = {client.client_id: client}
        self.codes: dict[str, Code] = {}
        self.by_access: dict[str, Pair] = {}
        self.by_refresh: dict[str, Pair] = {}
        self.families: list[Family] = []
        self._family_ids = itertools.count(1)
        self._auto_ids = itertools.count(_AUTO_ID_START)
        self.next_owners: deque[Owner] = deque()
        self.clock_offset = 0.0

    def next_id(self) -> int:
        """A fresh company or employee id."""
        return next(self._auto_ids)

    def now(self) -> float:
        """The simulator's clock: the wall clock plus what ``advance_time`` added."""
        return time.time() + self.clock_offset

    def make_owner(self, company_id: int | None, employee_id: int | None, company_token: bool) -> Owner:
        """The approving owner; ids of None are fresh (company tokens have no employee)."""
        cid = self.next_id() if company_id is None else company_id
        if company_token:
            return Owner(cid, None)
        eid = self.next_id() if employee_id is None else employee_id
        return Owner(cid, eid)

    def mint_code(
        self,
        client: Client,
        redirect_uri: str,
        owner: Owner,
        company_token: bool,
        scope: str | None,
    ) -> str:
        """A fresh authorization code for ``client``, bound to ``redirect_uri``."""
        value = secrets.token_urlsafe(32)
        self.codes[value] = Code(
            value=value,
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            owner=owner,
            company_token=company_token,
            scope=scope or self._settings.default_scope,
            expires_at=self.now() + self._settings.code_ttl,
        )
        self.c.codes_issued += 1
        return value

    def _new_pair(self, family: Family, previous: Pair | None, *, keep_refresh: bool = False) -> Pair:
        now = self.now()
        expiring = not family.company_token or self._settings.company_tokens_expire
        refresh = secrets.token_hex(32) if expiring else None
        if keep_refresh and previous is not None:
            refresh = previous.refresh
        pair = Pair(
            access=secrets.token_hex(32),
            refresh=refresh,
            family=family,
            created_at=now,
            expires_at=now + self._settings.access_token_ttl if expiring else None,
            refresh_expires_at=(
                now + self._settings.refresh_token_ttl
                if expiring and self._settings.refresh_token_ttl is not None
                else None
            ),
            previous=previous,
        )
        self.by_access[pair.access] = pair
        if pair.refresh is not None:
            self.by_refresh[pair.refresh] = pair
        return pair

    def _revoke_pair(self, pair: Pair, reason: str) -> None:
        if not pair.revoked:
            pair.revoked = True
            pair.revoked_reason = reason

    def revoke_family(self, family: Family, cause: str) -> None:
        """Revoke every token of one grant, counted under ``cause``."""
        if family.revoked:
            return
        family.revoked = True
        self.c.families_revoked += 1
        self.c.families_revoked_by_cause[cause] += 1

    def access_problem(self, pair: Pair, now: float) -> str | None:
        """Why the API would refuse this pair's access token now, or None."""
        if pair.family.revoked or pair.revoked:
            return "The access token was revoked"
        if pair.expires_at is not None and now >= pair.expires_at:
            return "The access token expired"
        return None

    def refresh_problem(self, pair: Pair, now: float) -> str | None:
        """The ``invalid_grant`` cause a refresh with this pair would get now, or None."""
        if pair.family.revoked:
            return "family_revoked"
        if pair.revoked:
            if pair.revoked_reason in ("rotated", "superseded"):
                return "refresh_rotated"
            return "refresh_revoked"
        if pair.refresh_expires_at is not None and now >= pair.refresh_expires_at:
            return "refresh_expired"
        return None

    def pair_live(self, pair: Pair, now: float) -> bool:
        """True while the pair's access token works or its refresh token can refresh."""
        if pair.revoked or pair.family.revoked:
            return False
        if self.access_problem(pair, now) is None:
            return True
        return pair.refresh is not None and self.refresh_problem(pair, now) is None

    def _invalid_grant(self, cause: str) -> GrantError:
        self.c.invalid_grant += 1
        self.c.invalid_grant_by_cause[cause] += 1
        return GrantError(400, "invalid_grant", _DESC_INVALID_GRANT, cause=cause)

    def invalid_request(self, description: str) -> GrantError:
        """An ``invalid_request`` error (counted) with ``description``."""
        self.c.invalid_request += 1
        return GrantError(400, "invalid_request", description)

    def _authenticate(self, form: Mapping[str, str], authorization: str | None) -> Client:
        client_id = form.get("client_id")
        client_secret = form.get("client_secret")
        if authorization and authorization.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
                basic_id, _, basic_secret = decoded.partition(":")
                client_id = urllib.parse.unquote_plus(basic_id)
                client_secret = urllib.parse.unquote_plus(basic_secret)
            except (ValueError, UnicodeDecodeError):
                client_id = client_secret = None
        client = self.clients.get(client_id or "")
        if (
            client is None
            or client_secret is None
            or not secrets.compare_digest(client.client_secret, client_secret)
        ):
            self.c.invalid_client += 1
            raise GrantError(401, "invalid_client", _DESC_INVALID_CLIENT)
        return client

    def grant(self, form: Mapping[str, str], authorization: str | None) -> Issued:
        """``POST /oauth/token``: exchange a code or refresh; the pair to answer, or GrantError."""
        grant_type = form.get("grant_type")
        if not grant_type:
            raise self.invalid_request("Missing required parameter: grant_type.")
        if grant_type not in ("authorization_code", "refresh_token"):
            self.c.unsupported_grant_type += 1
            raise GrantError(400, "unsupported_grant_type", _DESC_UNSUPPORTED_GRANT)
        client = self._authenticate(form, authorization)
        if grant_type == "authorization_code":
            return self._exchange(client, form)
        return self._refresh(client, form)

    def _exchange(self, client: Client, form: Mapping[str, str]) -> Issued:
        value = form.get("code")
        if not value:
            raise self.invalid_request("Missing required parameter: code.")
        redirect_uri = form.get("redirect_uri")
        if not redirect_uri:
            raise self.invalid_request("Missing required parameter: redirect_uri.")
        self.c.exchange_attempts += 1
        self.c.exchange_attempts_by_code[value] += 1
        code = self.codes.get(value)
        if code is None:
            raise self._invalid_grant("code_unknown")
        if code.client_id != client.client_id:
            raise self._invalid_grant("code_client_mismatch")
        if code.used:
            if self._settings.reuse_detection and code.family is not None:
                self.revoke_family(code.family, "code_reused")
            raise self._invalid_grant("code_reused")
        if self.now() >= code.expires_at:
            raise self._invalid_grant("code_expired")
        if redirect_uri != code.redirect_uri:
            raise self._invalid_grant("redirect_mismatch")
        code.used = True
        if self._settings.revoke_on_reauthorize:
            for earlier in self.families:
                if (
                    not earlier.revoked
                    and earlier.client_id == client.client_id
                    and earlier.owner == code.owner
                    and earlier.company_token == code.company_token
                ):
                    self.revoke_family(earlier, "reauthorized")
        family = Family(
            id=next(self._family_ids),
            client_id=client.client_id,
            owner=code.owner,
            company_token=code.company_token,
            scope=code.scope,
        )
        self.families.append(family)
        code.family = family
        pair = self._new_pair(family, previous=None)
        self.c.exchanges += 1
        self.c.exchanges_by_code[value] += 1
        self.c.exchanges_by_company[family.owner.company_id] += 1
        return Issued(pair)

    def _refresh(self, client: Client, form: Mapping[str, str]) -> Issued:
        token = form.get("refresh_token")
        if not token:
            raise self.invalid_request("Missing required parameter: refresh_token.")
        self.c.refresh_attempts += 1
        self.c.refresh_attempts_by_token[token] += 1
        pair = self.by_refresh.get(token)
        if pair is None:
            raise self._invalid_grant("refresh_unknown")
        if pair.family.client_id != client.client_id:
            raise self._invalid_grant("refresh_client_mismatch")
        problem = self.refresh_problem(pair, self.now())
        if problem is not None:
            if problem == "refresh_rotated" and self._settings.reuse_detection:
                self.revoke_family(pair.family, "refresh_reused")
            raise self._invalid_grant(problem)
        if self._settings.refresh_mode is RefreshMode.REVOKE_AT_REFRESH:
            self._revoke_pair(pair, "rotated")
        elif pair.previous is not None:
            # Using the new refresh token revokes the pair it was refreshed from.
            self._revoke_pair(pair.previous, "superseded")
        keep = not self._settings.rotate_refresh_tokens
        # Not rotating: the refresh token presented moves on to the new pair and stays valid.
        new = self._new_pair(pair.family, previous=pair, keep_refresh=keep)
        self.c.refreshes += 1
        self.c.refreshes_by_company[pair.family.owner.company_id] += 1
        return Issued(new, with_refresh=not keep)

    def revoke(self, form: Mapping[str, str], authorization: str | None) -> dict[str, Any]:
        """``POST /oauth/revoke`` (RFC 7009): an unknown token is not an error."""
        client = self._authenticate(form, authorization)
        token = form.get("token")
        if not token:
            raise self.invalid_request("Missing required parameter: token.")
        pair = self.by_access.get(token) or self.by_refresh.get(token)
        if pair is None:
            return {}
        if pair.family.client_id != client.client_id:
            raise GrantError(403, "unauthorized_client", "You are not authorized to revoke this token")
        if not pair.revoked:
            self._revoke_pair(pair, "revoked")
            self.c.revocations += 1
            self.c.revocations_by_company[pair.family.owner.company_id] += 1
        return {}

    def api_auth(self, authorization: str | None) -> Pair:
        """The pair behind an API call's bearer token (its first use may revoke the previous pair)."""
        token = ""
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        pair = self.by_access.get(token) if token else None
        problem = "The access token is invalid" if pair is None else self.access_problem(pair, self.now())
        if pair is None or problem is not None:
            self.c.api_unauthorized += 1
            challenge = f'Bearer realm="Doorkeeper", error="invalid_token", error_description="{problem}"'
            raise GrantError(401, "invalid_token", problem or "", headers={"WWW-Authenticate": challenge})
        if not pair.used:
            pair.used = True
            if self._settings.refresh_mode is RefreshMode.REVOKE_ON_FIRST_USE and pair.previous:
                self._revoke_pair(pair.previous, "superseded")
        self.c.api_ok += 1
        return pair

    def authorize(self, query: Mapping[str, str]) -> str:
        """``GET /oauth/authorize``: a code for the next owner; the redirect ``Location``."""
        client = self.clients.get(query.get("client_id", ""))
        if client is None:
            raise GrantError(400, "invalid_client", _DESC_INVALID_CLIENT)
        redirect_uri = query.get("redirect_uri")
        if not redirect_uri:
            raise GrantError(400, "invalid_request", "Missing required parameter: redirect_uri.")
        if redirect_uri != client.redirect_uri:
            raise GrantError(
                400,
                "invalid_request",
                "The requested redirect uri is malformed or doesn't match client redirect URI.",
            )
        response_type = query.get("response_type")
        if not response_type:
            raise GrantError(400, "invalid_request", "Missing required parameter: response_type.")
        if response_type != "code":
            raise GrantError(
                400,
                "unsupported_response_type",
                "The authorization server does not support this response type.",
            )
        owner_type = query.get("resource_owner_type", "user")
        if owner_type not in ("user", "company"):
            raise GrantError(400, "invalid_request", "Unknown resource_owner_type.")
        company_token = owner_type == "company"
        picked = query.get("company_id", "") if self._settings.authorize_page else ""
        if picked.isdigit() and 0 < int(picked) < 2**31:
            owner = self.make_owner(int(picked), None, company_token)
        elif self.next_owners:
            queued = self.next_owners.popleft()
            owner = self.make_owner(queued.company_id, queued.employee_id, company_token)
        else:
            owner = self.make_owner(None, None, company_token)
        code = self.mint_code(client, redirect_uri, owner, company_token, query.get("scope"))
        params = {"code": code}
        if "state" in query:
            params["state"] = query["state"]
        separator = "&" if "?" in redirect_uri else "?"
        return redirect_uri + separator + urllib.parse.urlencode(params)

    # ------------------------------------------------------------------ what tests ask

    def add_client(self, client: Client) -> None:
        """Register another application; ValueError if its id is taken."""
        if client.client_id in self.clients:
            raise ValueError(f"client {client.client_id!r} is already registered")
        self.clients[client.client_id] = client

    def issue_code(
        self,
        client_id: str,
        company_id: int | None,
        employee_id: int | None,
        company_token: bool,
        scope: str | None,
    ) -> str:
        """A code as if a user had approved ``client_id``; ValueError for an unknown client."""
        client = self.clients.get(client_id)
        if client is None:
            raise ValueError(f"unknown client {client_id!r}")
        owner = self.make_owner(company_id, employee_id, company_token)
        return self.mint_code(client, client.redirect_uri, owner, company_token, scope)

    def is_active(self, access_token: str) -> bool:
        """True if the API would accept this access token now."""
        pair = self.by_access.get(access_token)
        return pair is not None and self.access_problem(pair, self.now()) is None

    def is_refresh_usable(self, refresh_token: str) -> bool:
        """True if presenting this refresh token now would succeed."""
        pair = self.by_refresh.get(refresh_token)
        return pair is not None and self.refresh_problem(pair, self.now()) is None

    def live_pairs(self, company_id: int | None) -> int:
        """Pairs still usable, for one company or all."""
        now = self.now()
        return sum(
            1
            for pair in self.by_access.values()
            if (company_id is None or pair.family.owner.company_id == company_id)
            and self.pair_live(pair, now)
        )

    def families_revoked_for(self, company_id: int) -> int:
        """How many of the company's families are revoked."""
        return sum(1 for f in self.families if f.owner.company_id == company_id and f.revoked)

    def revoke_company(self, company_id: int) -> int:
        """Revoke every grant of a company (cause ``admin``); how many were revoked."""
        families = [f for f in self.families if f.owner.company_id == company_id and not f.revoked]
        for family in families:
            self.revoke_family(family, "admin")
        return len(families)

    def expire_access_tokens(self, company_id: int | None) -> int:
        """Expire every unexpired access token (of one company or all) now; how many."""
        now = self.now()
        count = 0
        for pair in self.by_access.values():
            if company_id is not None and pair.family.owner.company_id != company_id:
                continue
            if pair.expires_at is None or pair.expires_at > now:
                pair.expires_at = now
                count += 1
        return count

    def secrets_issued(self) -> set[str]:
        """Every access token, refresh token and code ever issued (for secret audits)."""
        return set(self.by_access) | {r for r in self.by_refresh if r} | set(self.codes)

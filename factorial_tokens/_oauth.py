"""The Factorial OAuth client: authorize URL, code exchange, refresh, revoke, credentials.

It knows nothing of stores. Every call has a deadline. Rules for retries:

* 429, 500 and 503 are retried with jittered exponential backoff inside the deadline,
  honouring ``Retry-After`` (the request was refused before any grant was processed); a
  token request's 429, or 503 with ``Retry-After``, is also told to ``on_retry_after``
  (the manager holds the whole fleet's refreshes until then);
* for token requests (exchange, refresh) a read timeout, a dropped connection, 502/504
  or a success body that cannot be read may mean the grant *was* processed: that is
  raised as :class:`RequestInDoubt` and never retried here;
* revoke and credentials are idempotent and retried on those too.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp

from ._errors import ProviderError, RequestInDoubt
from ._models import Credentials, FactorialApp, TokenSet

__all__ = ["OAuthClient"]

log = logging.getLogger("factorial_tokens")

_MAX_BODY = 1 << 20
_RETRYABLE = frozenset({429, 500, 503})
#: A ``Retry-After`` of delay-seconds (a fraction tolerated).
_DELAY_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")
#: The longest wait a ``Retry-After`` is taken for: the provider's limits are per minute;
#: a longer one (a Unix timestamp sent as delay-seconds) would hold every worker for years.
MAX_RETRY_AFTER = 600.0
_GATEWAY = frozenset({502, 504})
#: Connection attempts to a host that refuses before the error is raised.
_CONNECT_TRIES = 5
#: The characters of a token; a run of them this long is redacted, whoever's it is.
_TOKEN_CHARS = r"A-Za-z0-9_\-+/=.~"
_LONG_RUN = re.compile(rf"[{_TOKEN_CHARS}]{{20,}}")
#: Any stretch sharing this many characters with a secret of the request is redacted.
_PIECE = 8
#: An error's excerpt is taken from this much of the body, at most.
_EXCERPT_BYTES = 16384
#: Where a body is cut, the last characters of its text are redacted as they would not be
#: in the whole body (a run or a piece cut short). Every rule decides a character by at
#: most the 64 that follow it, and each such character yields at most 10 of the
#: redacted text (a ``[redacted]``): this many characters at its end are dropped.
_UNSURE_TAIL = 64 * 10
#: Keys whose values are secrets wherever they appear, whole or cut short.
_SECRET_KEYS = ("access_token", "refresh_token", "code", "client_secret", "id_token")
_KEYS = "|".join(_SECRET_KEYS)
# A secret key's value in JSON (quoted or not, possibly cut off by the end of the body) or
# in a form / query string.
_SECRET_JSON = re.compile(rf'("(?:{_KEYS})"\s*:\s*)("(?:[^"\\]|\\.)*"?|[^,}}\]\s]*)', re.IGNORECASE)
_SECRET_FORM = re.compile(rf"((?:{_KEYS})=)[^&\s]*", re.IGNORECASE)
#: An OAuth error code as Factorial (and RFC 6749) writes them: lowercase words joined by
#: underscores. Anything else in ``error`` (an echo of what was sent, a control character)
#: is not taken as a code.
_ERROR_CODE = re.compile(r"[a-z][a-z_]{0,63}")
#: What an access token may hold: printable ASCII, no space (RFC 6750's b64token is
#: stricter); anything else cannot go in a header. A refresh token may also hold spaces
#: (RFC 6749's VSCHAR): it goes in a form.
_ACCESS_TEXT = re.compile(r"[\x21-\x7e]+")
_REFRESH_TEXT = re.compile(r" *[\x21-\x7e][\x20-\x7e]*")
#: Integer literals longer than this are read as infinite (Python refuses to convert
#: integers of thousands of digits, which would lose an answer that holds tokens).
_MAX_INT_DIGITS = 40
#: Accepted lifetimes: a year at most (beyond that, the value is taken as unreadable).
_MAX_LIFETIME = 365 * 86400.0
#: The lifetime assumed when a 2xx answer's ``expires_in`` cannot be read: the tokens are
#: kept (they are authoritative), refreshed early, and a 401 reloads them anyway.
_FALLBACK_LIFETIME = 600.0

#: Told of every HTTP attempt: ``(url, status or failure kind, seconds, Retry-After)``.
AttemptObserver = Callable[[str, int | str, float, float | None], None]


_FORM_TYPE = {"Content-Type": "application/x-www-form-urlencoded"}


def _form(fields: dict[str, str]) -> dict[str, Any]:
    """A form body, encoded here: what aiohttp's ``data=dict`` sends (``FormData``,
    urlencoded), for a fraction of the CPU (this runs once per refresh)."""
    return {"data": urlencode(fields).encode(), "headers": _FORM_TYPE}


def _excerpt(body: bytes, *secrets: str | None) -> str:
    """A short, whitespace-folded excerpt of a body with anything token-like removed:
    the values of secret keys (whole or cut), every stretch holding ``_PIECE`` characters
    of a given secret (the whole secret, or a piece of it), and long token-like runs.

    Only the body's first ``_EXCERPT_BYTES`` are read (redacting a whole megabyte took
    the event loop a third of a second, per failed request). They are redacted before
    the excerpt is cut from them, and a cut body loses the end of its redacted text: a
    secret split by the cut is no longer recognised, and what is left of it there must
    not show, however much the redactions before it shrank the text."""
    cut = len(body) > _EXCERPT_BYTES
    text = " ".join(body[:_EXCERPT_BYTES].decode("utf-8", "replace").split())
    text = text.replace("\0", "\ufffd")  # NUL marks what ``_without_pieces`` hides
    text = _SECRET_JSON.sub(r'\1"[redacted]"', text)
    text = _SECRET_FORM.sub(r"\1[redacted]", text)
    text = _LONG_RUN.sub("[redacted]", _without_pieces(text, secrets))
    if cut:
        text = text[: max(0, len(text) - _UNSURE_TAIL)]
    return text[:160] + ("…" if len(text) > 160 or cut else "")


def _without_pieces(text: str, secrets: tuple[str | None, ...]) -> str:
    """``text`` with every stretch made of ``_PIECE``-character pieces of a secret (whitespace
    folded, as in ``text``; a shorter secret where it stands whole) replaced by
    ``[redacted]``."""
    covered = [False] * len(text)
    for secret in secrets:
        folded = " ".join(secret.split()) if secret else ""
        if 0 < len(folded) < _PIECE:
            # Shorter than a piece: where it stands whole, not inside a word ("a" in
            # "invalid_grant" is no secret, and hiding it there would hide the error code).
            for found in re.finditer(rf"(?<![{_TOKEN_CHARS}]){re.escape(folded)}(?![{_TOKEN_CHARS}])", text):
                covered[found.start() : found.end()] = [True] * len(folded)
            continue
        for i in range(len(folded) - _PIECE + 1):
            window = folded[i : i + _PIECE]
            at = text.find(window)
            while at != -1:
                covered[at : at + _PIECE] = [True] * _PIECE
                at = text.find(window, at + 1)
    if not any(covered):
        return text
    kept = (char if not hidden else "\0" for char, hidden in zip(text, covered, strict=True))
    return re.sub("\0+", "[redacted]", "".join(kept))


def _shares_piece(text: str, secrets: tuple[str | None, ...]) -> bool:
    """True if ``text`` holds ``_PIECE`` consecutive characters of one of ``secrets``."""
    return _without_pieces(text, secrets) != text


def _int(literal: str) -> float:
    """A JSON integer literal; one too long to convert is read as infinite (unreadable)."""
    if len(literal) > _MAX_INT_DIGITS:
        return -math.inf if literal.startswith("-") else math.inf
    return int(literal)


def _loads(body: bytes) -> Any:
    """JSON as the provider sent it; ValueError or RecursionError if it is not JSON."""
    return json.loads(body, parse_int=_int)


def _error_code(value: object, *secrets: str | None) -> str | None:
    """``value`` if it reads as an OAuth error code and shares no 8 characters with a
    secret of this request; None otherwise."""
    if not isinstance(value, str) or not _ERROR_CODE.fullmatch(value) or _shares_piece(value, secrets):
        return None
    return value


def _retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` asks for: delay-seconds or an HTTP-date (RFC 9110
    10.2.3), at most ``MAX_RETRY_AFTER``; None for anything else (``nan``, ``inf``, ``-5``:
    Python's ``float`` takes them all, and one would wedge or hold the fleet for ever)."""
    if not value:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        seconds = float(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class OAuthClient:
    """Talks to Factorial's OAuth endpoints for one app over one shared aiohttp session.

    ``session`` may be injected (it is then never closed here); otherwise one is created
    on first use and closed by :meth:`aclose`. ``timeout`` bounds each HTTP attempt;
    each call's ``deadline`` (``loop.time()`` based) bounds all its attempts together.
    """

    def __init__(
        self,
        app: FactorialApp,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        on_retry_after: Callable[[float], None] | None = None,
    ) -> None:
        self.app = app
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.on_retry_after = on_retry_after
        self._session = session
        self._owns_session = session is None
        #: Told of every HTTP attempt (metrics, health); never sees a request or a body.
        self.observer: AttemptObserver | None = None

    def __repr__(self) -> str:
        return f"OAuthClient(client_id={self.app.client_id!r}, base_url={self.app.base_url!r})"

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared HTTP session (created on first use)."""
        if self._session is None or self._session.closed:
            # No cookie jar: every tenant's requests share this session, and a cookie set in
            # one company's answer must never go out with another's.
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": "factorial-tokens"},
                raise_for_status=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            self._owns_session = True
        return self._session

    async def aclose(self) -> None:
        """Close the session if this client created it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def authorization_url(self, state: str, *, company: bool = False, scope: str | None = None) -> str:
        """The URL to send a user to so they grant access; ``state`` comes back on the callback."""
        params = {
            "client_id": self.app.client_id,
            "redirect_uri": self.app.redirect_uri,
            "response_type": "code",
        }
        if scope or self.app.scope:
            params["scope"] = scope or self.app.scope or ""
        params["state"] = state
        if company:
            params["resource_owner_type"] = "company"
        return f"{self.app.base_url}/oauth/authorize?{urlencode(params)}"

    async def exchange_code(self, code: str, *, deadline: float) -> TokenSet:
        """Exchange an authorization code. Raises ProviderError, or RequestInDoubt."""
        form = {
            "client_id": self.app.client_id,
            "client_secret": self.app.client_secret,
            "code": code,
            "grant_type": "authorization_code",
            "redirect_uri": self.app.redirect_uri,
        }
        return await self._grant(form, deadline, code)

    async def refresh(
        self, refresh_token: str, *, deadline: float, retry_until: float | None = None
    ) -> TokenSet:
        """Trade a refresh token for a new token set (the refresh token rotates).
        ``retry_until``: no new attempt starts after it (each attempt keeps ``deadline``);
        a backoff that would end past it ends at it instead, for one last attempt, unless
        the provider asked for a wait (a 429, or ``Retry-After``)."""
        form = {
            "client_id": self.app.client_id,
            "client_secret": self.app.client_secret,
            "refresh_token": refresh_token,
            "grant_type": "refresh_token",
        }
        return await self._grant(form, deadline, refresh_token, retry_until)

    async def revoke(self, token: str, *, deadline: float) -> None:
        """Revoke an access or refresh token (either kills both); unknown tokens are fine."""
        form = {"client_id": self.app.client_id, "client_secret": self.app.client_secret, "token": token}
        url = f"{self.app.base_url}/oauth/revoke"
        status, body, _ = await self._send("POST", url, deadline, token, idempotent=True, **_form(form))
        if status != 200:
            raise self._error(status, body, token)

    async def credentials(self, access_token: str, *, deadline: float) -> Credentials:
        """Who granted ``access_token``. A 401 raises ProviderError(401, 'invalid_token')."""
        url = f"{self.app.base_url}/api/{self.app.api_version}/resources/api_public/credentials"
        headers = {"Authorization": f"Bearer {access_token}"}
        status, body, _ = await self._send(
            "GET", url, deadline, access_token, idempotent=True, headers=headers
        )
        if status != 200:
            raise self._error(status, body, access_token)
        data = self._json(status, body, access_token, in_doubt=False)
        items = data.get("data")
        if not isinstance(items, list) or not items or not isinstance(items[0], dict):
            raise ProviderError(status, "invalid_response", "credentials without a data item")
        try:
            return Credentials.from_api(items[0])
        except ValueError as exc:
            raise ProviderError(status, "invalid_response", str(exc)) from None

    async def _grant(
        self, form: dict[str, str], deadline: float, secret: str, retry_until: float | None = None
    ) -> TokenSet:
        url = f"{self.app.base_url}/oauth/token"
        sent_at = time.time()
        status, body, sent_at = await self._send(
            "POST",
            url,
            deadline,
            secret,
            idempotent=False,
            throttled=True,
            retry_until=retry_until,
            **_form(form),
        )
        if status in _GATEWAY:
            raise RequestInDoubt(status, "gateway_error", _excerpt(body, secret, self.app.client_secret))
        if not 200 <= status < 300:
            raise self._error(status, body, secret)
        return self._token_answer(status, body, secret, sent_at)

    def _token_answer(self, status: int, body: bytes, secret: str, sent_at: float) -> TokenSet:
        """A 2xx token answer: authoritative if it holds a usable ``access_token``;
        anything else raises RequestInDoubt naming what was wrong (never a token)."""
        data = self._json(status, body, secret, in_doubt=True)
        try:
            return _token_set(data, sent_at)
        except ValueError as exc:
            raise RequestInDoubt(status, "invalid_response", str(exc)) from None

    async def _send(
        self,
        method: str,
        url: str,
        deadline: float,
        secret: str,
        *,
        idempotent: bool,
        throttled: bool = False,
        retry_until: float | None = None,
        **kwargs: Any,
    ) -> tuple[int, bytes, float]:
        """Send with retries; returns (status, body, wall time the answered attempt was sent).
        ``throttled``: tell ``on_retry_after`` of a 429, or a 503 with ``Retry-After``."""
        loop = asyncio.get_running_loop()
        attempt = 0
        first_refused: float | None = None
        failure: ProviderError | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0 or (attempt and not idempotent and remaining < self.timeout):
                # The backoff slept past the deadline (a busy loop), or a retry of a token
                # request would have less than its whole timeout: cut short, it would be in
                # doubt though the provider acted (a token rotated, which the next worker to
                # send it would lose the grant over). Nothing more was sent, so the last
                # answer is the truth to report.
                raise failure or ProviderError(None, "timeout", "no answer before the deadline")
            timeout = aiohttp.ClientTimeout(
                total=min(self.timeout, remaining), sock_connect=min(self.connect_timeout, remaining)
            )
            sent_at = time.time()
            retry_after: float | None = None
            held = False  # the provider asked for a wait (a 429, or Retry-After)
            try:
                async with self.session.request(
                    method, url, timeout=timeout, allow_redirects=False, **kwargs
                ) as resp:
                    status = resp.status
                    # Observed at the status line: a body that cannot be read is still an answer.
                    self._observe(url, status, sent_at, resp.headers.get("Retry-After"))
                    body = await _read_body(resp, in_doubt=not idempotent)
                    if status not in (_RETRYABLE | _GATEWAY if idempotent else _RETRYABLE):
                        return status, body, sent_at
                    if status in (429, 503):
                        retry_after = _retry_after(resp.headers.get("Retry-After"))
                        held = status == 429 or retry_after is not None
                        if throttled and self.on_retry_after is not None:
                            if retry_after is not None:
                                self.on_retry_after(retry_after)
                            elif status == 429:
                                self.on_retry_after(self.backoff * 2**attempt)
                    failure = self._error(status, body, secret)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Never connected: nothing was sent, so a retry is always safe; but a host that
                # refuses or never answers for connect_timeout is reported then, not at the
                # deadline, and named (a wrong base URL is the usual cause).
                self._observe(url, "connection_error", sent_at, None)
                now = loop.time()
                first_refused = now if first_refused is None else first_refused
                failure = ProviderError(
                    None, "connection_error", f"cannot connect to {_host_port(url)} ({type(exc).__name__})"
                )
                if now - first_refused >= self.connect_timeout or attempt >= _CONNECT_TRIES:
                    raise failure from None
            except (TimeoutError, aiohttp.ClientError) as exc:
                kind = (
                    "timeout"
                    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError)
                    else ("connection_lost")
                )
                self._observe(url, kind, sent_at, None)
                if not idempotent:
                    raise RequestInDoubt(None, kind, "the request was sent but no answer came") from None
                failure = ProviderError(None, kind, type(exc).__name__)
            delay = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
            if retry_after is not None:
                delay = max(delay, retry_after)
            now = loop.time()
            if now + delay >= min(deadline, retry_until or deadline):
                if held or retry_until is None or not now < retry_until < deadline:
                    raise failure
                # The last try goes at retry_until itself rather than nowhere: an outage that is
                # over by then costs nobody a wait. A wait the provider asked for is never cut.
                delay = retry_until - now
            attempt += 1
            await asyncio.sleep(delay)

    def _observe(self, url: str, status: int | str, sent_at: float, retry_after: str | None) -> None:
        if self.observer is None:
            return
        wait = _retry_after(retry_after) if status == 429 else None
        try:
            self.observer(url, status, max(time.time() - sent_at, 0.0), wait)
        except Exception:  # instrumentation never breaks a request
            logging.getLogger("factorial_tokens.telemetry").exception("the request observer failed")

    def _json(self, status: int, body: bytes, secret: str, *, in_doubt: bool) -> dict[str, Any]:
        error = RequestInDoubt if in_doubt else ProviderError
        try:
            data = _loads(body)
        except (ValueError, RecursionError):
            raise error(status, "invalid_response", _excerpt(body, secret, self.app.client_secret)) from None
        if not isinstance(data, dict):
            raise error(status, "invalid_response", "JSON body is not an object")
        return data

    def _error(self, status: int, body: bytes, secret: str) -> ProviderError:
        try:
            data = _loads(body)
        except (ValueError, RecursionError):
            data = None
        if isinstance(data, dict) and (
            code := _error_code(data.get("error"), secret, self.app.client_secret)
        ):
            description = data.get("error_description")
            text = (
                _excerpt(description.encode("utf-8", "replace"), secret, self.app.client_secret)
                if isinstance(description, str)
                else ""
            )
            return ProviderError(status, code, text)
        fallback = "server_error" if status >= 500 else "invalid_response"
        default = {429: "rate_limited", 401: "unauthorized"}.get(status, fallback)
        return ProviderError(status, default, _excerpt(body, secret, self.app.client_secret))


def _host_port(url: str) -> str:
    """``host:port`` of a URL, for errors (a base URL holds no secret)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


async def _read_body(resp: aiohttp.ClientResponse, *, in_doubt: bool) -> bytes:
    """The whole body, however it is segmented or encoded; over ``_MAX_BODY`` bytes
    (declared, or counted as they arrive) is refused. A 2xx answer to a token request
    that cannot be read whole is in doubt: the grant may have been processed."""
    error = RequestInDoubt if in_doubt and 200 <= resp.status < 300 else ProviderError
    declared = resp.content_length
    if declared is not None and declared > _MAX_BODY:
        raise error(resp.status, "invalid_response", f"body of {declared} bytes, over 1 MiB")
    pieces: list[bytes] = []
    size = 0
    async for piece in resp.content.iter_any():
        size += len(piece)
        if size > _MAX_BODY:
            raise error(resp.status, "invalid_response", "body over 1 MiB")
        pieces.append(piece)
    return b"".join(pieces)


def _number(value: object) -> float | None:
    """A finite number from an int, a float or a numeric string; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _timestamp(value: object) -> int | None:
    """``created_at`` as epoch seconds: a number, a numeric string or ISO 8601; else None."""
    number = _number(value)
    if number is None and isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        number = moment.timestamp()
    if number is None or not 0 <= number < 1e11:
        return None
    return int(number)


def _token_set(data: dict[str, Any], sent_at: float) -> TokenSet:
    """Read a 2xx token answer tolerantly; expiry counts from when the request was sent.

    Only ``access_token`` must be right (a non-empty string): without it, ValueError
    naming the field. Every other field is read in any common shape (numbers as strings,
    ISO 8601 dates, any case, scope lists; extra fields ignored) and, when unreadable,
    replaced by a safe default (logged, never raised): the answer is authoritative, and
    raising would lose tokens the provider already issued.
    """
    access = data.get("access_token")
    if not isinstance(access, str) or not _ACCESS_TEXT.fullmatch(access):
        if isinstance(access, str):
            what = "empty" if not access.strip() else "not printable ASCII without spaces"
        else:
            what = "missing" if access is None else f"a {type(access).__name__}, not a string"
        raise ValueError(f"access_token is {what}")
    token_type = data.get("token_type")
    if token_type is not None and (not isinstance(token_type, str) or token_type.lower() != "bearer"):
        log.warning("token answer with a token_type other than Bearer; using it as a Bearer token")
    refresh = data.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not _REFRESH_TEXT.fullmatch(refresh)):
        if refresh != "":
            log.warning("token answer with an unreadable refresh_token; the current one is kept")
        refresh = None
    expires_in = data.get("expires_in")
    if expires_in is None or expires_in == "":
        expires_at = None
    else:
        seconds = _number(expires_in)
        if seconds is None or not 0 <= seconds <= _MAX_LIFETIME:
            log.warning("token answer with an unreadable expires_in; assuming %.0f s", _FALLBACK_LIFETIME)
            seconds = _FALLBACK_LIFETIME
        expires_at = sent_at + seconds
    scope = data.get("scope")
    if isinstance(scope, list):
        scope = " ".join(str(item) for item in scope if isinstance(item, str | int)) or None
    elif not isinstance(scope, str) or not scope:
        scope = None
    created = data.get("created_at")
    return TokenSet(
        access_token=access,
        refresh_token=refresh,
        token_type="Bearer",
        scope=scope,
        expires_at=expires_at,
        obtained_at=sent_at,
        created_at=None if created is None else _timestamp(created),
    )

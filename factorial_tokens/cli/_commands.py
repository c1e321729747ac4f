"""The ``factorial-tokens`` command: the demo, the connect server, keepalive, and tenant tools.

Configuration comes from flags or the environment (``FACTORIAL_CLIENT_ID``,
``FACTORIAL_CLIENT_SECRET``, ``FACTORIAL_REDIRECT_URI``, ``FACTORIAL_BASE_URL``,
``FACTORIAL_TOKENS_STORE``); keys from ``--keys-file`` or ``FACTORIAL_TOKENS_KEYS``, exactly
as the library reads them (no command creates keys on its own). Secrets are never printed:
not in ``--help``, not in errors; only ``token`` writes a token, to stdout, for shell use.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging
import os
import re
import secrets
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, NoReturn, TypeVar
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

import click
from aiohttp import web

from .._errors import (
    ConfigurationError,
    FactorialTokensError,
    InvalidCallback,
    InvalidState,
    InvalidTenant,
    ProviderError,
    ReauthorizationRequired,
    RefreshTimeout,
    StoreUnavailable,
    TenantNotConnected,
    TokenSealError,
)
from .._keepalive import DEFAULT_MAX_AGE, KeepAliveReport
from .._manager import TokenManager
from .._models import FactorialApp, split_url, validate_tenant
from ..sealing import Keyring

# The command line is the interface; nothing here is part of the library's API.
__all__: list[str] = []

log = logging.getLogger("factorial_tokens.cli")

T = TypeVar("T")

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_USAGE = 2
EXIT_UNKNOWN_TENANT = 3
EXIT_REAUTH = 4
EXIT_PROVIDER = 5
EXIT_STORE = 6
EXIT_BUSY = 7

#: Every exit code the command uses, with its meaning (also shown in ``--help``).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_BROKEN: "a guarantee was broken (demo), or an unexpected error",
    EXIT_USAGE: "usage error or bad configuration (missing client id, bad store URL, invalid tenant id)",
    EXIT_UNKNOWN_TENANT: "unknown tenant: no tokens are stored for it",
    EXIT_REAUTH: "re-authorization required: the grant is dead, the company must connect again",
    EXIT_PROVIDER: "Factorial refused the request or could not be reached",
    EXIT_STORE: "the token store is unavailable (or its records cannot be opened)",
    EXIT_BUSY: "timed out waiting for another worker's refresh",
}


def _default_store() -> str:
    """An SQLite file in the user's data folder (``$XDG_DATA_HOME`` or ``~/.local/share``),
    never in the current folder: a command run from a checkout or ``/`` writes nowhere else."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return "sqlite:///" + os.path.abspath(os.path.join(base, "factorial-tokens", "tokens.db"))


DEFAULT_STORE = _default_store()
DEFAULT_BASE_URL = "https://api.factorialhr.com"

_EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


def _exit_code(exc: BaseException) -> int:
    """The documented exit code for an error."""
    table: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
        (TenantNotConnected, EXIT_UNKNOWN_TENANT),
        (ReauthorizationRequired, EXIT_REAUTH),
        (ProviderError, EXIT_PROVIDER),
        ((StoreUnavailable, TokenSealError), EXIT_STORE),
        (RefreshTimeout, EXIT_BUSY),
        ((ConfigurationError, InvalidTenant, InvalidState, InvalidCallback), EXIT_USAGE),
    )
    for kinds, code in table:
        if isinstance(exc, kinds):
            return code
    return EXIT_BROKEN


class _Secrets:
    """Strings that must never reach the terminal (the client secret, store passwords)."""

    values: ClassVar[set[str]] = set()

    @classmethod
    def scrub(cls, text: str) -> str:
        for value in sorted(cls.values, key=len, reverse=True):
            if value:
                text = text.replace(value, "***")
        return text


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"factorial-tokens: {_Secrets.scrub(message)}", err=True)
    sys.exit(code)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; map library errors to their messages and documented exit codes."""
    try:
        return asyncio.run(coro)
    except FactorialTokensError as exc:
        _fail(f"error: {exc}", _exit_code(exc))
    except KeyboardInterrupt:
        _fail("interrupted", 130)


# --------------------------------------------------------------------------- configuration


class Config:
    """The settings every command that talks to Factorial or the store needs."""

    def __init__(
        self,
        client_id: str | None,
        client_secret: str | None,
        redirect_uri: str | None,
        base_url: str,
        store: str,
        keys_file: str | None = None,
    ) -> None:
        self.keys_file = keys_file
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.base_url = base_url
        self.store = store
        if client_secret:
            _Secrets.values.add(client_secret)
        password = _password(store)
        if password:
            _Secrets.values.add(password)

    def app(self, *, listing: bool = False) -> FactorialApp:
        """The FactorialApp, or ConfigurationError naming what is missing (never its value).

        ``listing=True`` (reading tenants' metadata) needs only the client id: what is not
        given is filled with values that are never sent nor used to sign anything.
        """
        if listing:
            self.client_secret = self.client_secret or secrets.token_urlsafe(32)
            self.redirect_uri = self.redirect_uri or "http://127.0.0.1/unused"
        missing = [
            f"{env} (or {flag})"
            for value, env, flag in (
                (self.client_id, "FACTORIAL_CLIENT_ID", "--client-id"),
                (self.client_secret, "FACTORIAL_CLIENT_SECRET", "--client-secret"),
                (self.redirect_uri, "FACTORIAL_REDIRECT_URI", "--redirect-uri"),
            )
            if not value
        ]
        if missing:
            raise ConfigurationError("missing configuration: set " + ", ".join(missing))
        assert self.client_id and self.client_secret and self.redirect_uri
        try:
            return FactorialApp(
                client_id=self.client_id,
                client_secret=self.client_secret,
                redirect_uri=self.redirect_uri,
                base_url=self.base_url,
            )
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None

    def manager(
        self, *, tenant: str | None = None, listing: bool = False, read_only: bool = False, **options: Any
    ) -> TokenManager:
        """A TokenManager on the configured store (enter it with ``async with``), sealing
        tokens under :meth:`keyring`.

        With ``tenant`` (a command about one tenant) an SQLite file that does not exist is
        not created: TenantNotConnected instead; otherwise its folder is made (0700). With
        ``tenant`` or ``read_only`` a Postgres schema is neither created nor migrated
        (:meth:`read_store`). ``listing`` as in :meth:`app`
        (a manager that will not refresh nor connect).
        """
        app = self.app(listing=listing)
        read_only = read_only or tenant is not None
        missing = self.sqlite_missing()
        if missing is not None:
            if tenant is not None:
                raise TenantNotConnected(tenant)
            try:
                os.makedirs(os.path.dirname(missing) or ".", mode=0o700, exist_ok=True)
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot create the store's folder {os.path.dirname(missing)!r}: {exc.strerror}"
                ) from None
        store = self.read_store() if read_only else self.store
        return TokenManager(app, store, keyring=self.keyring(), **options)

    def read_store(self) -> str:
        """The store URL for a command that must create nothing: a Postgres store gets
        ``migrate=false`` (a schema that does not exist reads as empty and is not made);
        other URLs are returned as given (SQLite is handled by :meth:`sqlite_missing`).

        A tenant that exists lives in a current schema, so its refresh still writes.
        """
        parts = _store_url_parts(self.store)
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            return self.store
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "migrate"]
        query.append(("migrate", "false"))
        return urlunsplit(parts._replace(query=urlencode(query)))

    def sqlite_missing(self) -> str | None:
        """The path of an SQLite store file that does not exist yet (else None): read-only
        commands report it instead of creating it."""
        if _store_url_parts(self.store).scheme.lower() != "sqlite":
            return None
        from ..store import SQLiteStore

        path = SQLiteStore.from_url(self.store).path
        return None if os.path.exists(path) else path

    def keyring(self) -> Keyring | None:
        """The key file given with ``--keys-file``, else ``FACTORIAL_TOKENS_KEYS``, else
        ``None``: exactly what the library reads, so both open a store the same way.
        No command creates keys on its own (``keygen`` writes them where told)."""
        if self.keys_file:
            return Keyring.from_file(self.keys_file)
        return Keyring.from_env()


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared configuration flags and pass a ``Config`` as ``cfg``."""

    @click.option(
        "--store",
        envvar="FACTORIAL_TOKENS_STORE",
        default=DEFAULT_STORE,
        show_default=True,
        show_envvar=True,
        metavar="URL",
        help="Token store URL: sqlite:///path, redis://..., postgresql://..., memory://.",
    )
    @click.option(
        "--keys-file",
        type=click.Path(dir_okay=False),
        default=None,
        metavar="PATH",
        help="Key file (0600) sealing tokens at rest [default: FACTORIAL_TOKENS_KEYS, else none].",
    )
    @click.option(
        "--base-url",
        envvar="FACTORIAL_BASE_URL",
        default=DEFAULT_BASE_URL,
        show_default=True,
        show_envvar=True,
        metavar="URL",
        help="Factorial's base URL.",
    )
    @click.option(
        "--redirect-uri",
        envvar="FACTORIAL_REDIRECT_URI",
        show_envvar=True,
        metavar="URL",
        help="The OAuth redirect URI registered for the app.",
    )
    @click.option(
        "--client-secret",
        envvar="FACTORIAL_CLIENT_SECRET",
        show_envvar=True,
        show_default=False,
        metavar="SECRET",
        help="OAuth client secret (prefer the environment variable: flags show in `ps`).",
    )
    @click.option(
        "--client-id",
        envvar="FACTORIAL_CLIENT_ID",
        show_envvar=True,
        metavar="ID",
        help="OAuth client id.",
    )
    @functools.wraps(func)
    def wrapper(
        client_id: str | None,
        client_secret: str | None,
        redirect_uri: str | None,
        base_url: str,
        keys_file: str | None,
        store: str,
        **kwargs: Any,
    ) -> Any:
        cfg = Config(client_id, client_secret, redirect_uri, base_url, store, keys_file)
        return func(cfg=cfg, **kwargs)

    return wrapper


def _tenant(_: click.Context, __: click.Parameter, value: str) -> str:
    try:
        return validate_tenant(value)
    except InvalidTenant as exc:
        raise click.BadParameter(str(exc)) from None


def _tenants(context: click.Context, parameter: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """:func:`_tenant` for a repeatable option (ids NFC-normalised, as the routes compare them)."""
    return tuple(_tenant(context, parameter, value) for value in values)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
#: The longest duration taken (beyond it, or infinite, is a usage error).
_LONGEST = 100 * 365 * 86400.0


class Duration(click.ParamType[float]):
    """Seconds, or a number with a unit: ``90``, ``90s``, ``15m``, ``12h``, ``5d``."""

    name = "duration"

    def __init__(self, minimum: float = 0.0) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        match = _DURATION.match(str(value))
        if match is None:
            self.fail(f"{value!r} is not a duration (e.g. 90, 90s, 15m, 12h, 5d)", param, ctx)
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        if seconds < self.minimum:
            self.fail(f"{str(value)[:40]!r} is too short (at least {self.minimum:g} s)", param, ctx)
        if not seconds <= _LONGEST:
            self.fail(
                f"{str(value)[:40]!r} is too long (at most {_LONGEST / 86400 / 365:.0f} years)", param, ctx
            )
        return seconds


def _when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "never"
    delta = timestamp - now
    span = _span(abs(delta))
    return f"in {span}" if delta >= 0 else f"{span} ago"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


_LOG_FORMAT = click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines as text, or as one JSON object per line with tenant, event, fingerprint, "
    "store and duration_ms fields.",
)


def _use_log_format(log_format: str) -> None:
    """Switch the root handlers to JSON lines when asked."""
    if log_format != "json":
        return
    from .._logs import JsonFormatter

    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter())


def _store_url_parts(url: str) -> SplitResult:
    """``urlsplit(url)``, or ConfigurationError for one it cannot read (not quoted: a store
    URL may hold a password)."""
    parts = split_url(url)
    if parts is None:
        raise ConfigurationError("the store URL cannot be read (an unclosed [host] or a bad port)")
    return parts


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a value read from the store (planted
    there) must not drive the operator's terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    try:
        return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):  # a stored instant no calendar holds
        return None


# --------------------------------------------------------------------------- commands


@click.group(epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug), to stderr.")
@click.version_option(package_name="factorial-tokens")
def main(verbose: int) -> None:
    """Keep Factorial HR OAuth tokens valid for many companies across many workers.

    Start with `factorial-tokens demo`: it runs the whole job against a strict local
    simulator of Factorial and shows that no grant was broken.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command(epilog=_EPILOG)
@click.option(
    "-t", "--tenants", default=5, show_default=True, type=click.IntRange(1, 1000), help="Companies."
)
@click.option("-p", "--workers", default=4, show_default=True, type=click.IntRange(1, 64), help="Processes.")
@click.option(
    "-c", "--tasks", default=25, show_default=True, type=click.IntRange(1, 10000), help="Tasks each."
)
@click.option("-d", "--duration", default=15.0, show_default=True, type=Duration(), help="Seconds to run.")
@click.option("--token-ttl", default=3.0, show_default=True, type=Duration(), help="Access token lifetime.")
@click.option("--leeway", default=1.0, show_default=True, type=Duration(), help="Refresh this early.")
@click.option(
    "--think",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 60),
    help="Seconds between a task's calls.",
)
@click.option(
    "--store", default=None, metavar="URL", help="Store URL [default: SQLite file in a temp folder]."
)
@click.option(
    "--report", type=click.Path(dir_okay=False, writable=True), help="Also write the result as JSON."
)
def demo(
    tenants: int,
    workers: int,
    tasks: int,
    duration: float,
    token_ttl: float,
    leeway: float,
    think: float,
    store: str | None,
    report: str | None,
) -> None:
    """Run the main job against a strict simulated Factorial and check every guarantee.

    Connects the companies through the real authorization-code flow (the connect
    server's routes), then runs worker processes calling the API through short-lived
    tokens, and ends with a table of what Factorial saw against the ideal. Exits 1 if any
    guarantee was broken.
    """
    from rich.console import Console

    from .demo import DemoConfig, render, run_demo

    if report and not os.path.isdir(os.path.dirname(os.path.abspath(report))):
        _fail(f"error: --report: no folder {os.path.dirname(os.path.abspath(report))!r}", EXIT_USAGE)
    if store:
        password = _password(store)
        if password:
            _Secrets.values.add(password)
    config = DemoConfig(tenants, workers, tasks, duration, token_ttl, leeway, think, store)
    console = Console()
    try:
        result = run_demo(config, console)
    except FactorialTokensError as exc:
        _fail(f"error: {exc}", _exit_code(exc))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    render(result, console)
    if report:
        with open(report, "w", encoding="utf-8") as fh:
            json.dump(result.values, fh, indent=2, default=str)
    sys.exit(EXIT_OK if result.ok else EXIT_BROKEN)


@main.command(epilog=_EPILOG)
@click.argument("tenant", callback=_tenant)
@_config_options
def token(cfg: Config, tenant: str) -> None:
    """Print a valid access token for TENANT on stdout (refreshing it if due).

    Without the client secret a stored token that is not yet due is printed; one that
    needs a refresh exits 2 asking for FACTORIAL_CLIENT_SECRET.
    """
    import time

    can_refresh = bool(cfg.client_secret)

    async def run() -> str:
        async with cfg.manager(tenant=tenant, listing=not can_refresh) as tm:
            if can_refresh:
                return await tm.access_token(tenant)
            tokens = await tm.tokens(tenant)
            if tokens.expires_at is not None and time.time() >= tokens.refresh_due_at(tm.leeway):
                raise ConfigurationError(
                    f"tenant {tenant!r}'s token is due for a refresh, which needs the client secret: "
                    "set FACTORIAL_CLIENT_SECRET (or --client-secret)"
                )
            return tokens.access_token

    click.echo(_run(run()))


def _listing(cfg: Config) -> tuple[list[Any], str | None]:
    """The tenants in the store (metadata only) and the path of a missing SQLite file.

    Shared by ``status`` and ``tenants``: needs only the client id, reads no keys, and
    creates nothing (a missing SQLite file lists as empty).
    """

    async def run() -> list[Any]:
        async with TokenManager(app, cfg.read_store()) as tm:
            return await tm.tenants()

    try:
        app = cfg.app(listing=True)
        missing = cfg.sqlite_missing()
    except FactorialTokensError as exc:
        _fail(f"error: {exc}", _exit_code(exc))
    return ([] if missing else _run(run())), missing


@main.command("tenants", epilog=_EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@_config_options
def tenants_command(cfg: Config, as_json: bool) -> None:
    """List the tenants of the app, one per line: tenant id and status (tab-separated).

    Needs only the client id; prints nothing when the store holds no tenants.
    """
    infos, _ = _listing(cfg)
    if as_json:
        rows = [{"tenant": info.tenant, "status": info.status.value} for info in infos]
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    for info in infos:
        click.echo(f"{_printable(info.tenant)}\t{info.status.value}")


@main.command(epilog=_EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--watch", is_flag=True, help="Redraw a live table (refreshes/min, failures) until Ctrl-C.")
@click.option(
    "--interval",
    default=2.0,
    show_default=True,
    type=Duration(minimum=0.01),
    help="--watch: time between redraws.",
)
@click.option("--count", default=0, type=click.IntRange(0), help="--watch: stop after this many redraws.")
@_config_options
def status(cfg: Config, as_json: bool, watch: bool, interval: float, count: int) -> None:
    """List the tenants in the store: status, expiry, last refresh (no tokens)."""
    import time

    if watch:
        from rich.console import Console

        from ._watch import watch as watch_tenants

        try:
            missing = cfg.sqlite_missing()
        except FactorialTokensError as exc:
            _fail(f"error: {exc}", _exit_code(exc))
        if missing is not None:  # a read-only command creates nothing
            click.echo(f"No tenants in the store ({missing} does not exist yet).")
            return

        async def live() -> int:
            async with cfg.manager(read_only=True, listing=True) as tm:
                return await watch_tenants(tm, Console(), interval=interval, count=count, when=_when)

        _run(live())
        return

    infos, missing = _listing(cfg)
    now = time.time()
    if as_json:
        rows = [
            {
                "tenant": info.tenant,
                "status": info.status.value,
                "needs_reauthorization": info.needs_reauthorization,
                "expires_at": _iso(info.expires_at),
                "refreshed_at": _iso(info.refreshed_at),
                "version": info.version,
            }
            for info in infos
        ]
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not infos:
        click.echo(f"No tenants in the store{f' ({missing} does not exist yet)' if missing else ''}.")
        return
    table = Table()
    for column in ("tenant", "status", "expires", "last refresh", "needs re-authorization"):
        table.add_column(column)
    for info in infos:
        table.add_row(
            escape(_printable(info.tenant)),
            info.status.value,
            _when(info.expires_at, now),
            _when(info.refreshed_at, now),
            "[red]yes[/red]" if info.needs_reauthorization else "no",
        )
    console.print(table)


@main.command(epilog=_EPILOG)
@click.argument("tenant", callback=_tenant)
@_config_options
def refresh(cfg: Config, tenant: str) -> None:
    """Force a refresh of TENANT's tokens (single-flight, under the lease)."""

    async def run() -> Any:
        async with cfg.manager(tenant=tenant) as tm:
            return await tm.refresh(tenant)

    tokens = _run(run())
    expires = "never expires" if tokens.lifetime is None else f"expires in {tokens.lifetime:.0f} s"
    click.echo(f"tenant {tenant!r} refreshed: access token {tokens.fingerprint}, {expires}")


@main.command(epilog=_EPILOG)
@click.argument("tenant", callback=_tenant)
@_config_options
def revoke(cfg: Config, tenant: str) -> None:
    """Revoke TENANT's grant at Factorial and remove its tokens from the store."""

    async def run() -> None:
        async with cfg.manager(tenant=tenant) as tm:
            await tm.revoke(tenant)

    _run(run())
    click.echo(f"tenant {tenant!r} revoked at Factorial and removed from the store")


@main.command(epilog=_EPILOG)
@click.argument("tenant", callback=_tenant)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_config_options
def whoami(cfg: Config, tenant: str, as_json: bool) -> None:
    """Show who granted TENANT's token (Factorial's credentials endpoint)."""
    import attrs

    async def run() -> Any:
        async with cfg.manager(tenant=tenant) as tm:
            return await tm.credentials(tenant)

    fields = attrs.asdict(_run(run()))
    if as_json:
        click.echo(json.dumps(fields, indent=2, ensure_ascii=False))
        return
    for name, value in fields.items():
        click.echo(f"{name + ':':<12} {'' if value is None else value}")


@main.command("connect-url", epilog=_EPILOG)
@click.argument("tenant", callback=_tenant)
@click.option("--company", is_flag=True, help="Ask for a company token (resource_owner_type=company).")
@click.option("--scope", default=None, help="OAuth scopes, space-separated.")
@_config_options
def connect_url(cfg: Config, tenant: str, company: bool, scope: str | None) -> None:
    """Print Factorial's authorize URL for TENANT (signed state, 10 minutes, bound to no browser).

    For a callback handled by your own code (`complete_callback` without a binding); the
    `serve` command refuses it unless run with --open: send a `connect-link` instead.
    """
    try:
        # Signing a state needs neither the store nor keys: nothing is opened or created.
        manager = TokenManager(cfg.app(), "memory://")
    except FactorialTokensError as exc:
        _fail(f"error: {exc}", _exit_code(exc))
    click.echo(manager.authorization_url(tenant, company=company, scope=scope))


@main.command("connect-link", epilog=_EPILOG)
@click.argument("tenant", callback=_tenant)
@click.option("--ttl", default=3600.0, show_default=True, type=Duration(), help="How long the link works.")
@click.option(
    "--link-base",
    default=None,
    metavar="URL",
    help="Where the connect routes answer [default: the redirect URI's origin].",
)
@click.option("--company", is_flag=True, help="Ask for a company token (resource_owner_type=company).")
@_config_options
def connect_link(cfg: Config, tenant: str, ttl: float, link_base: str | None, company: bool) -> None:
    """Print a signed link that lets TENANT's admin connect the company through `serve`.

    Whoever holds the link can start connecting TENANT until it expires: send it to that
    tenant's admin only. A tenant already connected refuses another company anyway.
    """
    try:
        # Signing a link needs neither the store nor keys: nothing is opened or created.
        manager = TokenManager(cfg.app(), "memory://")
        link = manager.connect_link(tenant, ttl=ttl, base_url=link_base)
    except FactorialTokensError as exc:
        _fail(f"error: {exc}", _exit_code(exc))
    click.echo(link + ("&company=1" if company else ""))


@main.command(epilog=_EPILOG)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks one.")
@click.option(
    "--tenant",
    "allowed",
    multiple=True,
    callback=_tenants,
    metavar="ID",
    help="Only these tenants may connect (repeatable); others get 404. Default: any.",
)
@click.option(
    "--open",
    "open_routes",
    is_flag=True,
    help="LOCAL DEVELOPMENT ONLY: /connect without a signed link, callbacks without the cookie.",
)
@click.option(
    "--success-url",
    default=None,
    metavar="URL",
    help="Send the admin here (303) after connecting; {tenant} is replaced [default: a page].",
)
@_LOG_FORMAT
@_config_options
def serve(
    cfg: Config,
    host: str,
    port: int,
    allowed: tuple[str, ...],
    open_routes: bool,
    success_url: str | None,
    log_format: str,
) -> None:
    """Serve GET /connect/{tenant} and the OAuth callback (the redirect URI's path),
    plus /healthz, /readyz and /metrics (Prometheus; needs the prometheus extra).

    /connect needs a signed link (`factorial-tokens connect-link TENANT`) and binds the
    flow to the admin's browser with a cookie; the callback refuses any other browser,
    and a tenant already connected refuses another company.
    """
    from ..web import AccessLogger, add_ops_routes, callback_path, connect_app, prometheus_exporter

    _use_log_format(log_format)
    allow = None if not allowed else (lambda _request, tenant: tenant in set(allowed))
    exporter = prometheus_exporter()
    if open_routes:
        click.echo(
            "WARNING: --open: anyone who reaches this server can connect any tenant without a "
            "link; for local development only",
            err=True,
        )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with cfg.manager(telemetry=exporter[0] if exporter else None) as tm:
            app = connect_app(tm, allow=allow, open_routes=open_routes, success_url=success_url)
            add_ops_routes(app, tm, exporter[1] if exporter else None)
            runner = web.AppRunner(app, access_log_class=AccessLogger)
            await runner.setup()
            try:
                await web.TCPSite(runner, host, port).start()
                bound = runner.addresses[0][1]
                shown = f"[{host}]" if ":" in host else host
                click.echo(f"listening on http://{shown}:{bound}")
                if open_routes:
                    click.echo(f"  connect a company: http://{shown}:{bound}/connect/<tenant>")
                else:
                    click.echo("  connect a company: the link `factorial-tokens connect-link TENANT` prints")
                click.echo(f"  OAuth callback:    {callback_path(tm.app.redirect_uri)}")
                click.echo(f"  health:            http://{shown}:{bound}/healthz  /readyz  /metrics")
                sys.stdout.flush()
                await stop.wait()
            finally:
                await runner.cleanup()

    try:
        _run(run())
    except OSError as exc:
        _fail(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", EXIT_USAGE)


@main.command(epilog=_EPILOG)
@click.option(
    "--max-age",
    default=DEFAULT_MAX_AGE,
    show_default=True,
    type=Duration(),
    help="Refresh tenants whose tokens are older than this (e.g. 5d).",
)
@click.option("--interval", default=3600.0, show_default=True, type=Duration(), help="Time between passes.")
@click.option(
    "--jitter",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Spread: each tenant's threshold is lowered by up to this share of --max-age.",
)
@click.option("--once", is_flag=True, help="Run one pass and exit (for cron).")
@click.option(
    "--concurrency", default=16, show_default=True, type=click.IntRange(1), help="Tenants visited at once."
)
@click.option(
    "--refresh-rate",
    default=None,
    type=click.FloatRange(0, min_open=True),
    help="Refreshes per minute shared by every worker of the app (e.g. 180).",
)
@_LOG_FORMAT
@_config_options
def keepalive(
    cfg: Config,
    max_age: float,
    interval: float,
    jitter: float,
    once: bool,
    concurrency: int,
    refresh_rate: float | None,
    log_format: str,
) -> None:
    """Refresh idle tenants before Factorial's week-long refresh tokens age out.

    Skips tenants that need re-authorization and company tokens that never expire;
    logs errors and carries on. With --once, exits 4 if any tenant needs
    re-authorization, 5 if a refresh failed.
    """
    _use_log_format(log_format)
    if not once and not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger("factorial_tokens.keepalive").setLevel(logging.INFO)

    async def run() -> KeepAliveReport | None:
        async with cfg.manager(refresh_rate=refresh_rate) as tm:
            work = asyncio.ensure_future(
                tm.keep_alive(
                    max_age=max_age, interval=interval, jitter=jitter, once=once, concurrency=concurrency
                )
            )
            if once:
                return await work
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, work.cancel)
            try:
                await work
            except asyncio.CancelledError:
                return None
            return None

    report = _run(run())
    if report is None:
        return
    click.echo(
        f"checked {report.checked}: refreshed {len(report.refreshed)}, not due {len(report.not_due)}, "
        f"non-expiring {len(report.non_expiring)}, needing re-authorization "
        f"{len(report.needs_reauth) + len(report.lost)}, failed {len(report.failed)}"
    )
    for tenant in report.needs_reauth + report.lost:
        click.echo(f"  needs re-authorization: {tenant!r}")
    for tenant in report.failed:
        click.echo(f"  failed: {tenant!r}")
    if report.failed:
        sys.exit(EXIT_PROVIDER)
    if report.needs_reauth or report.lost:
        sys.exit(EXIT_REAUTH)


@main.command(epilog=_EPILOG)
@click.option("--id", "kid", default=None, metavar="KID", help="Key id [default: k<UTC time>-<random>].")
@click.option(
    "--keys-file",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="PATH",
    help="Write the key into this file (created 0600, or the new key added as the newest).",
)
def keygen(kid: str | None, keys_file: str | None) -> None:
    """Make a new random key: into --keys-file, or on stdout as KID:BASE64 (keep it secret).

    With --keys-file the file is created with mode 0600, or, if it exists, the new key is
    added as the newest (rewritten atomically, 0600). Then run `rekey --keys-file PATH`.
    Without it, add the printed entry to FACTORIAL_TOKENS_KEYS (comma-separated, newest last).
    """
    import os

    try:
        if keys_file is None:
            click.echo(Keyring.generate(kid).export(), nl=False)
            return
        ring = (
            Keyring.from_file(keys_file).rotated(kid) if os.path.exists(keys_file) else Keyring.generate(kid)
        )
        ring.save(keys_file)
    except FactorialTokensError as exc:
        _fail(f"error: {exc}", _exit_code(exc))
    except OSError as exc:
        _fail(f"error: cannot write key file {keys_file!r}: {exc.strerror or exc}", EXIT_USAGE)
    click.echo(f"key {ring.newest!r} written to {keys_file} (mode 0600; {len(ring)} keys, newest last)")


@main.command("rekey", epilog=_EPILOG)
@click.option(
    "--allow-plaintext",
    is_flag=True,
    help="Seal plain (unsealed) records too: only to complete a migration to sealing.",
)
@_config_options
def rekey_command(cfg: Config, allow_plaintext: bool) -> None:
    """Re-seal every tenant's tokens under the newest key, while workers keep running.

    Plain (unsealed) records are sealed too with --allow-plaintext, which completes a
    migration to sealing; without it they count as records that cannot be opened (once
    sealing is on, a plain record was written by someone without the key). Each tenant is
    re-sealed under its lease with a fenced write, so a concurrent refresh is never
    overwritten. Records that cannot be opened are left intact (exit 6).
    """

    async def run() -> int:
        ring = cfg.keyring()
        if ring is None:
            raise ConfigurationError("no keys: set FACTORIAL_TOKENS_KEYS or pass --keys-file")
        missing = cfg.sqlite_missing()
        if missing is not None:
            # Created empty, it would report a rotation done, and the old key be retired.
            raise StoreUnavailable(f"no token store at {missing}: nothing to re-seal (check the store URL)")
        store = cfg.read_store()  # a Postgres schema that does not exist is not made either
        async with TokenManager(cfg.app(), store, keyring=ring, allow_plaintext=allow_plaintext) as tm:
            moved = await tm.rekey(ring)
        click.echo(f"re-sealed {moved} tenant records under key {ring.newest!r}")
        return moved

    _run(run())


SIM_CLIENT_ID = "dev-client"
SIM_CLIENT_SECRET = "dev-secret"  # the simulator's documented development secret
SIM_REDIRECT_URI = "http://127.0.0.1:8000/oauth/callback"


def _fault(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, int, str]]:
    from ..testing import ENDPOINTS, Fault

    faults = []
    for value in values:
        kind, _sep, rest = value.partition(":")
        times, _sep, endpoint = rest.partition(":")
        names = sorted(f.value for f in Fault)
        if (
            kind not in names
            or (times and not re.fullmatch(r"[1-9][0-9]{0,5}", times))
            or (endpoint and endpoint not in ENDPOINTS)
        ):
            raise click.BadParameter(
                f"{value!r}: expected KIND[:TIMES[:ENDPOINT]], KIND one of {', '.join(names)}, "
                f"ENDPOINT one of {', '.join(ENDPOINTS)}"
            )
        faults.append((kind, int(times or 1), endpoint or "token"))
    return faults


@main.command(epilog=_EPILOG)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8001, show_default=True, type=click.IntRange(0, 65535), help="0 picks one.")
@click.option("--client-id", envvar="FACTORIAL_CLIENT_ID", default=SIM_CLIENT_ID, show_default=True)
@click.option(
    "--client-secret",
    envvar="FACTORIAL_CLIENT_SECRET",
    default=SIM_CLIENT_SECRET,
    show_default=True,
    help="The secret the simulated app authenticates with.",
)
@click.option(
    "--redirect-uri",
    envvar="FACTORIAL_REDIRECT_URI",
    default=SIM_REDIRECT_URI,
    show_default=True,
    help="The registered redirect URI (where `serve` takes the callback).",
)
@click.option(
    "--token-ttl", default=7200.0, show_default=True, type=Duration(), help="Access token lifetime."
)
@click.option(
    "--refresh-token-ttl",
    default=None,
    type=Duration(),
    help="Refresh token lifetime [default: never expires].",
)
@click.option(
    "--refresh-mode",
    type=click.Choice(["revoke_at_refresh", "revoke_on_first_use"]),
    default="revoke_at_refresh",
    show_default=True,
    help="What a refresh does to the pair it came from (revoke_on_first_use is Factorial's).",
)
@click.option(
    "--reuse-detection/--no-reuse-detection",
    default=True,
    show_default=True,
    help="A reused code or rotated refresh token revokes the whole grant.",
)
@click.option("--latency", default=0.0, show_default=True, type=Duration(), help="Delay before every answer.")
@click.option("--rate-limit", default=None, type=click.IntRange(1), help="Token POSTs per minute before 429.")
@click.option(
    "--fault",
    "faults",
    multiple=True,
    callback=_fault,
    metavar="KIND[:TIMES[:ENDPOINT]]",
    help="Queue a fault (repeatable), e.g. http_503:2:token, rate_limited, drop_after:1:token.",
)
def simulate(
    host: str,
    port: int,
    client_id: str,
    client_secret: str,
    redirect_uri: str,
    token_ttl: float,
    refresh_token_ttl: float | None,
    refresh_mode: str,
    reuse_detection: bool,
    latency: float,
    rate_limit: int | None,
    faults: list[tuple[str, int, str]],
) -> None:
    """Run a simulated Factorial locally, to develop against without an account.

    It serves the OAuth endpoints (an authorize page where you pick a company id and
    approve, token, revoke) and the API's credentials and employees endpoints, with the
    strict rules of FakeFactorial. Point your app or `factorial-tokens serve` at it with
    FACTORIAL_BASE_URL. State lives in memory: a restart forgets every grant.
    """
    from ..testing import FakeFactorial, Fault, RefreshMode

    try:
        sim = FakeFactorial(
            client_id=client_id,
            client_secret=client_secret,
            redirect_uri=redirect_uri,
            refresh_mode=RefreshMode(refresh_mode),
            reuse_detection=reuse_detection,
            access_token_ttl=token_ttl,
            refresh_token_ttl=refresh_token_ttl,
            latency=latency,
            rate_limit_per_minute=rate_limit,
            host=host,
            port=port,
            authorize_page=True,
        )
    except ValueError as exc:
        _fail(f"error: {exc}", EXIT_USAGE)
    for kind, times, endpoint in faults:
        sim.inject(Fault(kind), times=times, endpoint=endpoint)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with sim:
            click.echo(f"simulated Factorial listening on {sim.base_url}")
            click.echo(f"  app: client id {client_id!r}, redirect URI {redirect_uri}")
            click.echo("  in another terminal:")
            click.echo(
                f"    export FACTORIAL_BASE_URL={sim.base_url} FACTORIAL_CLIENT_ID={client_id} "
                f"FACTORIAL_REDIRECT_URI={redirect_uri}"
            )
            if client_secret == SIM_CLIENT_SECRET:
                click.echo(f"    export FACTORIAL_CLIENT_SECRET={SIM_CLIENT_SECRET}")
            sys.stdout.flush()
            await stop.wait()
            stats = sim.stats
            click.echo(
                f"exchanges {stats.exchanges}, refreshes {stats.refreshes}, "
                f"invalid_grant {stats.invalid_grant}, families revoked {stats.families_revoked}, "
                f"API calls {stats.api_calls}, faults served {stats.faults_injected}"
            )

    try:
        _run(run())
    except OSError as exc:
        _fail(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", EXIT_USAGE)

"""Keepalive: refresh idle tenants before their refresh token ages out.

Factorial's refresh tokens last about a week. A company whose tokens nobody asked for in
that time would have to connect again, so a keepalive pass refreshes every tenant whose
current tokens are older than ``max_age`` (default five days). Each tenant's threshold is
lowered by its own fixed fraction of ``jitter * max_age`` (a hash of the tenant), so
tenants connected together do not all refresh together, and every keepalive process
agrees on who is due.

Refreshes go through the manager's usual path (single-flight, under the tenant's lease,
fenced): a tenant that another worker refreshed since the listing is not refreshed again.
Up to ``concurrency`` tenants are visited at once, and every refresh waits for the fleet's
back-pressure (a provider 429's hold, the manager's ``refresh_rate`` budget), so a pass over
10,000 tenants neither runs them one by one nor all at once. With a budget, keep
``concurrency * 60 / refresh_rate`` below the manager's ``refresh_deadline``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from typing import Protocol

import attrs

from ._errors import (
    ConfigurationError,
    ProviderError,
    ReauthorizationRequired,
    RefreshTimeout,
    StoreUnavailable,
)
from ._models import FactorialApp, TenantInfo, TokenSet

__all__ = ["KeepAliveReport"]

log = logging.getLogger("factorial_tokens.keepalive")

#: Refresh tokens older than this are renewed (Factorial's last about a week).
DEFAULT_MAX_AGE = 5 * 86400.0

#: Tenants a keepalive pass visits at once.
DEFAULT_CONCURRENCY = 16


@attrs.frozen
class KeepAliveReport:
    """What one keepalive pass did, as tuples of tenant ids (no tokens).

    ``refreshed``: renewed now (by this pass or, just before, by another worker);
    ``not_due``: younger than their threshold; ``needs_reauth``: skipped, the company must
    connect again; ``lost``: found dead while refreshing (now need re-authorization);
    ``non_expiring``: company tokens that never expire; ``failed``: an error was logged
    and the tenant will be tried on the next pass.
    """

    refreshed: tuple[str, ...] = ()
    not_due: tuple[str, ...] = ()
    needs_reauth: tuple[str, ...] = ()
    lost: tuple[str, ...] = ()
    non_expiring: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()

    @property
    def checked(self) -> int:
        """How many tenants the pass looked at."""
        return sum(
            len(group)
            for group in (
                self.refreshed,
                self.not_due,
                self.needs_reauth,
                self.lost,
                self.non_expiring,
                self.failed,
            )
        )

    @property
    def ok(self) -> bool:
        """True when no tenant failed and none needs re-authorization."""
        return not (self.failed or self.lost or self.needs_reauth)


class Renewer(Protocol):
    """What a keepalive pass needs of the manager (:class:`~factorial_tokens.TokenManager`)."""

    @property
    def app(self) -> FactorialApp:
        """The OAuth application (its client id spreads the tenants' thresholds)."""
        ...

    async def tenants(self) -> list[TenantInfo]:
        """Every tenant of the app, with its status and stored version."""
        ...

    async def refresh(self, tenant: str, *, newer_than: int | None = None) -> TokenSet:
        """Refresh ``tenant`` unless its stored version is already above ``newer_than``."""
        ...


def _check(max_age: float, interval: float, jitter: float, concurrency: int = 1) -> None:
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigurationError("keepalive concurrency must be a positive integer")
    if not max_age > 0:
        raise ConfigurationError("keepalive max_age must be positive")
    if not interval > 0:
        raise ConfigurationError("keepalive interval must be positive")
    if not 0 <= jitter < 1:
        raise ConfigurationError("keepalive jitter must be in [0, 1)")


def threshold(namespace: str, tenant: str, max_age: float, jitter: float) -> float:
    """The age (seconds) past which ``tenant``'s tokens are renewed: ``max_age`` lowered
    by the tenant's fixed share of ``jitter * max_age``."""
    digest = hashlib.sha256(f"keepalive\x00{namespace}\x00{tenant}".encode()).digest()
    spread = int.from_bytes(digest[:8], "big") / 2**64
    return max_age * (1.0 - jitter * spread)


async def keep_alive_pass(
    manager: Renewer,
    *,
    max_age: float = DEFAULT_MAX_AGE,
    jitter: float = 0.2,
    now: float | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> KeepAliveReport:
    """Run one pass over every tenant of the manager's app, ``concurrency`` at a time;
    see the module docstring.

    Errors on one tenant are logged and the pass goes on. Raises StoreUnavailable only
    when the tenants cannot be listed, ConfigurationError for bad arguments.
    """
    _check(max_age, 1.0, jitter, concurrency)
    infos = await manager.tenants()
    now = time.time() if now is None else now
    visited = [""] * len(infos)
    todo = iter(enumerate(infos))

    async def visitor() -> None:
        for index, info in todo:  # one shared iterator: each tenant is taken once
            visited[index] = await _visit(manager, info, now, max_age, jitter)

    await asyncio.gather(*(visitor() for _ in range(min(concurrency, len(infos)))))
    groups: dict[str, list[str]] = {name: [] for name in attrs.fields_dict(KeepAliveReport)}
    for info, group in zip(infos, visited, strict=True):
        groups[group].append(info.tenant)
    report = KeepAliveReport(**{name: tuple(tenants) for name, tenants in groups.items()})
    log.info(
        "keepalive pass: %d tenants, %d refreshed, %d not due, %d need re-authorization, %d failed",
        report.checked,
        len(report.refreshed),
        len(report.not_due),
        len(report.needs_reauth) + len(report.lost),
        len(report.failed),
    )
    return report


#: How many writes that renew nothing (rekeys) a visit looks past before it gives up.
_RENEWAL_TRIES = 3


async def _visit(manager: Renewer, info: TenantInfo, now: float, max_age: float, jitter: float) -> str:
    """Refresh one tenant if due; return the report group it belongs to."""
    tenant = info.tenant
    if info.needs_reauthorization:
        return "needs_reauth"
    if info.expires_at is None:
        return "non_expiring"
    age = now - info.refreshed_at
    if age < threshold(manager.app.client_id, tenant, max_age, jitter):
        return "not_due"
    try:
        # newer_than the listed version: if another worker renewed the tenant since the
        # listing, its result is taken instead of refreshing a second time.
        seen = info.version
        tokens = await manager.refresh(tenant, newer_than=seen)
        while tokens.obtained_at <= info.refreshed_at and seen < info.version + _RENEWAL_TRIES:
            # The version rose since the listing by a write that renewed nothing (a rekey):
            # these are the listed tokens. Ask for a version above that one (another
            # worker's renewal of it is taken as it is).
            seen += 1
            tokens = await manager.refresh(tenant, newer_than=seen)
        if tokens.obtained_at <= info.refreshed_at:
            log.warning(
                "keepalive: tenant %r was rewritten, not renewed, %d times; next pass",
                tenant,
                seen - info.version,
            )
            return "failed"
    except ReauthorizationRequired as exc:
        log.error("keepalive: tenant %r needs re-authorization: %s", tenant, exc.reason)
        return "lost"
    except (ProviderError, StoreUnavailable, RefreshTimeout) as exc:
        # Expected outcomes (a provider hold, an outage): one line, not a traceback each.
        log.warning("keepalive: tenant %r not renewed (%s); it is retried on the next pass", tenant, exc)
        return "failed"
    except Exception:
        log.exception("keepalive: refreshing tenant %r failed; it is retried on the next pass", tenant)
        return "failed"
    log.info("keepalive: tenant %r renewed (its tokens were %.0f s old)", tenant, age)
    return "refreshed"


async def keep_alive(
    manager: Renewer,
    *,
    max_age: float = DEFAULT_MAX_AGE,
    interval: float = 3600.0,
    jitter: float = 0.2,
    once: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> KeepAliveReport:
    """Run keepalive passes every ``interval`` seconds (jittered by ``jitter``) until
    cancelled; with ``once=True`` run one pass and return its report. Each pass visits
    ``concurrency`` tenants at once.

    In the loop, a pass that cannot list the tenants (StoreUnavailable) is logged and
    retried on the next tick. ``interval`` must stay well below the refresh token's
    lifetime minus ``max_age`` (an hour against two days, by default).
    """
    _check(max_age, interval, jitter, concurrency)
    while True:
        try:
            report = await keep_alive_pass(manager, max_age=max_age, jitter=jitter, concurrency=concurrency)
        except StoreUnavailable as exc:
            if once:
                raise
            log.error("keepalive: cannot list tenants (%s); retrying on the next pass", exc)
        else:
            if once:
                return report
        await asyncio.sleep(interval * random.uniform(1.0 - jitter, 1.0 + jitter))

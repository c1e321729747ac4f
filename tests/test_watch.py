"""``factorial-tokens status --watch``: the live table's figures, and a bounded run."""

from __future__ import annotations

from factorial_tokens import TenantInfo
from factorial_tokens.cli._watch import Tracker
from factorial_tokens.store import TenantStatus
from factorial_tokens.testing import FakeFactorial

from .test_cli import cli, env, seed, sim, store  # noqa: F401  (env, sim, store: fixtures)

ACTIVE, DEAD = TenantStatus.ACTIVE, TenantStatus.NEEDS_REAUTH


def _info(tenant: str, status: TenantStatus, version: int) -> TenantInfo:
    return TenantInfo(tenant, status, 4000.0, 100.0, version)


def test_refreshes_per_minute_and_failures_from_successive_listings() -> None:
    tracker = Tracker()
    first = tracker.update([_info("a", ACTIVE, 3), _info("b", ACTIVE, 1), _info("c", DEAD, 7)], now=1000.0)
    assert [r.per_minute for r in first] == [None, None, None]
    assert [r.failures for r in first] == [0, 0, 0]  # c needed re-authorization before the watch
    second = tracker.update([_info("a", ACTIVE, 4), _info("b", DEAD, 2), _info("c", DEAD, 7)], now=1030.0)
    assert [r.per_minute for r in second] == [2.0, 2.0, 0.0]
    assert [r.failures for r in second] == [0, 1, 0]
    third = tracker.update([_info("a", ACTIVE, 6), _info("b", DEAD, 2), _info("c", DEAD, 7)], now=1090.0)
    assert third[0].per_minute == 2.0  # only the last minute counts: (6 - 4) over 60 s
    assert [r.failures for r in third] == [0, 1, 0]  # still dead: one failure, not two
    assert [r.status for r in third] == ["active", "needs_reauth", "needs_reauth"]


def test_status_watch_redraws_a_bounded_number_of_times(
    env: dict[str, str],  # noqa: F811
    sim: FakeFactorial,  # noqa: F811
    store: str,  # noqa: F811
) -> None:
    seed(sim, store, "acme", 1)
    seed(sim, store, "globex", 2)
    done = cli("status", "--watch", "--count", "3", "--interval", "0.05", env=env)
    assert done.returncode == 0, done.stderr
    for text in ("acme", "globex", "refreshes/min", "failures", "active", "2 tenants"):
        assert text in done.stdout, done.stdout

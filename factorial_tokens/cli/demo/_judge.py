"""The demo's verdict: what the provider and the workers counted, against the ideal."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from ..._models import redact_url
from ._config import DemoConfig, DemoResult

__all__ = ["judge"]


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[rank]


def judge(
    config: DemoConfig,
    tenants: list[str],
    callbacks: int,
    callbacks_ok: int,
    exchanged: dict[str, set[str]],
    workers: dict[str, Any],
    infos: list[Any],
    stats: Any,
    store_url: str,
) -> DemoResult:
    done: dict[int, dict[str, Any]] = workers["done"]
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    generations: dict[str, set[str]] = {t: set(exchanged.get(t, ())) for t in tenants}
    token_latency: list[float] = []
    api_latency: list[float] = []
    for result in done.values():
        counts.update(result["counts"])
        errors.update(result["errors"])
        for group in ("seen", "refreshed"):
            for tenant, fps in result[group].items():
                generations.setdefault(tenant, set()).update(fps)
        token_latency.extend(result["token_latency"])
        api_latency.extend(result["api_latency"])
    distinct = sum(len(fps) for fps in generations.values())
    ideal = distinct - len(tenants)
    reauth = sum(1 for info in infos if info.needs_reauthorization)
    values: dict[str, Any] = {
        "tenants": len(tenants),
        "workers": config.workers,
        "tasks": config.tasks,
        "duration": config.duration,
        "token_ttl": config.token_ttl,
        "leeway": config.leeway,
        "store": redact_url(store_url),
        "callbacks": callbacks,
        "callbacks_ok": callbacks_ok,
        "exchanges": stats.exchanges,
        "exchange_attempts": stats.exchange_attempts,
        "api_calls": counts["calls"],
        "api_calls_at_provider": stats.api_calls,
        "api_ok": counts["ok"],
        "api_401_answered": stats.api_unauthorized,
        "api_401_seen_by_callers": counts["unauthorized"],
        "api_other_status": counts["other"],
        "refresh_attempts": stats.refresh_attempts,
        "refreshes": stats.refreshes,
        "refreshes_by_workers": counts["refreshes"],
        "generations": distinct,
        "ideal_refreshes": ideal,
        "expected_refreshes_from_time": round(len(tenants) * config.duration / config.refresh_interval),
        "invalid_grant": stats.invalid_grant,
        "families_revoked": stats.families_revoked,
        "tenants_needing_reauth": reauth,
        "caller_errors": dict(errors),
        "workers_crashed": len(workers["crashed"]),
        "access_token_p50_ms": _percentile(token_latency, 50) * 1000,
        "access_token_p99_ms": _percentile(token_latency, 99) * 1000,
        "api_p50_ms": _percentile(api_latency, 50) * 1000,
        "api_p99_ms": _percentile(api_latency, 99) * 1000,
    }
    checks = {
        "every callback answered 200": callbacks_ok == callbacks,
        "one exchange per company": stats.exchanges == len(tenants) == stats.exchange_attempts,
        "refresh requests == ideal": stats.refresh_attempts == ideal,
        "refreshes == ideal": stats.refreshes == ideal,
        "refreshes by workers == refreshes": counts["refreshes"] == stats.refreshes,
        "zero invalid_grant": stats.invalid_grant == 0,
        "zero families revoked": stats.families_revoked == 0,
        "zero tenants needing re-authorization": reauth == 0 and len(infos) == len(tenants),
        "zero 401 seen by callers": counts["unauthorized"] == 0,
        "zero caller errors": not errors and counts["other"] == 0,
        "no worker crashed": not workers["crashed"] and len(done) == config.workers,
        "callers made API calls": counts["calls"] > 0,
    }
    broken = tuple(name for name, held in checks.items() if not held)
    values["worker_crashes"] = dict(sorted(workers["crashed"].items()))
    values["broken"] = list(broken)
    values["ok"] = not broken
    return DemoResult(values, broken)

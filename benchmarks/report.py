"""The machine a run was made on, and the markdown tables of a run's JSON results."""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

#: The recorded blocks of benchmarks/README.md: the library's own benchmarks, and the peers.
BLOCKS = ("results", "peers")


def machine(note: str) -> dict[str, Any]:
    """What the numbers depend on: cores, CPU model, Python, load."""
    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "platform": platform.platform(),
        "redis_parser": "hiredis" if importlib.util.find_spec("hiredis") else "redis-py (pure Python)",
        "loadavg_start": list(os.getloadavg()),
        "note": note,
    }


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def _times(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1f}x"


def _yes(met: bool | None) -> str:
    return "—" if met is None else ("**yes**" if met else "**NO**")


def _errors(errors: dict[str, int]) -> str:
    """``0``, or the count with the kinds: ``402 (StoreUnavailable 402)``."""
    total = sum(errors.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{name} {n}" for name, n in sorted(errors.items())) + ")"


def _hotpath(hot: dict[str, Any]) -> list[str]:
    return [
        f"### 1. Hot path (median of {hot['rounds']} alternating rounds x {hot['calls']:,} calls)",
        "",
        "| what | ns/call | ratio | target | met |",
        "|---|---:|---:|---:|:---:|",
        f"| `await tm.access_token(t)`, cached fresh token | {_num(hot['manager_ns'], 1)} "
        f"| {hot['ratio']:.2f}x | ≤ {hot['target']:.0f}x | {_yes(hot['met'])} |",
        *(
            [
                "| the same, with a configured OpenTelemetry SDK `MeterProvider` and `TracerProvider` "
                f"| {_num(hot['manager_otel_ns'], 1)} | {hot['ratio_otel']:.2f}x | ≤ {hot['target']:.0f}x "
                f"| {_yes(hot['ratio_otel'] <= hot['target'])} |"
            ]
            if hot.get("ratio_otel") is not None
            else []
        ),
        f"| baseline: bare `await` of a coroutine returning a dict value | {_num(hot['bare_ns'], 1)} "
        "| 1.00x | | |",
        "",
        "The ratio is the median of the per-round ratios (each round times both sides).",
        "",
    ]


def _shape(spec: dict[str, Any]) -> str:
    return f"{spec['processes']}x{spec['tasks']}x{spec['tenants']:,}"


def _storm_target(spec: dict[str, Any], summary: dict[str, Any]) -> bool | None:
    """Issue 13's target: p99 at most 5 ms above the same run's bare-HTTP p99 (Redis, Postgres)."""
    if spec["store"] not in ("redis", "postgres"):
        return None
    return bool(summary["p99_ms"] - summary.get("bare_p99_ms", math.nan) <= 5)


def _storms(storms: list[dict[str, Any]]) -> list[str]:
    if not storms:
        return []
    first = storms[0]["spec"]
    lat = first["latency"] * 1000
    lines = [
        f"### 2. Refresh storm (PxCxT callers, all tokens expired at once; provider latency L = {lat:.0f} ms,"
        " strict: revoke at refresh + reuse detection)",
        "",
        "| store | PxCxT | rounds | refreshes / ideal | invalid_grant | broken tenants | errors "
        "| p50 ms | p99 ms | refresh committed p50 ms | waiter lag p99 ms "
        "| bare HTTP refresh p50 / p99 ms | p99 - bare p99 | ≤ 5 ms "
        "| bare HTTP + the same callers p99 ms | p99 - that | worker CPU per tenant ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|",
    ]
    for storm in storms:
        spec, s = storm["spec"], storm["summary"]
        lines.append(
            f"| {spec['store']} | {_shape(spec)} | {spec['rounds']} "
            f"| {s['refreshes']}/{s['ideal_refreshes']} = **{s['refresh_ratio']:.2f}** "
            f"| {s['invalid_grant']} | {s['broken_tenants']} | {_errors(s['errors'])} "
            f"| {_num(s['p50_ms'], 1)} | {_num(s['p99_ms'], 1)} "
            f"| {_num(s['refreshed_p50_ms'], 1)} | {_num(s['waiter_lag_p99_ms'], 1)} "
            f"| {_num(s.get('bare_p50_ms'), 1)} / {_num(s.get('bare_p99_ms'), 1)} "
            f"| {_num(s['p99_ms'] - s.get('bare_p99_ms', math.nan), 1)} | {_yes(_storm_target(spec, s))} "
            f"| {_num(s.get('bare_callers_p99_ms'), 1)} "
            f"| {_num(s['p99_ms'] - s.get('bare_callers_p99_ms', math.nan), 1)} "
            f"| {_num(s.get('cpu_ms_per_tenant'), 2)} |"
        )
    lines += [
        "",
        "Times are from the common start instant to each caller holding a fresh token, median over"
        " rounds of each round's p50/p99. The target (p99 at most 5 ms above the bare-HTTP p99) applies to"
        " Redis and Postgres (waiters woken by notification); SQLite waiters poll. *Refresh committed*:"
        " when the lease holder had written the"
        " new tokens (its `REFRESHED` event); *waiter lag*: how long after that commit each caller of the"
        " tenant held the token (the wake-up path). *Bare HTTP refresh*: right after each round, the same"
        " P processes send one refresh per tenant straight to the simulator (no store, no manager, no"
        " waiters): the floor this machine and simulator set at that moment. *Bare HTTP + the same callers*:"
        " then the same refreshes with the storm's C x T caller tasks in each process, started together, the"
        " first of a tenant starting its refresh and the others awaiting it (no store, no manager): what"
        " Python's tasks alone add to the floor. *Worker CPU per tenant*: CPU"
        " time of all worker processes during the storm divided by T (every caller included). All from"
        " the same run.",
        "",
    ]
    return lines


def _bulk(bulk: list[dict[str, Any]]) -> list[str]:
    if not bulk:
        return []
    lines = [
        "### 2b. Many tenants at once (every tenant expired; C = 1 caller per tenant per process)",
        "",
        "| store | PxCxT | refreshes / ideal | invalid_grant | failed calls | all refreshed (s) "
        "| provider-bound (s) | ratio | bare HTTP refreshes, measured (s) | ratio "
        "| worker CPU per tenant ms | bare HTTP CPU per refresh ms | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for storm in bulk:
        spec, s = storm["spec"], storm["summary"]
        ratio = s["all_fresh_s"] / s["provider_bound_s"] if s["provider_bound_s"] else math.nan
        all_fresh = _num(s["all_fresh_s"], 2)
        if s["ok"] < s["calls"]:  # not every caller got a token: there is no "all refreshed" time
            all_fresh, ratio = f"never ({s['calls'] - s['ok']:,} calls failed)", math.nan
        bare_s = s.get("bare_all_s", math.nan)
        bare_ratio = s["all_fresh_s"] / bare_s if bare_s and s["ok"] == s["calls"] else math.nan
        if s.get("bare_failures"):
            bare_s = f"{bare_s:.2f} ({s['bare_failures']} failed)"
        lines.append(
            f"| {spec['store']} | {_shape(spec)} | {s['refreshes']:,}/{s['ideal_refreshes']:,} = "
            f"**{s['refresh_ratio']:.2f}** | {s['invalid_grant']} | {_errors(s['errors'])} "
            f"| {all_fresh} "
            f"| {_num(s['provider_bound_s'], 2)} | {_times(ratio)} "
            f"| {bare_s if isinstance(bare_s, str) else _num(bare_s, 2)} | {_times(bare_ratio)} "
            f"| {_num(s['cpu_ms_per_tenant'], 2)} | {_num(s.get('bare_cpu_ms_per_refresh'), 2)} "
            f"| {_times(s['cpu_ms_per_tenant'] / s.get('bare_cpu_ms_per_refresh', math.nan))} |"
        )
    lines += [
        "",
        "Provider-bound time = ⌈T / (P x 100)⌉ x L: each tenant is refreshed once, by one process, and each"
        " process keeps at most 100 requests in flight to the provider (aiohttp's default connection pool)."
        " *Bare HTTP refreshes*: the same P processes x 100 connections send one refresh per tenant straight"
        " to the simulator (no store, no manager), right after the storm: what the simulator, the HTTP stack"
        " and this machine allow. *Worker CPU per tenant*: CPU of both worker processes during the storm"
        " divided by T (each tenant's P callers included); *bare HTTP CPU per refresh*: CPU of the bare"
        " processes divided by the refreshes they made.",
        "",
    ]
    return lines


def _roundtrips(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    ops = ("hit", "miss", "refresh", "exchange")
    lines = [
        "### 3. Store round trips per operation (CountingStore around each store)",
        "",
        "| store | " + " | ".join(ops) + " | read / acquire (fresh) / acquire / commit, median µs |",
        "|---|" + "---:|" * (len(ops) + 1),
    ]
    for row in rows:
        cells = []
        for op in ops:
            counts = row["per_operation"].get(op, {})
            detail = ", ".join(f"{name} {n:g}" for name, n in counts.items())
            cells.append(f"{row['totals'][op]:g}" + (f" ({detail})" if detail else ""))
        lat = row.get("latency_us", {})
        cells.append(
            " / ".join(_num(lat.get(name)) for name in ("read", "acquire_fresh", "acquire", "commit"))
        )
        lines.append(f"| {row['store']} | " + " | ".join(cells) + " |")
    for row in rows:
        stats = row.get("redis_monitor")
        if stats:
            lines += [
                "",
                f"{row['store']}, cross-checked on the server (MONITOR of a private redis-server; commands"
                " that Lua scripts run inside the server left out):",
                "",
            ]
            for op in ops:
                commands = stats.get(op, {})
                listed = ", ".join(f"{name} {n}" for name, n in commands.items()) or "none"
                lines.append(f"- {op}: {sum(commands.values())} commands ({listed})")
    lines += [
        "",
        "hit is per call (averaged over 1,000 calls); the others are one operation each. The last column"
        " times the primitives one at a time (50 of each), to show what a round trip costs; acquire (fresh)"
        " is an acquisition unless fresh that finds the record fresh (a cold miss), acquire takes the lease.",
        "",
    ]
    return lines


_PEER_ORDER = ("authlib", "factorialhr", "handwritten", "factorial-tokens")
_CASES = {
    "storm": "every token expired at once",
    "revoke_on_first_use": "the same storm with the simulator in Factorial's documented mode"
    " (revoke on first use: concurrent refreshes with one refresh token all succeed)",
    "expiry": "tokens really expire after their short `expires_in`; one call per tenant once they have",
}


def _peer_key(run: dict[str, Any]) -> tuple[int, int, int, str]:
    spec = run["spec"]
    driver = spec["driver"]
    order = _PEER_ORDER.index(driver) if driver in _PEER_ORDER else len(_PEER_ORDER)
    return (list(_CASES).index(run.get("case", "storm")), spec["processes"], order, spec["store"])


def _peer(runs: list[dict[str, Any]], versions: dict[str, str], simulator: str) -> list[str]:
    if not runs:
        return []
    pinned = ", ".join(f"{name} {v}" for name, v in versions.items())
    lines = [
        "### 4. The peers, side by side: Authlib, factorialhr, a hand-written lock, factorial-tokens"
        " (same storms, same simulator, same run)",
        "",
        f"Versions: {pinned}. Simulator: {simulator} (strict: revoke at refresh + reuse detection).",
        "",
        "| case | PxCxT | client | storage | refresh attempts | refreshes / ideal | invalid_grant "
        "| broken tenants | failed calls | dead tokens handed out | p50 ms | p99 ms |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in sorted(runs, key=_peer_key):
        spec, s = run["spec"], run["summary"]
        case = run.get("case", "storm")
        if case == "expiry":
            case = f"expiry ({spec['token_ttl']:g} s)"
        elif case == "revoke_on_first_use":
            case = "storm, first use"
        lines.append(
            f"| {case} | {_shape(spec)} | {spec['driver']} | {run.get('storage', spec['store'])} "
            f"| {s['refresh_attempts']} | {s['refreshes']}/{s['ideal_refreshes']} | {s['invalid_grant']} "
            f"| {s['broken_tenants']} | {_errors(s['errors'])} | {s['dead_tokens_handed_out']} "
            f"| {_num(s['p50_ms'], 1)} | {_num(s['p99_ms'], 1)} |"
        )
    lines += [
        "",
        "*storm*: " + _CASES["storm"] + " (as in section 2), P processes x C callers per tenant;"
        " *storm, first use*: " + _CASES["revoke_on_first_use"] + ";"
        " *expiry*: " + _CASES["expiry"] + ". Refresh attempts: every refresh the provider received;"
        " refreshes: the successful ones (ideal: one per tenant per round). Broken tenants: grants the"
        " provider revoked (reuse detection). Failed calls: callers that got an error instead of a token,"
        " by kind. Dead tokens: distinct tokens handed to callers that the provider no longer accepts"
        " after the round. Each client as its documentation shows: Authlib, one `AsyncOAuth2Client` per"
        " tenant per process with `token_endpoint` + `leeway` and `update_token` writing to the store;"
        " factorialhr, one `RefreshTokenAuth` per tenant in one process, or one `RefreshTokenAuthFile`"
        " per tenant loaded (`from_file`) by every process; the hand-written lock, a per-process"
        " `asyncio.Lock` plus redis-py's `Lock` (TTL 10 s) with the token in Redis; factorial-tokens,"
        " one `TokenManager` per process.",
        "",
    ]
    return lines


def _windows(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        f"### 7. Two windows under steady rotation (tokens {6:g} s, leeway 2 s, min_valid 0.5 s; "
        "revoke on first use; callers call `access_token` without pause)",
        "",
        "| store | PxCxT | run | windows | calls | p50 ms | p99 ms | longest wait ms "
        "| longest loop stall ms | first call, longest ms | caller errors | refreshes | invalid_grant |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        windows = "advisory + mandatory" if r["advisory"] else "baseline: wait inside the leeway"
        run = "1.5 s 503 outage from the leeway's start" if r["outage"] else "steady"
        lines.append(
            f"| {r['store']} | {r['shape']} | {run} | {windows} | {r['calls']:,} | {_num(r['p50_ms'], 3)} "
            f"| {_num(r['p99_ms'], 2)} | {_num(r['max_ms'], 1)} | {_num(r.get('stall_max_ms'), 1)} "
            f"| {_num(r.get('first_max_ms'), 1)} "
            f"| {_errors(r['errors'])} | {r['refreshes']} "
            f"| {r['invalid_grant']} |"
        )
    lines += [
        "",
        "Targets: steady p99 ≤ 5 ms on every store; outage: 0 caller errors and a longest wait "
        "≤ 250 ms. The baseline rows are the same run with `min_valid = leeway` (no advisory "
        "window), which is how the manager behaved before. *Longest wait*: over every call "
        "but each task's first; *first call*: the longest of those (a process just started, "
        "its cache cold, hundreds of tasks asking at once), shown apart since it is no wait "
        "of a caller holding a valid token. *Longest loop stall*: how late a 10 ms timer "
        "fired in the busiest worker; a call that yields (a store read after an "
        "announcement, a wait for a refresh) cannot wait less, so it is the machine's floor.",
        "",
    ]
    return lines


def _phase(phase: dict[str, Any]) -> str:
    return (
        f"{phase['refresh_attempts']} | {phase['invalid_grant']} | {_errors(phase['errors'])} "
        f"| {phase['dead_calls']}"
    )


def _holder(cases: list[dict[str, Any]]) -> list[str]:
    if not cases:
        return []
    first = cases[0]["spec"]
    lines = [
        "### 5. A refresh holder stopped mid-refresh, past its lock's TTL (1 tenant, 2 processes x"
        f" {first['tasks']} callers; lock/lease TTL {first['ttl']:g} s, provider latency"
        f" {first['latency'] * 1000:.0f} ms)",
        "",
        "| holder | client | refreshes | broken tenants "
        "| during: refresh attempts | invalid_grant | failed calls | calls handed a dead token "
        "| afterwards: refresh attempts | invalid_grant | failed calls | calls handed a dead token "
        "| what it stores at the end |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    what = {
        "pause": "SIGSTOP, SIGCONT after {s:.1f} s",
        "kill": "SIGKILL (answer lost)",
    }
    for case in cases:
        spec = case["spec"]
        lines.append(
            f"| {what[spec['signal']].format(s=case['paused_s'])} | {spec['driver']} | {case['refreshes']} "
            f"| {case['broken_tenants']} | {_phase(case['during'])} | {_phase(case['after'])} "
            f"| {case['stored']} |"
        )
    lines += [
        "",
        "The holder's refresh reaches the simulator; the parent stops the holder at once (SIGSTOP), lets the"
        " simulator rotate the refresh token and answer, and (*kill*) SIGKILLs it; twice the TTL after the"
        " stop the other process's callers start (*during*), then the holder is continued (*pause*) and its"
        " callers finish; *afterwards*, every surviving process's callers ask once more, as the next"
        " requests would. Calls handed a dead token count calls (not distinct tokens).",
        "",
    ]
    return lines


def _budget(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "### 8. Shared refresh budget (due tenants against a rate-limited simulator)",
        "",
        "| store | tenants | simulator limit | refresh_rate /min | 429s drawn | refreshes | invalid_grant "
        "| caller errors | all fresh (s) |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        rate = _num(r["refresh_rate"]) if r["refresh_rate"] else "none (baseline)"
        lines.append(
            f"| {r['store']} | {r['tenants']:,} | {r['limit']} | {rate} | {r['rate_limited']} "
            f"| {r['refreshes']} | {r['invalid_grant']} | {_errors(r['errors'])} | {_num(r['seconds'], 1)} |"
        )
    lines += [
        "",
        "Time is scaled ten times: the simulator allows 200 token requests per 6 s (the documented "
        "200 a minute), the budget is 90 % of that (1,800 a minute here, 180 a minute in real time), "
        "with a burst of 3.",
        "",
    ]
    return lines


def _exchange(cases: list[dict[str, Any]]) -> list[str]:
    if not cases:
        return []
    lines = [
        f"### 6. One callback delivered {cases[0]['deliveries']} times at once (a retried callback)",
        "",
        "| client | exchange attempts | exchanges | invalid_grant | broken tenants | callers with tokens "
        "| failed calls | live tokens afterwards |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        lines.append(
            f"| {case['driver']} | {case['exchange_attempts']} | {case['exchanges']} "
            f"| {case['invalid_grant']} | {case['broken_tenants']} | {case['callers_with_tokens']} "
            f"| {_errors(case['errors'])} "
            f"| {case['live_tokens_after']} |"
        )
    lines += [
        "",
        "Authlib: one `fetch_token(code=...)` per delivery; factorial-tokens: one `exchange_code` per"
        " delivery. The simulator's codes are single-use and a reused code revokes the grant it made"
        " (reuse detection). factorialhr has no code exchange and the hand-written pattern guards"
        " refreshes only: neither is driven here.",
        "",
    ]
    return lines


def render(results: dict[str, Any], block: str | None = None) -> str:
    """The run's markdown: machine, command, then one table per benchmark (of one of
    ``BLOCKS`` only, when ``block`` is given)."""
    m = results["machine"]
    load = ", ".join(f"{x:.2f}" for x in m["loadavg_start"])
    load_end = ", ".join(f"{x:.2f}" for x in m.get("loadavg_end", []))
    lines = [
        f"Run {results['started']} UTC with `{results['command']}` ({results['duration_s']:.0f} s).",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['python']}, {m['platform']}; Redis replies parsed"
        f" by {m.get('redis_parser', 'redis-py')}; load average"
        f" {load} at start, {load_end} at end. {m['note']}".rstrip(),
        "",
    ]
    if block in (None, "results"):
        if results.get("hotpath"):
            lines += _hotpath(results["hotpath"])
        lines += _storms(results.get("storms", []))
        lines += _bulk(results.get("bulk", []))
        lines += _roundtrips(results.get("roundtrips", []))
    if block in (None, "peers"):
        peer_versions, simulator = results.get("peer_versions", {}), results.get("peer_simulator", "-")
        lines += _peer(results.get("peer", []), peer_versions, simulator)
        lines += _holder(results.get("holder", []))
        lines += _exchange(results.get("exchange", []))
    if block in (None, "results"):
        lines += _windows(results.get("windows", []))
        lines += _budget(results.get("budget", []))
    if results.get("skipped"):
        lines += ["Skipped: " + "; ".join(results["skipped"]), ""]
    if results.get("failed"):
        lines += ["**Failed:** " + "; ".join(results["failed"]), ""]
    return "\n".join(lines)


def update_readme(path: Path, markdown: str, block: str = "results") -> None:
    """Replace one recorded block of ``path`` (between its markers) with ``markdown``."""
    text = path.read_text(encoding="utf-8")
    start_marker, end_marker = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    start, end = text.index(start_marker) + len(start_marker), text.index(end_marker)
    path.write_text(text[:start] + "\n" + markdown.rstrip() + "\n" + text[end:], encoding="utf-8")

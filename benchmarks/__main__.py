"""Run the benchmarks: ``python -m benchmarks [--quick] [--bench ...] [--stores ...]``.

Prints markdown tables and writes ``benchmarks/results/latest.json``;
``--record`` also rewrites the results section of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from . import drivers, exchange, holder, hotpath, report, roundtrips, storm, windows
from .common import port80_host
from .stores import MULTIPROCESS, STORES, installed

HERE = Path(__file__).resolve().parent
T = TypeVar("T")
BENCHES = ("hotpath", "storm", "bulk", "roundtrips", "peer", "windows", "budget")
#: ``--only`` names: a section of the run, or one benchmark
SECTIONS = {"peers": ["peer"], **{name: [name] for name in BENCHES}}
#: The expiry case: tokens whose ``expires_in`` is this short, asked for once they expired.
EXPIRY_TTL = 3.0
#: The holder case: lock/lease TTL and provider latency (the stop must land mid-request).
HOLDER_TTL = 1.0
HOLDER_LATENCY = 0.2
#: The exchange case: how many times one callback is delivered at once.
DELIVERIES = 2


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a minute or so")
    parser.add_argument(
        "--bench", type=_csv, default=list(BENCHES), help=f"comma list of {', '.join(BENCHES)}"
    )
    parser.add_argument(
        "--only",
        type=_csv,
        help=f"run only these sections (overrides --bench): {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--stores", type=_csv, default=list(STORES), help=f"comma list of {', '.join(STORES)}"
    )
    parser.add_argument("--processes", type=int, help="storm: worker processes P (default 2; quick 2)")
    parser.add_argument(
        "--tasks", type=int, help="storm: tasks per tenant per process C (default 25; quick 5)"
    )
    parser.add_argument(
        "--tenants",
        type=lambda v: [int(x) for x in _csv(v)],
        help="storm: tenants T, a comma list runs one storm per value (default 1,20; quick 1,5)",
    )
    parser.add_argument("--rounds", type=int, help="storm: rounds (default 5; quick 2)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="provider latency L (default 50)")
    parser.add_argument("--bulk-tenants", type=int, help="bulk: tenants (default 10000; quick 300)")
    parser.add_argument("--bulk-stores", type=_csv, default=["redis", "postgres"], help="bulk: stores")
    parser.add_argument("--hot-rounds", type=int, help="hot path: rounds (default 30; quick 6)")
    parser.add_argument("--hot-calls", type=int, help="hot path: calls per round (default 20000; quick 5000)")
    parser.add_argument("--budget-tenants", type=int, help="budget: due tenants (default 1000; quick 100)")
    parser.add_argument("--note", default="", help="a note on the machine's load, recorded with the results")
    parser.add_argument(
        "--json", type=Path, default=HERE / "results" / "latest.json", help="where to write JSON"
    )
    parser.add_argument(
        "--record", action="store_true", help="also write the tables into benchmarks/README.md"
    )
    return parser


def _size(value: int | None, full: int, quick: int, is_quick: bool) -> int:
    if value is not None:
        return value
    return quick if is_quick else full


def _peers(
    stores: list[str],
    processes: int,
    tasks: int,
    tenants: int,
    rounds: int,
    latency: float,
    results: dict[str, Any],
    attempt: Callable[[str, Callable[[], Any]], Any],
) -> None:
    """Every client through the same storms on the same simulator, then the holder case."""
    host, why = port80_host()
    sim_host, sim_port = (host, 80) if host is not None else ("127.0.0.1", 0)
    results["peer_versions"] = drivers.versions()
    results["peer_simulator"] = f"http://{sim_host}:{sim_port}"
    runnable = list(drivers.DRIVERS)
    if host is None:
        runnable.remove(drivers.FACTORIALHR)
        results["skipped"].append(
            f"factorialhr: {why}; it posts its refresh to scheme://host/oauth/token, dropping the port,"
            " so the simulator must listen on port 80"
        )
    redis_ok = "redis" in stores
    if not redis_ok:
        runnable.remove(drivers.HANDWRITTEN)
        results["skipped"].append("the hand-written lock and the holder case (they need --stores redis)")

    def one(
        case: str,
        store: str,
        procs: int,
        driver: str,
        *,
        calls: int = tasks,
        repeat: int = rounds,
        token_ttl: float | None = None,
        mode: str = "revoke_at_refresh",
    ) -> None:
        spec = storm.StormSpec(
            store, procs, calls, tenants, latency, repeat, driver, baseline=False,
            sim_host=sim_host, sim_port=sim_port, token_ttl=token_ttl, refresh_mode=mode,
        )  # fmt: skip
        label = f"peer {case} ({driver}): {store}, {procs} process(es)"
        ran = attempt(label, functools.partial(storm.run, spec))
        if ran is not None:
            results["peer"].append(ran.to_json() | {"case": case, "storage": drivers.storage(driver, store)})

    shared = [name for name in stores if name in MULTIPROCESS]
    if "memory" in stores:
        for driver in runnable:
            one("storm", "memory", 1, driver)
    for driver in runnable:
        if driver in (drivers.AUTHLIB, drivers.FACTORIAL):
            for name in shared:
                one("storm", name, processes, driver)
        elif shared:  # factorialhr and the hand-written pattern keep their own storage
            one("storm", "redis" if driver == drivers.HANDWRITTEN else shared[0], processes, driver)
    first_use = "revoke_on_first_use"  # Factorial's documented mode: concurrent refreshes all succeed
    for driver in runnable:
        if "memory" in stores:
            one(first_use, "memory", 1, driver, mode=first_use)
        if shared:
            own = "redis" if driver == drivers.HANDWRITTEN else shared[0]
            one(first_use, own, processes, driver, mode=first_use)
    for driver in runnable:
        one("expiry", "memory", 1, driver, calls=1, repeat=1, token_ttl=EXPIRY_TTL)
    for driver in exchange.EXCHANGE_DRIVERS:
        work = functools.partial(exchange.run, driver, DELIVERIES, sim_host, sim_port)
        done = attempt(f"exchange ({driver})", work)
        if done is not None:
            results["exchange"].append(done.to_json())
    if redis_ok:
        for driver in (drivers.HANDWRITTEN, drivers.FACTORIAL):
            for sig in holder.SIGNALS:
                case = holder.HolderSpec(driver, sig, tasks, HOLDER_TTL, HOLDER_LATENCY, sim_host, sim_port)
                ran = attempt(f"holder {sig} ({driver})", functools.partial(holder.run, case))
                if ran is not None:
                    results["holder"].append(ran.to_json())


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; return the exit status."""
    args = parser().parse_args(argv)
    if args.only:
        unknown_sections = [name for name in args.only if name not in SECTIONS]
        if unknown_sections:
            print(f"unknown section: {', '.join(unknown_sections)}", file=sys.stderr)
            return 2
        args.bench = [bench for name in args.only for bench in SECTIONS[name]]
    unknown = [b for b in args.bench if b not in BENCHES] + [s for s in args.stores if s not in STORES]
    if unknown:
        print(f"unknown benchmark or store: {', '.join(unknown)}", file=sys.stderr)
        return 2
    q = args.quick
    processes = _size(args.processes, 2, 2, q)
    tasks = _size(args.tasks, 25, 5, q)
    tenant_counts: list[int] = args.tenants or ([1, 5] if q else [1, 20])
    rounds = _size(args.rounds, 5, 2, q)
    latency = args.latency_ms / 1000
    command = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.time()
    results: dict[str, Any] = {
        "command": command,
        "started": datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": report.machine(args.note),
        "storms": [],
        "bulk": [],
        "roundtrips": [],
        "peer": [],
        "windows": [],
        "budget": [],
        "holder": [],
        "exchange": [],
        "skipped": [],
        "failed": [],
    }
    stores = []
    for name in args.stores:
        if installed(name):
            stores.append(name)
        else:
            results["skipped"].append(f"{name} (its store is not installed)")

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def attempt(label: str, work: Callable[[], T]) -> T | None:
        """Run one benchmark; a failure is logged and recorded, and the run goes on."""
        log(label)
        try:
            return work()
        except Exception as exc:
            log(f"{label} FAILED:\n{traceback.format_exc()}")
            results["failed"].append(f"{label}: {type(exc).__name__}: {exc}")
            return None

    if "hotpath" in args.bench:
        hot_rounds, hot_calls = _size(args.hot_rounds, 30, 6, q), _size(args.hot_calls, 20_000, 5_000, q)
        hot = attempt("hot path", lambda: hotpath.run(hot_rounds, hot_calls))
        if hot is not None:
            results["hotpath"] = hotpath.to_json(hot)
            if hot.profile:
                log("hot path missed its target; profile:\n" + hot.profile)
    if "roundtrips" in args.bench:
        for name in stores:
            counted = attempt(f"round trips: {name}", functools.partial(roundtrips.run, name))
            if counted is not None:
                results["roundtrips"].append(counted.to_json())

    def spec(name: str, driver: str, tenants: int) -> storm.StormSpec:
        procs = 1 if name not in MULTIPROCESS else processes
        return storm.StormSpec(
            name, procs, tasks, tenants, latency, rounds, driver, driver == drivers.FACTORIAL
        )

    factorial_runs: dict[tuple[str, int], storm.StormResult] = {}
    if "storm" in args.bench:
        for name in stores:
            for count in tenant_counts:
                ran = attempt(
                    f"storm: {name}, T={count}",
                    functools.partial(storm.run, spec(name, drivers.FACTORIAL, count)),
                )
                if ran is not None:
                    factorial_runs[name, count] = ran
                    results["storms"].append(ran.to_json())
    if "peer" in args.bench:
        _peers(stores, processes, tasks, max(tenant_counts), rounds, latency, results, attempt)
    if "bulk" in args.bench:
        bulk_tenants = _size(args.bulk_tenants, 10_000, 300, q)
        for name in args.bulk_stores:
            if name not in stores:
                continue
            bulk = storm.StormSpec(
                name, processes if name in MULTIPROCESS else 1, 1, bulk_tenants, latency, 1
            )
            ran = attempt(f"bulk: {name}, {bulk_tenants} tenants", functools.partial(storm.run, bulk))
            if ran is not None:
                results["bulk"].append(ran.to_json())

    if "windows" in args.bench:
        w_tasks = _size(args.tasks, 25, 5, q)
        w_tenants = max(tenant_counts)
        w_procs = _size(args.processes, 4, 2, q)
        for name in stores:
            if name not in MULTIPROCESS:
                continue
            rows = attempt(
                f"windows (rotation): {name}",
                functools.partial(
                    windows.rotation, name, w_procs, w_tasks, w_tenants, latency, 8.0 if q else 15.0
                ),
            )
            results["windows"] += rows or []
            rows = attempt(
                f"windows (outage): {name}",
                functools.partial(windows.outage, name, w_procs, w_tasks, w_tenants, latency),
            )
            results["windows"] += rows or []
    if "budget" in args.bench:
        b_tenants = _size(args.budget_tenants, 1000, 100, q)
        name = "redis" if "redis" in stores else stores[-1]
        for budgeted in (True, False):
            # The simulator's 200-a-minute limit, with time scaled ten times: 200 per 6 s.
            row = attempt(
                f"budget: {name}, {b_tenants} tenants, budget {budgeted}",
                functools.partial(windows.budget, name, processes, b_tenants, 200, 6.0, budgeted),
            )
            if row is not None:
                results["budget"].append(row)

    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["duration_s"] = time.time() - started
    markdown = report.render(results)
    print(markdown)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    log(f"wrote {args.json}")
    if args.record:
        # The peers have their own block, so a peers-only run leaves the other results as recorded.
        wanted = {"peers": "peer" in args.bench, "results": any(b != "peer" for b in args.bench)}
        for block in report.BLOCKS:
            if wanted[block]:
                report.update_readme(HERE / "README.md", report.render(results, block), block)
                log(f"updated the {block} block of benchmarks/README.md")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

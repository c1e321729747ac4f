"""The multi-process harness: P real worker processes x C tasks on one store URL.

A store is one parameter: the harness only ever passes its URL to the workers, so adding
a store is one entry in ``tests/stores``. FakeFactorial runs in the test process; the
workers (``python -m tests.multiproc_worker``, fresh interpreters: no inherited event
loop) reach it over loopback. Use::

    scenario = Scenario(kind="traffic", tenants=["a"], tasks=50, duration=6, api=True)
    async with WorkerPool(url, sim, scenario, processes=4) as pool:
        ...                       # every worker is READY: its TokenManager is open
        pool.go(initial={...})    # the go signal, the same instant for all
        reports = await pool.results()

Each :class:`Report` says what one worker's callers saw (``least``: the least time a
token had left when a caller got it, per tenant). ``pool.kill(pid)`` SIGKILLs a
worker; a worker killed (by the parent or by its own kill switch) reports ``killed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

from factorial_tokens.testing import FakeFactorial

from .conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["Report", "Scenario", "WorkerPool", "all_tokens", "least_valid", "total_api", "total_errors"]


@attrs.frozen(kw_only=True)
class Scenario:
    """What every worker does after the go signal.

    ``kind``: ``"exchange"`` (each task exchanges the code from the go signal once) or
    ``"traffic"`` (each task calls ``access_token`` and, with ``api``, the simulator's API
    through ``client()``, pausing about ``pace`` seconds, for ``duration`` seconds, or until
    it sees a token other than ``initial[tenant]`` or a ReauthorizationRequired when
    ``until_changed``). Task ``i`` works on ``tenants[i % len(tenants)]``.
    ``manager``: TokenManager keyword arguments (time budgets, leeway).
    ``kill_at``: the worker-side kill switch (see ``tests/multiproc_worker.py``).
    ``telemetry``: each worker reads its own metrics (OpenTelemetry SDK, in memory) and
    reports them in ``Report.metrics``.
    """

    kind: str
    tenants: list[str]
    tasks: int = 50
    duration: float = 5.0
    pace: float = 0.5
    api: bool = False
    until_changed: bool = False
    manager: dict[str, Any] = attrs.field(factory=dict)
    kill_at: str | None = None
    telemetry: bool = False


@attrs.frozen(kw_only=True)
class Report:
    """What one worker process saw (``killed``: it died by SIGKILL and reported nothing)."""

    pid: int
    returncode: int | None
    killed: bool
    tokens: dict[str, list[str]] = attrs.field(factory=dict)
    errors: dict[str, int] = attrs.field(factory=dict)
    api: dict[int, int] = attrs.field(factory=dict)
    calls: int = 0
    finished: list[float] = attrs.field(factory=list)
    least: dict[str, float] = attrs.field(factory=dict)
    stderr: str = ""
    metrics: dict[str, int] = attrs.field(factory=dict)


class WorkerPool:
    """P worker processes running one :class:`Scenario` against ``store_url`` and ``sim``.

    Entering starts them and returns once all are READY (their managers open), raising
    RuntimeError with the workers' stderr if one fails to start. Leaving kills any worker
    still running.
    """

    def __init__(
        self,
        store_url: str,
        sim: FakeFactorial,
        scenario: Scenario,
        *,
        processes: int = 4,
        marker: Path | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.store_url = store_url
        self.sim = sim
        self.scenario = scenario
        self.processes = processes
        self.marker = marker
        self.startup_timeout = startup_timeout
        self.workers: list[asyncio.subprocess.Process] = []
        self._stderr: list[Path] = []

    def _config(self) -> str:
        s = self.scenario
        if s.kill_at and self.marker is None:
            raise ValueError("a kill switch needs a marker path")
        return json.dumps(
            {
                "store_url": self.store_url,
                "base_url": self.sim.base_url,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "redirect_uri": REDIRECT_URI,
                "scenario": s.kind,
                "tenants": s.tenants,
                "tasks": s.tasks,
                "duration": s.duration,
                "pace": s.pace,
                "api": s.api,
                "until_changed": s.until_changed,
                "manager": s.manager,
                "kill_at": s.kill_at,
                "telemetry": s.telemetry,
                "marker": str(self.marker) if self.marker else None,
            }
        )

    async def __aenter__(self) -> WorkerPool:
        config = self._config()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        try:
            for i in range(self.processes):
                fd, name = tempfile.mkstemp(prefix=f"ft-worker-{i}-", suffix=".err")
                os.close(fd)
                err = Path(name)
                self._stderr.append(err)
                with err.open("wb") as stderr:
                    self.workers.append(
                        await asyncio.create_subprocess_exec(
                            sys.executable,
                            "-m",
                            "tests.multiproc_worker",
                            config,
                            cwd=ROOT,
                            env=env,
                            stdin=asyncio.subprocess.PIPE,
                            stdout=asyncio.subprocess.PIPE,
                            stderr=stderr,
                        )
                    )
            async with asyncio.timeout(self.startup_timeout):
                for worker in self.workers:
                    assert worker.stdout is not None
                    line = await worker.stdout.readline()
                    if line.strip() != b"READY":
                        raise RuntimeError(
                            f"a worker failed to start:\n{self._stderr_of(self.workers.index(worker))}"
                        )
        except BaseException:
            await self._kill_all()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._kill_all()
        for err in self._stderr:
            err.unlink(missing_ok=True)

    async def _kill_all(self) -> None:
        for worker in self.workers:
            if worker.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.kill()
                await worker.wait()

    def _stderr_of(self, index: int) -> str:
        try:
            return self._stderr[index].read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    @property
    def pids(self) -> list[int]:
        """The workers' process ids."""
        return [worker.pid for worker in self.workers]

    def go(self, **params: Any) -> None:
        """Send the go signal (with ``params``, e.g. ``code=`` or ``initial=``) to every worker."""
        line = (json.dumps(params) + "\n").encode()
        for worker in self.workers:
            assert worker.stdin is not None
            with contextlib.suppress(ConnectionError):
                worker.stdin.write(line)

    def kill(self, pid: int) -> None:
        """SIGKILL one worker."""
        if pid not in self.pids:
            raise ValueError(f"{pid} is not one of this pool's workers")
        os.kill(pid, signal.SIGKILL)

    async def results(self, timeout: float = 60.0) -> list[Report]:
        """Wait for every worker to finish; their reports, in start order.

        Raises AssertionError (with stderr) if a worker that was not SIGKILLed failed.
        """
        async with asyncio.timeout(timeout):
            outputs = [await worker.communicate() for worker in self.workers]
        reports = []
        for i, (worker, (out, _)) in enumerate(zip(self.workers, outputs, strict=True)):
            killed = worker.returncode == -signal.SIGKILL
            result = next((ln for ln in out.decode().splitlines() if ln.startswith("RESULT ")), None)
            if result is None:
                assert killed, f"worker {worker.pid} exited {worker.returncode}:\n{self._stderr_of(i)}"
                reports.append(Report(pid=worker.pid, returncode=worker.returncode, killed=True))
                continue
            data = json.loads(result.removeprefix("RESULT "))
            reports.append(
                Report(
                    pid=worker.pid,
                    returncode=worker.returncode,
                    killed=killed,
                    tokens=data["tokens"],
                    errors=data["errors"],
                    api={int(k): v for k, v in data["api"].items()},
                    calls=data["calls"],
                    finished=data["finished"],
                    least=data["least"],
                    stderr=self._stderr_of(i),
                    metrics=data.get("metrics", {}),
                )
            )
        return reports


def all_tokens(reports: list[Report], tenant: str) -> set[str]:
    """Every access-token fingerprint any worker's callers got for ``tenant``."""
    return {fp for report in reports for fp in report.tokens.get(tenant, [])}


def least_valid(reports: list[Report]) -> float:
    """The least time (seconds) a token had left when any caller of any worker got it."""
    return min((left for report in reports for left in report.least.values()), default=float("inf"))


def total_errors(reports: list[Report]) -> Counter[str]:
    """Errors (by class name) callers got, summed over workers."""
    return sum((Counter(report.errors) for report in reports), Counter())


def total_api(reports: list[Report]) -> Counter[int]:
    """API statuses callers got through ``client()``, summed over workers."""
    return sum((Counter(report.api) for report in reports), Counter())

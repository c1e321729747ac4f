"""``factorial-tokens status --watch``: a live table of the tenants, for someone at a terminal.

Every ``interval`` seconds the tenants are listed from the store (metadata only, no
tokens) and the table is redrawn: status, expires in, last refresh, refreshes per minute
(version changes over the last minute of samples: every refresh writes one) and failures
(tenants seen turning to ``needs_reauth`` since the watch started: the store does not
record failed attempts; the metrics in docs/observability.md do).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from .._manager import TokenManager
    from .._models import TenantInfo

__all__: list[str] = []

#: How far back refreshes per minute look.
WINDOW = 60.0


@attrs.frozen
class Row:
    """One tenant's line of the table."""

    tenant: str
    status: str
    expires_at: float | None
    refreshed_at: float
    per_minute: float | None
    failures: int


class Tracker:
    """What the watch remembers between listings: versions over the last minute, failures."""

    def __init__(self) -> None:
        self._versions: dict[str, deque[tuple[float, int]]] = {}
        self._status: dict[str, str] = {}
        self.failures: Counter[str] = Counter()

    def update(self, infos: Sequence[TenantInfo], now: float) -> list[Row]:
        """Take a listing made at ``now``; return the table's rows."""
        rows = []
        for info in infos:
            samples = self._versions.setdefault(info.tenant, deque())
            samples.append((now, info.version))
            while len(samples) > 2 and now - samples[1][0] >= WINDOW:
                samples.popleft()
            status = info.status.value
            if status == "needs_reauth" and self._status.get(info.tenant, status) != status:
                self.failures[info.tenant] += 1
            self._status[info.tenant] = status
            first_at, first_version = samples[0]
            span = now - first_at
            per_minute = (info.version - first_version) * 60.0 / span if span > 0 else None
            rows.append(
                Row(
                    info.tenant,
                    status,
                    info.expires_at,
                    info.refreshed_at,
                    per_minute,
                    self.failures[info.tenant],
                )
            )
        return rows


def table(rows: Sequence[Row], now: float, when: Callable[[float | None, float], str]) -> Table:
    """The rich table of ``rows``."""
    from rich.markup import escape
    from rich.table import Table

    out = Table(title=f"factorial-tokens: {len(rows)} tenants", caption=time.strftime("%H:%M:%S"))
    for column in ("tenant", "status", "expires", "last refresh", "refreshes/min", "failures"):
        out.add_column(column, justify="right" if column in ("refreshes/min", "failures") else "left")
    for row in rows:
        out.add_row(
            escape(row.tenant),
            "[red]needs re-authorization[/red]" if row.status == "needs_reauth" else row.status,
            when(row.expires_at, now),
            when(row.refreshed_at, now),
            "-" if row.per_minute is None else f"{row.per_minute:.1f}",
            f"[red]{row.failures}[/red]" if row.failures else "0",
        )
    return out


async def watch(
    tm: TokenManager,
    console: Console,
    *,
    interval: float,
    count: int,
    when: Callable[[float | None, float], str],
) -> int:
    """Redraw the table every ``interval`` seconds, ``count`` times (0: until cancelled);
    returns how many times it was drawn."""
    from rich.live import Live

    tracker = Tracker()
    drawn = 0
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            infos = await tm.tenants()
            now = time.time()
            live.update(table(tracker.update(infos, now), now, when), refresh=True)
            drawn += 1
            if count and drawn >= count:
                return drawn
            await asyncio.sleep(interval)

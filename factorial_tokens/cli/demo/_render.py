"""The demo on a terminal: live progress while it runs, the result table and the verdict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._config import DemoConfig, DemoResult

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = ["Live", "render"]


class Live:
    """Live progress on a terminal; a few plain lines elsewhere."""

    def __init__(self, console: Console, config: DemoConfig) -> None:
        self.console = console
        self.config = config
        self._live: Any = None
        self._progress: Any = None
        self._task: Any = None

    def say(self, text: str) -> None:
        if self._live is None:
            self.console.print(text, highlight=False)

    def start(self) -> None:
        if not self.console.is_terminal:
            return
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]running"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._task = self._progress.add_task("run", total=self.config.duration)
        self._live = Live(console=self.console, refresh_per_second=8, transient=True)
        self._live.start()

    def update(self, elapsed: float, line: dict[str, int]) -> None:
        if self._live is None:
            return
        from rich.console import Group
        from rich.table import Table

        self._progress.update(self._task, completed=min(elapsed, self.config.duration))
        table = Table.grid(padding=(0, 2))
        for _ in line:
            table.add_column(justify="right")
        table.add_row(*(f"[dim]{name}[/dim]" for name in line))
        table.add_row(*(f"{value:,}" for value in line.values()))
        renderable: RenderableType = Group(self._progress, table)
        self._live.update(renderable)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def render(result: DemoResult, console: Console) -> None:
    """Print the result table and the verdict."""
    from rich.table import Table

    v = result.values
    table = Table(title="factorial-tokens demo", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("ideal", justify="right")
    table.add_column("", justify="center")

    def row(name: str, value: object, ideal: object = "", held: bool | None = None) -> None:
        mark = "" if held is None else ("[green]ok[/green]" if held else "[red]BROKEN[/red]")
        table.add_row(name, f"{value:,}" if isinstance(value, int) else str(value), str(ideal), mark)

    t = v["tenants"]
    row("companies connected", t - v["tenants_needing_reauth"], t, v["tenants_needing_reauth"] == 0)
    row("callbacks (each sent twice)", v["callbacks_ok"], v["callbacks"], v["callbacks_ok"] == v["callbacks"])
    row("exchanges", v["exchanges"], t, v["exchanges"] == t == v["exchange_attempts"])
    row("API calls by callers", v["api_calls"])
    row("API 401 answered (retried in client)", v["api_401_answered"])
    row("API 401 seen by callers", v["api_401_seen_by_callers"], 0, v["api_401_seen_by_callers"] == 0)
    row("token generations (distinct)", v["generations"])
    ideal = v["ideal_refreshes"]
    row("refresh requests", v["refresh_attempts"], ideal, v["refresh_attempts"] == ideal)
    row("refreshes", v["refreshes"], ideal, v["refreshes"] == ideal)
    row("  expected from time (approx.)", f"~{v['expected_refreshes_from_time']}")
    row("invalid_grant", v["invalid_grant"], 0, v["invalid_grant"] == 0)
    row("families revoked", v["families_revoked"], 0, v["families_revoked"] == 0)
    row("re-authorizations needed", v["tenants_needing_reauth"], 0, v["tenants_needing_reauth"] == 0)
    errors = sum(v["caller_errors"].values()) + v["api_other_status"]
    row("caller errors", errors, 0, errors == 0)
    row("workers crashed", v["workers_crashed"], 0, v["workers_crashed"] == 0)
    row("access_token p50 / p99", f"{v['access_token_p50_ms']:.3f} / {v['access_token_p99_ms']:.1f} ms")
    row("API call p50 / p99", f"{v['api_p50_ms']:.1f} / {v['api_p99_ms']:.1f} ms")
    console.print(table)
    console.print(
        f"{v['tenants']} companies, {v['workers']} processes x {v['tasks']} tasks, {v['duration']:g} s, "
        f"tokens live {v['token_ttl']:g} s (refresh {v['leeway']:g} s early); store {v['store']}",
        highlight=False,
    )
    if result.ok:
        console.print("[green]All guarantees held.[/green]")
    else:
        console.print("[red]Guarantees broken:[/red] " + "; ".join(result.broken))
        if v["caller_errors"]:
            console.print(f"caller errors: {v['caller_errors']}", highlight=False)
        for index, reason in v["worker_crashes"].items():
            console.print(f"worker {index}: {reason}", highlight=False)

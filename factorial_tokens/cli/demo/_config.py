"""The demo's knobs (:class:`DemoConfig`) and what it measured (:class:`DemoResult`)."""

from __future__ import annotations

from typing import Any

import attrs

from ..._errors import ConfigurationError

__all__ = ["DemoConfig", "DemoResult", "tenant_names"]

_NAMES = (
    "acme",
    "globex",
    "initech",
    "umbrella",
    "hooli",
    "stark",
    "wayne",
    "tyrell",
    "cyberdyne",
    "soylent",
)


@attrs.frozen
class DemoConfig:
    """The demo's knobs. ``store`` None means an SQLite file in a temporary folder."""

    tenants: int = 5
    workers: int = 4
    tasks: int = 25
    duration: float = 15.0
    token_ttl: float = 3.0
    leeway: float = 1.0
    think: float = 0.05
    store: str | None = None

    def check(self) -> None:
        """Raise ConfigurationError for values the demo cannot run with."""
        if self.tenants < 1 or self.workers < 1 or self.tasks < 1:
            raise ConfigurationError("the demo needs at least one tenant, one worker and one task")
        if not self.duration > 0:
            raise ConfigurationError("the demo's duration must be positive")
        if self.token_ttl < 1:
            raise ConfigurationError("the access token lifetime must be at least 1 second")
        if self.leeway < 0 or self.think < 0:
            raise ConfigurationError("leeway and think time must not be negative")

    @property
    def refresh_interval(self) -> float:
        """How long a token is used before it is due (``TokenSet.refresh_due_at``)."""
        return self.token_ttl - min(self.leeway, self.token_ttl / 2)


@attrs.frozen
class DemoResult:
    """What the demo measured; ``broken`` names every guarantee that did not hold."""

    values: dict[str, Any]
    broken: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when every guarantee held."""
        return not self.broken


def tenant_names(count: int) -> list[str]:
    """``count`` readable tenant ids."""
    return [_NAMES[i] if i < len(_NAMES) else f"company-{i + 1}" for i in range(count)]

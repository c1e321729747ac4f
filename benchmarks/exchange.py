"""One authorization callback delivered several times at once (a retried callback).

The strict simulator (single-use codes, reuse detection) counts exchange attempts,
``invalid_grant`` and revoked grants. Authlib: one ``AsyncOAuth2Client.fetch_token(code=...)``
per delivery; factorial-tokens: one ``tm.exchange_code(tenant, code)`` per delivery, one
manager. factorialhr has no code exchange (it starts from tokens obtained elsewhere), and the
hand-written lock pattern guards refreshes only, so neither is driven here.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from factorial_tokens import TokenManager
from factorial_tokens.store import MemoryStore

from . import drivers
from .common import app_for, new_client_id, strict_sim

EXCHANGE_DRIVERS = (drivers.AUTHLIB, drivers.FACTORIAL)


@dataclass
class ExchangeResult:
    """What one duplicated callback cost."""

    driver: str
    deliveries: int
    exchange_attempts: int
    exchanges: int
    invalid_grant: int
    broken_tenants: int
    callers_with_tokens: int
    errors: dict[str, int]
    live_tokens_after: int

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return asdict(self)


async def _deliver(driver: str, base_url: str, client_id: str, code: str, deliveries: int) -> list[Any]:
    app = app_for(client_id, base_url)
    if driver == drivers.AUTHLIB:
        from .peer_authlib import authlib_exchanges

        return await authlib_exchanges(app, code, deliveries)
    async with TokenManager(app, MemoryStore()) as tm:
        got = await asyncio.gather(
            *(tm.exchange_code("acme", code) for _ in range(deliveries)), return_exceptions=True
        )
    return [g if isinstance(g, BaseException) else g.access_token for g in got]


def run(driver: str, deliveries: int, sim_host: str = "127.0.0.1", sim_port: int = 0) -> ExchangeResult:
    """Deliver one fresh code ``deliveries`` times at once through ``driver``."""
    client_id = new_client_id()
    with strict_sim(client_id, sim_host, sim_port) as sim:
        code = sim.issue_code(company_id=1)
        sim.reset_stats()
        got = asyncio.run(_deliver(driver, sim.base_url, client_id, code, deliveries))
        tokens = {g for g in got if isinstance(g, str)}
        errors = Counter(drivers.error_name(driver, g) for g in got if isinstance(g, BaseException))
        stats = sim.stats
        return ExchangeResult(
            driver=driver,
            deliveries=deliveries,
            exchange_attempts=stats.exchange_attempts,
            exchanges=stats.exchanges,
            invalid_grant=stats.invalid_grant,
            broken_tenants=stats.families_revoked,
            callers_with_tokens=sum(1 for g in got if isinstance(g, str)),
            errors=dict(errors),
            live_tokens_after=sum(1 for t in tokens if sim.is_active(t)),
        )

"""The simulator's counters: :class:`Counters` (mutable, under the simulator's lock) and
the consistent snapshot tests read, :class:`SimulatorStats`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["Counters", "SimulatorStats"]


def _freeze(mapping: Mapping[Any, int]) -> Mapping[Any, int]:
    return dict(mapping)


@attrs.frozen(kw_only=True)
class SimulatorStats:
    """A consistent snapshot of the simulator's counters (see ``FakeFactorial.stats``).

    Request counters count every request received, faults included:
    ``authorize_requests``, ``token_requests``, ``revoke_requests``, ``api_calls``.
    Outcome counters count only what was processed:

    - ``exchanges``: successful code exchanges; ``exchanges_by_code`` and
      ``exchanges_by_company`` split them; ``exchange_attempts`` /
      ``exchange_attempts_by_code`` count every exchange that reached grant validation
      (client authenticated, parameters present), successful or not, so
      ``max_attempts_per_code == 1`` proves that no code was ever sent twice;
    - ``refreshes``: successful refreshes (``refreshes_by_company``);
      ``refresh_attempts`` / ``refresh_attempts_by_token`` likewise count attempts;
    - ``invalid_grant`` and ``invalid_grant_by_cause`` (keys from
      ``INVALID_GRANT_CAUSES``; only non-zero causes appear);
    - ``invalid_client``, ``invalid_request``, ``unsupported_grant_type``;
    - ``families_revoked`` and ``families_revoked_by_cause`` (``code_reused``,
      ``refresh_reused``, ``reauthorized``, ``admin``);
    - ``revocations``: pairs actually revoked through ``/oauth/revoke``
      (``revocations_by_company`` splits them by the grant's company);
    - ``api_ok`` / ``api_unauthorized``: API calls answered 200 / 401;
    - ``faults_injected`` and ``faults_by_kind`` (``Fault`` names): injected faults
      served; ``rate_limited``: 429s from ``rate_limit_per_minute`` (not injected);
      ``unavailable``: 503s from ``sim.unavailable``.
    """

    authorize_requests: int = 0
    codes_issued: int = 0
    token_requests: int = 0
    exchange_attempts: int = 0
    exchanges: int = 0
    exchanges_by_code: Mapping[str, int] = attrs.field(factory=dict, converter=_freeze)
    exchange_attempts_by_code: Mapping[str, int] = attrs.field(factory=dict, converter=_freeze)
    exchanges_by_company: Mapping[int, int] = attrs.field(factory=dict, converter=_freeze)
    refresh_attempts: int = 0
    refreshes: int = 0
    refreshes_by_company: Mapping[int, int] = attrs.field(factory=dict, converter=_freeze)
    refresh_attempts_by_token: Mapping[str, int] = attrs.field(factory=dict, converter=_freeze)
    invalid_grant: int = 0
    invalid_grant_by_cause: Mapping[str, int] = attrs.field(factory=dict, converter=_freeze)
    invalid_client: int = 0
    invalid_request: int = 0
    unsupported_grant_type: int = 0
    families_revoked: int = 0
    families_revoked_by_cause: Mapping[str, int] = attrs.field(factory=dict, converter=_freeze)
    revoke_requests: int = 0
    revocations: int = 0
    revocations_by_company: Mapping[int, int] = attrs.field(factory=dict, converter=_freeze)
    api_calls: int = 0
    api_ok: int = 0
    api_unauthorized: int = 0
    faults_injected: int = 0
    faults_by_kind: Mapping[str, int] = attrs.field(factory=dict, converter=_freeze)
    rate_limited: int = 0
    unavailable: int = 0

    @property
    def max_attempts_per_code(self) -> int:
        """The largest number of exchange attempts seen for any one code (0 if none)."""
        return max(self.exchange_attempts_by_code.values(), default=0)

    @property
    def max_attempts_per_refresh_token(self) -> int:
        """The largest number of refresh attempts seen for any one refresh token."""
        return max(self.refresh_attempts_by_token.values(), default=0)


@attrs.define
class Counters:
    authorize_requests: int = 0
    codes_issued: int = 0
    token_requests: int = 0
    exchange_attempts: int = 0
    exchanges: int = 0
    exchanges_by_code: Counter[str] = attrs.field(factory=Counter)
    exchange_attempts_by_code: Counter[str] = attrs.field(factory=Counter)
    exchanges_by_company: Counter[int] = attrs.field(factory=Counter)
    refresh_attempts: int = 0
    refreshes: int = 0
    refreshes_by_company: Counter[int] = attrs.field(factory=Counter)
    refresh_attempts_by_token: Counter[str] = attrs.field(factory=Counter)
    invalid_grant: int = 0
    invalid_grant_by_cause: Counter[str] = attrs.field(factory=Counter)
    invalid_client: int = 0
    invalid_request: int = 0
    unsupported_grant_type: int = 0
    families_revoked: int = 0
    families_revoked_by_cause: Counter[str] = attrs.field(factory=Counter)
    revoke_requests: int = 0
    revocations: int = 0
    revocations_by_company: Counter[int] = attrs.field(factory=Counter)
    api_calls: int = 0
    api_ok: int = 0
    api_unauthorized: int = 0
    faults_injected: int = 0
    faults_by_kind: Counter[str] = attrs.field(factory=Counter)
    rate_limited: int = 0
    unavailable: int = 0

    def snapshot(self) -> SimulatorStats:
        """The counters as an immutable :class:`SimulatorStats`."""
        return SimulatorStats(**attrs.asdict(self, recurse=False))

    def reset(self) -> None:
        """Zero every counter, in place (the rules and the fault queue hold this object)."""
        for field in attrs.fields(Counters):
            value = getattr(self, field.name)
            setattr(self, field.name, Counter() if isinstance(value, Counter) else 0)

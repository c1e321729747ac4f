"""OpenTelemetry configuration for a :class:`~factorial_tokens.TokenManager` (extra ``otel``).

``TokenManager(..., telemetry=Telemetry(meter_provider=..., tracer_provider=...))`` sends
the manager's metrics and spans to providers of your own instead of the global ones;
:class:`TenantCounts` is what :meth:`TokenManager.tenant_counts` answers. The metrics and
spans are listed in ``docs/observability.md``.
"""

from ._telemetry import Telemetry, TenantCounts

__all__ = ["Telemetry", "TenantCounts"]

"""OpenTelemetry SDK helpers for the tests: an in-memory metric reader and span exporter.

The SDK is a test dependency only; the library itself uses the API.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from factorial_tokens.telemetry import Telemetry


class Otel:
    """A meter provider and a tracer provider that keep everything in memory."""

    def __init__(self, *, tenant_ids: bool = True) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.spans = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.spans))
        self.telemetry = Telemetry(
            meter_provider=self.meters, tracer_provider=self.tracers, tenant_ids=tenant_ids
        )

    def points(self, name: str) -> list[Any]:
        """Every data point of the metric ``name`` (cumulative), from a fresh collection."""
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found += list(metric.data.data_points)
        return found

    def sums(self, name: str, *keys: str) -> Counter[tuple[str, ...]]:
        """A counter's values (or a histogram's point counts) by the attributes ``keys``."""
        totals: Counter[tuple[str, ...]] = Counter()
        for point in self.points(name):
            value = point.count if hasattr(point, "count") else point.value
            totals[tuple(str(point.attributes.get(k)) for k in keys)] += value
        return totals

    def shutdown(self) -> None:
        self.meters.shutdown()
        self.tracers.shutdown()

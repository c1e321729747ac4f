"""OpenTelemetry metrics and spans, through the OpenTelemetry API only (extra ``otel``).

The library depends on ``opentelemetry-api`` (never the SDK), as instrumentation
libraries do: the application configures a ``MeterProvider`` / ``TracerProvider`` (or
passes them in :class:`Telemetry`); without one every instrument is a no-op. Without
the package installed nothing here imports it and the manager runs as before.

Instruments, under the ``factorial_tokens`` meter (metric attributes never hold a
tenant id: cardinality, and some deployments treat tenant ids as personal data):

* ``factorial_tokens.refreshes`` (counter; ``outcome``: ok, lost_race, invalid_grant,
  no_refresh_token, provider_error, timeout, fenced_out, lease_lost, store_unavailable,
  error; ``store``) and ``factorial_tokens.refresh.duration`` (histogram, s, from lease
  acquired to commit): one point per refresh this process made under a lease;
* ``factorial_tokens.exchanges`` (counter; ``outcome``: ok, invalid_grant, in_doubt,
  provider_error, timeout, store_unavailable, error) and ``factorial_tokens.exchange.duration``;
* ``factorial_tokens.provider.requests`` (counter; ``endpoint``: token, revoke,
  credentials, other; ``status``: the HTTP status, or timeout, connection_error,
  connection_lost) and ``factorial_tokens.provider.duration`` (histogram, s);
* ``factorial_tokens.lease.wait`` (histogram, s: how long a caller waited for another
  worker's refresh; ``outcome``: ok, timeout);
* ``factorial_tokens.cache`` (observable counter; ``result``: hit, miss, stale_served):
  a hit costs the hot path one integer increment and no instrument call: the counts
  are read when a reader collects;
* ``factorial_tokens.store.operations`` (counter; ``primitive``, ``outcome``: ok,
  unavailable, error) and ``factorial_tokens.store.duration`` (histogram, s);
* ``factorial_tokens.tenants`` (observable gauge; ``status``: active, needs_reauth):
  read from the store at most once a minute per manager, in the background.

Spans: ``factorial_tokens.refresh``, ``factorial_tokens.exchange`` and
``factorial_tokens.store.<primitive>``, with the tenant id as ``factorial_tokens.tenant``
unless ``Telemetry(tenant_ids=False)``; never a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import attrs

from . import _logs
from ._errors import (
    ExchangeInDoubt,
    FactorialTokensError,
    ProviderError,
    ReauthorizationRequired,
    StoreUnavailable,
)
from ._events import EventKind, TokenEvent
from ._version import __version__
from .store import (
    Acquisition,
    ChangeListener,
    ClaimState,
    CodeClaim,
    Freshness,
    Lease,
    Record,
    Store,
    TenantKey,
    Update,
    Watch,
    acquire_lease,
    acquires_unless_fresh,
)

__all__ = ["Telemetry", "TenantCounts"]

log = logging.getLogger("factorial_tokens.telemetry")

#: The meter's and the tracer's name.
METER_NAME = "factorial_tokens"
#: How often, at most, a manager lists the store's tenants for the ``tenants`` gauge.
TENANT_COUNT_INTERVAL = 60.0
#: Histogram buckets in seconds (the SDK's default buckets are meant for milliseconds).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

T = TypeVar("T")

_UNKNOWN = object()


class _Versioned(Protocol):
    @property
    def version(self) -> int: ...


V = TypeVar("V", bound=_Versioned)


@attrs.frozen
class Telemetry:
    """How a :class:`~factorial_tokens.TokenManager` reports metrics and spans.

    Args:
        meter_provider: an OpenTelemetry ``MeterProvider``; ``None`` uses the global one
            (``opentelemetry.metrics.set_meter_provider``).
        tracer_provider: a ``TracerProvider``; ``None`` uses the global one.
        tenant_ids: put the tenant id on spans (metrics never carry it). Turn it off
            where tenant ids are personal data.
        enabled: ``False`` turns every instrument and span of the manager off.

    Needs ``opentelemetry-api`` (``pip install "factorial-tokens[otel]"``); without it
    the manager reports nothing and works as before.
    """

    meter_provider: Any = None
    tracer_provider: Any = None
    tenant_ids: bool = True
    enabled: bool = True


@attrs.frozen
class TenantCounts:
    """How many tenants the store holds, by status, and when that was read."""

    active: int
    needs_reauth: int
    read_at: float


class _Instruments:
    """The instruments of one meter provider (created once, shared by its managers)."""

    def __init__(self, meter: Any, tracer: Any, tracer_provider: Any) -> None:
        from opentelemetry import trace

        self.tracer = tracer
        self._trace = trace
        # The API's proxy provider: spans go nowhere until an SDK provider is set globally.
        # None: not known yet (the proxy, until a global provider is set: only once).
        self._tracing: bool | None = None
        if isinstance(tracer_provider, trace.NoOpTracerProvider):
            self._tracing = False
        elif not isinstance(tracer_provider, trace.ProxyTracerProvider):
            self._tracing = True
        self.refreshes = meter.create_counter(
            "factorial_tokens.refreshes", unit="{refresh}", description="Refreshes made under a lease."
        )
        self.refresh_duration = meter.create_histogram(
            "factorial_tokens.refresh.duration",
            unit="s",
            description="Refresh time, from lease acquired to commit.",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        self.exchanges = meter.create_counter(
            "factorial_tokens.exchanges", unit="{exchange}", description="Code exchanges sent."
        )
        self.exchange_duration = meter.create_histogram(
            "factorial_tokens.exchange.duration",
            unit="s",
            description="Code exchange time, from claim to tokens stored.",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        self.provider_requests = meter.create_counter(
            "factorial_tokens.provider.requests",
            unit="{request}",
            description="HTTP requests to Factorial (every attempt).",
        )
        self.provider_duration = meter.create_histogram(
            "factorial_tokens.provider.duration",
            unit="s",
            description="Time of one HTTP request to Factorial.",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        self.lease_wait = meter.create_histogram(
            "factorial_tokens.lease.wait",
            unit="s",
            description="How long a caller waited for another worker's refresh.",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        self.store_operations = meter.create_counter(
            "factorial_tokens.store.operations", unit="{operation}", description="Store primitive calls."
        )
        self.store_duration = meter.create_histogram(
            "factorial_tokens.store.duration",
            unit="s",
            description="Time of one store primitive call.",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        self.observers: weakref.WeakSet[Observer] = weakref.WeakSet()
        self.retired: Counter[tuple[str, str]] = Counter()
        meter.create_observable_counter(
            "factorial_tokens.cache",
            callbacks=[self._observe_cache],
            unit="{lookup}",
            description="Token lookups: served from the cache, missed, or served stale (store down).",
        )
        meter.create_observable_gauge(
            "factorial_tokens.tenants",
            callbacks=[self._observe_tenants],
            unit="{tenant}",
            description="Tenants in the store by status (read at most once a minute).",
        )

    def tracing(self) -> bool:
        """False while a span would record nothing (no SDK tracer provider), so none is
        made: a no-op span still costs several microseconds per store call. Asked per
        span, since a global provider may be set after the manager was built; once one
        is, the answer is kept (the API sets the global provider only once)."""
        if self._tracing is not None:
            return self._tracing
        # The API's module global, read directly: get_tracer_provider() looks the
        # environment up on every call while none is set (a tenth of a store call's CPU).
        # An API without it is asked the public way.
        provider = getattr(self._trace, "_TRACER_PROVIDER", _UNKNOWN)
        if provider is _UNKNOWN:
            provider = self._trace.get_tracer_provider()
        if provider is None or isinstance(provider, self._trace.ProxyTracerProvider):
            return False
        self._tracing = True
        return True

    def _observe_cache(self, options: Any) -> Iterator[Any]:
        from opentelemetry.metrics import Observation

        totals = Counter(self.retired)
        for observer in list(self.observers):
            totals.update(observer.cache_counts())
        for (result, store), count in sorted(totals.items()):
            yield Observation(count, {"result": result, "store": store})

    def _observe_tenants(self, options: Any) -> Iterator[Any]:
        from opentelemetry.metrics import Observation

        for observer in list(self.observers):
            observer.count_tenants_soon()
            counts = observer.tenant_counts
            if counts is not None:
                yield Observation(counts.active, {"status": "active", "store": observer.store})
                yield Observation(counts.needs_reauth, {"status": "needs_reauth", "store": observer.store})


#: Instruments per meter provider (weakly: a dropped provider is forgotten), then per
#: tracer provider.
_INSTRUMENTS: weakref.WeakKeyDictionary[Any, dict[int, tuple[Any, _Instruments]]] = (
    weakref.WeakKeyDictionary()
)


def _instruments(config: Telemetry) -> _Instruments | None:
    """The instruments for ``config``'s providers, or None without opentelemetry-api."""
    if not config.enabled:
        return None
    try:
        from opentelemetry import metrics, trace
    except ImportError:
        return None
    meter_provider = config.meter_provider or metrics.get_meter_provider()
    tracer_provider = config.tracer_provider or trace.get_tracer_provider()
    by_tracer = _INSTRUMENTS.setdefault(meter_provider, {})
    cached = by_tracer.get(id(tracer_provider))
    if cached is None or cached[0] is not tracer_provider:
        meter = meter_provider.get_meter(METER_NAME, __version__)
        tracer = tracer_provider.get_tracer(METER_NAME, __version__)
        cached = (tracer_provider, _Instruments(meter, tracer, tracer_provider))
        by_tracer[id(tracer_provider)] = cached
    return cached[1]


def store_scheme(store: object) -> str:
    """A short name of a store for metric attributes: its URL scheme where known."""
    scheme = getattr(store, "scheme", None)
    if isinstance(scheme, str) and scheme:
        return scheme
    name = type(store).__name__.lower()
    known_names = (("sqlite", "sqlite"), ("memory", "memory"), ("redis", "redis"), ("postgres", "postgresql"))
    for known, label in known_names:
        if known in name:
            return label
    return name.removesuffix("store") or "store"


@functools.lru_cache(maxsize=64)  # a few URLs, asked once per provider request
def _endpoint(url: str) -> str:
    path = urlsplit(url).path
    if path.endswith("/oauth/token"):
        return "token"
    if path.endswith("/oauth/revoke"):
        return "revoke"
    if path.endswith("/credentials"):
        return "credentials"
    return "other"


def _describe(exc: BaseException) -> str:
    """An error's type and message (our messages never hold a token)."""
    return f"{type(exc).__name__}: {exc}"


class Observer:
    """One manager's instrumentation: metrics, spans, the events they imply, health facts.

    Built by the manager, which calls it at a few outcome points; see the module doc.
    """

    def __init__(
        self,
        config: Telemetry | None,
        *,
        store: str,
        namespace: str,
        publish: Callable[[TokenEvent], None],
        hits: Callable[[], int],
        list_tenants: Callable[[], Awaitable[Iterable[Record]]],
    ) -> None:
        self.config = config or Telemetry()
        self.store = store
        self.namespace = namespace
        self._publish = publish
        self._hits = hits
        self._inst = _instruments(self.config)
        self.misses = 0
        self.stale = 0
        #: Wall time of the last HTTP answer (any status) from Factorial.
        self.last_answer_at: float | None = None
        self.tenant_counts: TenantCounts | None = None
        self._notes: dict[Lease, str] = {}
        #: A store call's metric attributes by (primitive, outcome), made once (never changed).
        self._labels: dict[tuple[str, str], dict[str, str]] = {}
        self._store_metrics_failed = False  # logged once
        self._counting: asyncio.Task[None] | None = None
        self._lister = list_tenants
        self._loop: asyncio.AbstractEventLoop | None = None
        if self._inst is not None:
            self._inst.observers.add(self)

    @property
    def enabled(self) -> bool:
        """True when OpenTelemetry is installed and not turned off."""
        return self._inst is not None

    def wrap_store(self, store: Store) -> Store:
        """``store`` with its primitives counted, timed and traced (itself when disabled)."""
        return store if self._inst is None else InstrumentedStore(store, self)

    @staticmethod
    def unwrap(store: Store) -> Store:
        """The store :meth:`wrap_store` wrapped."""
        return store.inner if isinstance(store, InstrumentedStore) else store

    def attach(self) -> None:
        """Remember the running loop, for background counts of the tenants (the manager opened)."""
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        """Keep this manager's cache counts in the totals (counters never go down)."""
        if self._counting is not None:
            self._counting.cancel()
        if self._inst is not None and self in self._inst.observers:
            self._inst.retired.update(self.cache_counts())
            self._inst.observers.discard(self)

    # -- spans -------------------------------------------------------------------------

    def _span(
        self, name: str, tenant: str | None, **attributes: str
    ) -> contextlib.AbstractContextManager[Any]:
        if self._inst is None or not self._inst.tracing():
            return contextlib.nullcontext(None)
        attrs_: dict[str, str] = {"factorial_tokens.store": self.store, **attributes}
        if self.config.tenant_ids:
            if tenant is not None:
                attrs_["factorial_tokens.tenant"] = tenant
            return self._inst.tracer.start_as_current_span(name, attributes=attrs_)  # type: ignore[no-any-return]
        return self._span_without_messages(name, attrs_)

    @contextlib.contextmanager
    def _span_without_messages(self, name: str, attributes: dict[str, str]) -> Iterator[Any]:
        """A span whose error is told by its type only: error messages name the tenant,
        which this telemetry was asked to keep out of traces."""
        assert self._inst is not None
        with self._inst.tracer.start_as_current_span(
            name, attributes=attributes, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield span
            except BaseException as exc:
                from opentelemetry.trace import Status, StatusCode

                span.set_attribute("exception.type", type(exc).__name__)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise

    # -- refresh and exchange ----------------------------------------------------------

    def note(self, lease: Lease, outcome: str) -> None:
        """Say why a refresh under ``lease`` is about to give up (``lost_race``, ``fenced_out``)."""
        self._notes[lease] = outcome

    async def refresh(self, lease: Lease, before: int | None, work: Awaitable[V | None]) -> V | None:
        """Await ``work`` (a refresh holding ``lease``), then count and time its outcome.

        ``before``: the version of the record the lease was acquired on. A result with
        another version is a refresh (``ok``); the same version means nothing was due.
        """
        context = _logs.OperationContext(lease.key.tenant, "refresh", self.store)
        token = _logs.bind(context)
        outcome: str | None = None
        failure: BaseException | None = None
        try:
            with self._span("factorial_tokens.refresh", lease.key.tenant) as span:
                try:
                    result = await work
                except BaseException as exc:
                    noted = self._notes.pop(lease, None)
                    outcome, failure = _refresh_failure(exc, context, noted), exc
                    _set_outcome(span, outcome or "not_sent")
                    raise
                noted = self._notes.pop(lease, None)
                if result is None:
                    outcome = noted or "lease_lost"
                elif result.version != before:
                    outcome = "ok"
                _set_outcome(span, outcome or "not_due")
                return result
        finally:
            self._notes.pop(lease, None)
            _logs.reset(token)
            if outcome is not None:
                try:
                    self._refreshed(lease.key.tenant, outcome, context, failure)
                except Exception:  # instrumentation never breaks a refresh
                    log.exception("recording a refresh failed")

    def _refreshed(
        self, tenant: str, outcome: str, context: _logs.OperationContext, failure: BaseException | None
    ) -> None:
        duration = time.monotonic() - context.started
        if self._inst is not None:
            labels = {"outcome": outcome, "store": self.store}
            self._inst.refreshes.add(1, labels)
            self._inst.refresh_duration.record(duration, labels)
        extra = {
            "tenant": tenant,
            "event": "refresh_failed",
            "store": self.store,
            "duration_ms": round(duration * 1000, 3),
        }
        if failure is not None:
            log.warning("tenant %r: refresh failed (%s): %s", tenant, outcome, failure, extra=extra)
            self._publish(
                TokenEvent(
                    EventKind.REFRESH_FAILED,
                    tenant,
                    detail=outcome,
                    duration=duration,
                    error=_describe(failure),
                )
            )
        elif outcome in ("fenced_out", "lease_lost"):
            extra["event"] = "lease_lost"
            log.warning("tenant %r: the refresh lease was lost (%s)", tenant, outcome, extra=extra)
            self._publish(TokenEvent(EventKind.LEASE_LOST, tenant, detail=outcome, duration=duration))

    async def exchange(self, tenant: str, work: Awaitable[T]) -> T:
        """Await ``work`` (a code exchange this process sends), then count and time it."""
        context = _logs.OperationContext(tenant, "exchange", self.store)
        token = _logs.bind(context)
        outcome = "ok"
        try:
            with self._span("factorial_tokens.exchange", tenant) as span:
                try:
                    return await work
                except BaseException as exc:
                    outcome = _exchange_failure(exc)
                    _set_outcome(span, outcome)
                    raise
                finally:
                    if outcome == "ok":
                        _set_outcome(span, outcome)
        finally:
            _logs.reset(token)
            if outcome != "cancelled" and self._inst is not None:
                labels = {"outcome": outcome, "store": self.store}
                self._inst.exchanges.add(1, labels)
                self._inst.exchange_duration.record(time.monotonic() - context.started, labels)

    def complete(self, event: TokenEvent) -> TokenEvent:
        """``event`` with the running refresh's or exchange's duration so far, if it has none."""
        context = _logs.current()
        if (
            event.duration is None
            and event.kind in _TIMED
            and context is not None
            and context.tenant == event.tenant
        ):
            return attrs.evolve(event, duration=time.monotonic() - context.started)
        return event

    # -- waiting, cache ----------------------------------------------------------------

    def lease_waited(self, seconds: float, outcome: str = "ok") -> None:
        """A caller waited ``seconds`` for another worker's refresh."""
        if self._inst is not None:
            self._inst.lease_wait.record(seconds, {"outcome": outcome, "store": self.store})

    def refresh_timeout(self, tenant: str, seconds: float) -> None:
        """A caller gave up waiting after ``seconds``."""
        self.lease_waited(seconds, "timeout")
        self._publish(
            TokenEvent(
                EventKind.REFRESH_TIMEOUT,
                tenant,
                detail="another worker held the refresh lease too long",
                duration=seconds,
            )
        )

    def stale_served(self, tenant: str, fingerprint: str, error: BaseException) -> None:
        """The store was down and a cached, still valid token was served."""
        self.stale += 1
        self._publish(
            TokenEvent(
                EventKind.STALE_SERVED, tenant, fingerprint, detail="store down", error=_describe(error)
            )
        )

    def cache_counts(self) -> Counter[tuple[str, str]]:
        """Cache lookups by (result, store) so far."""
        store = self.store
        return Counter(
            {("hit", store): self._hits(), ("miss", store): self.misses, ("stale_served", store): self.stale}
        )

    # -- the provider ------------------------------------------------------------------

    def provider_answer(self, url: str, status: int | str, seconds: float, retry_after: float | None) -> None:
        """One HTTP attempt to Factorial ended: ``status`` is its HTTP status, or how it
        failed (``timeout``, ``connection_error``, ``connection_lost``)."""
        endpoint = _endpoint(url)
        if isinstance(status, int):
            self.last_answer_at = time.time()
        context = _logs.current()
        if context is not None and endpoint == "token":
            context.provider_calls += 1
        if self._inst is not None:
            self._inst.provider_requests.add(1, {"endpoint": endpoint, "status": str(status)})
            self._inst.provider_duration.record(seconds, {"endpoint": endpoint})
        if status == 429:
            tenant = context.tenant if context is not None else ""
            shown = "none" if retry_after is None else f"{retry_after:g}s"
            log.warning(
                "Factorial answered 429 on %s (Retry-After %s)",
                endpoint,
                shown,
                extra={"tenant": tenant or None, "event": "rate_limited", "store": self.store},
            )
            self._publish(
                TokenEvent(EventKind.RATE_LIMITED, tenant, detail=f"{endpoint}: 429", retry_after=retry_after)
            )

    # -- tenants gauge -----------------------------------------------------------------

    def count_tenants_soon(self) -> None:
        """From any thread: start a background count of the tenants if the last is old."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self._due(TENANT_COUNT_INTERVAL):
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._start_count)

    def _due(self, max_age: float) -> bool:
        counts = self.tenant_counts
        return counts is None or time.time() - counts.read_at >= max_age

    def _start_count(self) -> None:
        if self._counting is None or self._counting.done():
            self._counting = asyncio.get_running_loop().create_task(self._count_quietly())

    async def _count_quietly(self) -> None:
        try:
            await self.count_tenants(TENANT_COUNT_INTERVAL)
        except FactorialTokensError as exc:
            log.warning("could not count the tenants for the tenants gauge: %s", exc)

    async def count_tenants(self, max_age: float = TENANT_COUNT_INTERVAL) -> TenantCounts:
        """Tenants by status, listed from the store unless the last list is fresher than
        ``max_age`` seconds."""
        counts = self.tenant_counts
        if counts is not None and not self._due(max_age):
            return counts
        records = list(await self._lister())
        reauth = sum(1 for r in records if r.status.value == "needs_reauth")
        self.tenant_counts = TenantCounts(len(records) - reauth, reauth, time.time())
        return self.tenant_counts

    # -- store primitives --------------------------------------------------------------

    async def store_call(self, primitive: str, tenant: str | None, work: Awaitable[T]) -> T:
        """Await one store primitive, counted, timed and traced."""
        inst = self._inst
        assert inst is not None
        started = time.monotonic()
        outcome = "ok"
        try:
            if not inst.tracing():  # no span, not even a no-op one: this runs per store call
                return await work
            with self._span(f"factorial_tokens.store.{primitive}", tenant):
                return await work
        except StoreUnavailable:
            outcome = "unavailable"
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            labels = self._labels.get((primitive, outcome))
            if labels is None:
                labels = self._labels[primitive, outcome] = {
                    "primitive": primitive,
                    "outcome": outcome,
                    "store": self.store,
                }
            try:
                inst.store_operations.add(1, labels)
                inst.store_duration.record(time.monotonic() - started, labels)
            except Exception:  # instrumentation never breaks a store call
                if not self._store_metrics_failed:
                    self._store_metrics_failed = True
                    log.exception("recording a store call failed (logged once)")


_TIMED = frozenset({EventKind.REFRESHED, EventKind.EXCHANGED, EventKind.REAUTHORIZATION_REQUIRED})


def _set_outcome(span: Any, outcome: str) -> None:
    if span is not None:
        span.set_attribute("factorial_tokens.outcome", outcome)


def _refresh_failure(exc: BaseException, context: _logs.OperationContext, noted: str | None) -> str | None:
    """The outcome a refresh that raised ``exc`` is counted under; None: not counted (it
    was cancelled, or found the tenant already dead without asking Factorial)."""
    if isinstance(exc, ReauthorizationRequired):
        return "invalid_grant" if context.provider_calls else noted
    if isinstance(exc, ProviderError):
        return "timeout" if exc.error == "timeout" else "provider_error"
    if isinstance(exc, StoreUnavailable):
        return "store_unavailable"
    if isinstance(exc, Exception):
        return "error"
    return None  # cancelled: not an outcome


def _exchange_failure(exc: BaseException) -> str:
    if isinstance(exc, ExchangeInDoubt):
        return "in_doubt"
    if isinstance(exc, ProviderError):
        if exc.error == "invalid_grant":
            return "invalid_grant"
        return "timeout" if exc.error == "timeout" else "provider_error"
    if isinstance(exc, StoreUnavailable):
        return "store_unavailable"
    if isinstance(exc, Exception):
        return "error"
    return "cancelled"


class InstrumentedStore:
    """A Store that forwards to ``inner``, each primitive counted, timed and traced.

    Attributes it does not define (optional capabilities) are the inner store's.
    """

    def __init__(self, inner: Store, observer: Observer) -> None:
        self.inner = inner
        self._obs = observer

    def __repr__(self) -> str:
        return repr(self.inner)

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.inner, name)
        if name in ("hold", "admit"):  # the Throttle capability's round trips count too
            return functools.partial(self._throttle_call, name, found)
        return found

    async def _throttle_call(
        self, name: str, primitive: Callable[..., Awaitable[float]], *args: Any
    ) -> float:
        return await self._obs.store_call(name, None, primitive(*args))

    @property
    def acquires_unless_fresh(self) -> bool:
        """The inner store's capability (its attribute and its ``acquire``'s signature)."""
        return acquires_unless_fresh(self.inner)

    # The primitives of every refresh are plain functions that return store_call's
    # coroutine: one coroutine less per store call (a cold start makes tens of thousands).

    def read(self, key: TenantKey) -> Coroutine[Any, Any, Record | None]:
        return self._obs.store_call("read", key.tenant, self.inner.read(key))

    def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Coroutine[Any, Any, Acquisition]:
        work = acquire_lease(self.inner, key, owner, ttl, unless_fresh=unless_fresh)
        return self._obs.store_call("acquire", key.tenant, work)

    async def extend(self, lease: Lease, ttl: float) -> bool:
        return await self._obs.store_call("extend", lease.key.tenant, self.inner.extend(lease, ttl))

    async def release(self, lease: Lease) -> bool:
        return await self._obs.store_call("release", lease.key.tenant, self.inner.release(lease))

    def commit(self, lease: Lease, update: Update) -> Coroutine[Any, Any, Record | None]:
        return self._obs.store_call("commit", lease.key.tenant, self.inner.commit(lease, update))

    async def replace(self, key: TenantKey, update: Update | None) -> None:
        await self._obs.store_call("replace", key.tenant, self.inner.replace(key, update))

    async def claim_code(self, key: TenantKey, code_hash: str, owner: str, ttl: float) -> CodeClaim:
        return await self._obs.store_call(
            "claim_code", key.tenant, self.inner.claim_code(key, code_hash, owner, ttl)
        )

    async def advance_code(
        self, claim: CodeClaim, state: ClaimState, ttl: float, outcome: str | None = None
    ) -> bool:
        return await self._obs.store_call(
            "advance_code", claim.key.tenant, self.inner.advance_code(claim, state, ttl, outcome)
        )

    async def tenants(self, namespace: str) -> list[Record]:
        return await self._obs.store_call("tenants", None, self.inner.tenants(namespace))

    def watch(self, key: TenantKey) -> AbstractAsyncContextManager[Watch]:
        return self.inner.watch(key)

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        return self.inner.on_change(callback)

    async def check(self) -> None:
        await self._obs.store_call("check", None, self.inner.check())

    async def aclose(self) -> None:
        await self.inner.aclose()

"""The kit for token store authors: the contract, its values, and the shared plumbing.

What a store implements: :class:`Store` (the primitives the manager composes),
:class:`AcquireUnlessFresh` (a lease taken only when the record is due, declared as
:func:`acquires_unless_fresh` checks) and, for fleet-wide back-pressure, :class:`Throttle`.
Their values: :class:`TenantKey`, :class:`Record`, :class:`Update`, :class:`Lease`,
:class:`Acquisition`, :class:`Freshness`, :class:`TenantStatus`, :class:`ClaimState`,
:class:`CodeClaim`, :class:`ThrottleState`, :data:`CLAIM_RETENTION`, :func:`hold_digest`.

What a store reuses instead of rebuilding it: :class:`Notifier` (the in-process fan-out of
change announcements behind ``watch``/``on_change``), :class:`PushListener` (a push
channel's reconnect, backoff, first-try gate and own-echo filter), :class:`Batcher` (the
calls of one turn of the loop sent as one batch), :class:`OrphanLeases` (leases won for
cancelled callers given back),
:func:`url_options` and its parsers (options in a store URL), :func:`record_from_columns`
(a record from a driver's row), :func:`closed_error` (what a closed store raises).

How a store is found: :func:`store_from_url`, by the URL's scheme, through the
``factorial_tokens.stores`` entry points each store package declares (see
:mod:`factorial_tokens.store._registry` for the install hints of missing ones).

The built-in stores: :class:`MemoryStore` (``memory://``, one process) and
:class:`SQLiteStore` (``sqlite:///``, the processes of one host). Every store, built in or
a third party's, runs :class:`factorial_tokens.testing.StoreConformance`.

Applications need none of this: they pass a store URL (or a store) to
:class:`factorial_tokens.TokenManager`.
"""

from ._batch import Batcher
from ._contract import (
    AcquireUnlessFresh,
    ChangeListener,
    Store,
    Throttle,
    Watch,
    acquire_lease,
    acquire_within,
    acquires_unless_fresh,
    announced,
    changed,
    closed_error,
    throttles,
)
from ._listener import PushListener
from ._notifier import Notifier
from ._options import OptionParser, choice, flag, integer, number, seconds, text, url_options
from ._orphans import OrphanLeases
from ._registry import known_schemes, store_from_url
from ._values import (
    CLAIM_RETENTION,
    Acquisition,
    ClaimState,
    CodeClaim,
    Freshness,
    Lease,
    Record,
    TenantKey,
    TenantStatus,
    ThrottleState,
    Update,
    hold_digest,
    record_from_columns,
    unreadable_record,
)
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = [
    "CLAIM_RETENTION",
    "AcquireUnlessFresh",
    "Acquisition",
    "Batcher",
    "ChangeListener",
    "ClaimState",
    "CodeClaim",
    "Freshness",
    "Lease",
    "MemoryStore",
    "Notifier",
    "OptionParser",
    "OrphanLeases",
    "PushListener",
    "Record",
    "SQLiteStore",
    "Store",
    "TenantKey",
    "TenantStatus",
    "Throttle",
    "ThrottleState",
    "Update",
    "Watch",
    "acquire_lease",
    "acquire_within",
    "acquires_unless_fresh",
    "announced",
    "changed",
    "choice",
    "closed_error",
    "flag",
    "hold_digest",
    "integer",
    "known_schemes",
    "number",
    "record_from_columns",
    "seconds",
    "store_from_url",
    "text",
    "throttles",
    "unreadable_record",
    "url_options",
]

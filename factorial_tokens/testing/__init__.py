"""Testing helpers: a strict simulator of Factorial's OAuth server, and the store
conformance suite any store (a third party's too) can run."""

from ._conformance import HOSTILE_TENANTS, StoreConformance
from ._counting import CountingStore
from ._faults import ENDPOINTS, Fault
from ._rules import RefreshMode
from ._server import FakeFactorial
from ._stats import SimulatorStats
from ._wire import Dialect

__all__ = [
    "ENDPOINTS",
    "HOSTILE_TENANTS",
    "CountingStore",
    "Dialect",
    "FakeFactorial",
    "Fault",
    "RefreshMode",
    "SimulatorStats",
    "StoreConformance",
]

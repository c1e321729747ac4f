"""The aiohttp side of factorial-tokens: the connect routes and the operators' routes.

* :func:`connect_app`: ``/connect/{tenant}`` and the OAuth callback as an aiohttp
  application to mount in your own server (``app.add_subapp(...)``), with
  :data:`ConnectCheck` for a per-request check and :class:`AccessLogger`, an access log
  that leaves out the callback's query (it holds the code and the state);
* :func:`add_ops_routes`: ``/healthz``, ``/readyz`` and ``/metrics`` for a manager, with
  :func:`prometheus_exporter` (extra ``prometheus``).

``factorial-tokens serve`` is these routes on one server. This is the only module of the
library that imports ``aiohttp.web``: ``import factorial_tokens`` does not load it. The
Starlette/FastAPI adapter is :mod:`factorial_tokens.starlette`; both run the same
framework-neutral steps.
"""

from .._connect import callback_path
from ._connect import COOKIE, AccessLogger, ConnectCheck, connect_app
from ._ops import MetricsRenderer, add_ops_routes, prometheus_exporter

__all__ = [
    "COOKIE",
    "AccessLogger",
    "ConnectCheck",
    "MetricsRenderer",
    "add_ops_routes",
    "callback_path",
    "connect_app",
    "prometheus_exporter",
]

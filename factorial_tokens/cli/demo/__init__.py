"""The demo: many worker processes keep many companies' tokens alive against a strict
Factorial simulator, and the provider's own counters show that no grant was broken.

What it does, in order:

1. starts :class:`~factorial_tokens.testing.FakeFactorial` on loopback in its strictest
   mode (revoke at refresh + reuse detection) with short-lived access tokens;
2. starts the connect server (:func:`~factorial_tokens.web.connect_app`) on loopback
   and connects T companies through the real authorization-code flow, as one browser:
   the tenant's signed connect link ``/connect/{tenant}?link=...`` (which sets the binding
   cookie) -> Factorial's authorize page -> the callback with that cookie, each callback
   sent twice at once (a retried callback must not exchange its code twice);
3. runs P worker processes x C tasks that call ``access_token`` and the simulator's API
   through ``tm.client(tenant)`` for D seconds, all on one shared store;
4. compares what the provider counted with the ideal: each refresh must create exactly
   one new token generation that callers then used (``refresh requests == refreshes ==
   distinct generations - T``), with zero ``invalid_grant``, zero revoked grants, zero
   tenants needing re-authorization and zero 401s seen by callers.

Only fingerprints of tokens ever leave a worker.

The demo's jobs, one module each: ``_config`` (its knobs and result), ``_worker`` (one
worker process), ``_run`` (the simulator, the connections, the workers), ``_judge``
(the measures against the ideal) and ``_render`` (progress and the verdict on a terminal).
Run through ``factorial-tokens demo``; nothing here is part of the library's API.
"""

from ._config import DemoConfig, DemoResult
from ._judge import judge
from ._render import render
from ._run import run_demo

__all__ = ["DemoConfig", "DemoResult", "judge", "render", "run_demo"]

"""SyncTokenManager: blocking, thread-safe, one manager on its own loop thread, fork-safe;
and the ``requests`` auth built on it. Counted against a simulator served from a thread."""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import requests

from factorial_tokens import ManagerClosed, TenantNotConnected
from factorial_tokens.requests import FactorialAuth
from factorial_tokens.sync import SyncTokenManager
from factorial_tokens.testing import FakeFactorial

from .conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, ThreadSimFactory, app_for

THREADS = 16
TENANTS = [f"tenant-{i}" for i in range(4)]
EMPLOYEES = "/api/2025-10-01/resources/employees/employees"


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "factorial-tokens"]


@pytest.fixture
def tsim(make_thread_sim: ThreadSimFactory) -> Iterator[FakeFactorial]:
    with make_thread_sim() as sim:
        yield sim


@pytest.fixture
def stm(tsim: FakeFactorial, tmp_path: Path) -> Iterator[SyncTokenManager]:
    manager = SyncTokenManager(
        app_for(tsim), f"sqlite:///{tmp_path / 'tokens.db'}", lease_ttl=6.0, provider_timeout=2.0
    )
    try:
        yield manager
    finally:
        manager.close()


def connect(sim: FakeFactorial, stm: SyncTokenManager, tenants: list[str]) -> None:
    for number, tenant in enumerate(tenants, start=1):
        stm.exchange_code(tenant, sim.issue_code(company_id=number))


def in_threads(work: Callable[[int], None], count: int = THREADS) -> list[BaseException]:
    """Run ``work(i)`` in ``count`` threads released together; the errors they raised."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        barrier.wait()
        try:
            work(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_sixteen_threads_one_refresh_per_tenant_and_clean_shutdown(
    make_thread_sim: ThreadSimFactory, tmp_path: Path
) -> None:
    before = len(loop_threads())
    with make_thread_sim(access_token_ttl=3) as sim:
        # min_valid == leeway: no advisory window, so every caller of a due token waits for
        # its refresh (inside an advisory window callers would get the current token at
        # once while the refresh runs behind them).
        stm = SyncTokenManager(
            app_for(sim),
            f"sqlite:///{tmp_path / 'tokens.db'}",
            lease_ttl=6.0,
            provider_timeout=2.0,
            leeway=1.0,
            min_valid=1.0,
        )
        connect(sim, stm, TENANTS)
        assert len(loop_threads()) == before + 1  # one loop thread for every caller
        # A 3 s token is due a leeway before expiry: wait until every tenant is due.
        time.sleep(2.1)
        sim.reset_stats()
        tokens: dict[str, set[str]] = {tenant: set() for tenant in TENANTS}

        def work(_: int) -> None:
            for tenant in TENANTS:
                tokens[tenant].add(stm.access_token(tenant))

        errors = in_threads(work)
        stats = sim.stats
        assert errors == []
        assert stats.refreshes == len(TENANTS)
        assert stats.invalid_grant == 0 and stats.families_revoked == 0
        assert all(len(seen) == 1 and sim.is_active(seen.pop()) for seen in tokens.values())
        stm.close()
        assert len(loop_threads()) == before
        stm.close()  # idempotent
        with pytest.raises(ManagerClosed):
            stm.access_token(TENANTS[0])


def test_requests_auth_after_a_401_one_refresh_per_tenant(tsim: FakeFactorial, stm: SyncTokenManager) -> None:
    connect(tsim, stm, TENANTS)
    for tenant in TENANTS:
        stm.access_token(tenant)  # cached in the manager
    tsim.expire_access_tokens()  # the API now refuses every cached token
    tsim.reset_stats()
    statuses: list[int] = []

    def work(_: int) -> None:
        with requests.Session() as session:
            for tenant in TENANTS:
                session.auth = FactorialAuth(stm, tenant)
                resp = session.get(tsim.base_url + EMPLOYEES, timeout=10)
                statuses.append(resp.status_code)

    assert in_threads(work) == []
    stats = tsim.stats
    assert statuses == [200] * THREADS * len(TENANTS)
    assert stats.refreshes == len(TENANTS)
    assert stats.api_unauthorized >= len(TENANTS)  # every tenant's cached token was refused
    assert stats.invalid_grant == 0


def test_requests_auth_refuses_another_origin(tsim: FakeFactorial, stm: SyncTokenManager) -> None:
    from factorial_tokens import ConfigurationError

    connect(tsim, stm, ["acme"])
    before = tsim.stats.api_calls
    with pytest.raises(ConfigurationError), requests.Session() as session:
        session.get("http://127.0.0.2:9/steal", auth=FactorialAuth(stm, "acme"), timeout=5)
    assert tsim.stats.api_calls == before


def test_errors_and_run_with_the_async_manager(tsim: FakeFactorial, stm: SyncTokenManager) -> None:
    with pytest.raises(TenantNotConnected):
        stm.access_token("nobody")
    connect(tsim, stm, ["acme"])

    async def employees(tm: Any) -> Any:
        async with tm.client("acme") as api, api.get(EMPLOYEES) as resp:
            return resp.status, await resp.json()

    status, _body = stm.run(employees)
    assert status == 200
    assert [info.tenant for info in stm.tenants()] == ["acme"]
    url = stm.authorization_url("acme")
    state = url.split("state=")[1].split("&")[0]
    from urllib.parse import unquote

    assert stm.tenant_from_state(unquote(state)) == "acme"


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_a_forked_child_starts_its_own_loop(tsim: FakeFactorial, stm: SyncTokenManager) -> None:
    connect(tsim, stm, ["acme"])
    stm.access_token("acme")  # the parent's loop thread is running
    parent_thread = loop_threads()[0]
    tsim.reset_stats()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only this thread survived the fork
        code = 1
        try:
            signal.alarm(30)
            os.close(read_end)
            tokens = stm.refresh("acme")
            threads = loop_threads()
            code = 0 if len(threads) == 1 and threads[0] is not parent_thread else 2
            os.write(write_end, tokens.access_token.encode())
            stm.close()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_token = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert tsim.stats.refreshes == 1 and tsim.is_active(child_token)
    # The parent's loop and connections survived the child; it reads the child's refresh.
    assert stm.tokens("acme").access_token == child_token
    assert parent_thread.is_alive() and loop_threads() == [parent_thread]


def test_closed_at_interpreter_exit(tsim: FakeFactorial, tmp_path: Path) -> None:
    tsim.next_owner(company_id=7)
    script = textwrap.dedent(
        f"""
        from factorial_tokens import FactorialApp
        from factorial_tokens.sync import SyncTokenManager
        app = FactorialApp(client_id={CLIENT_ID!r}, client_secret={CLIENT_SECRET!r},
                           redirect_uri={REDIRECT_URI!r}, base_url={tsim.base_url!r})
        stm = SyncTokenManager(app, {f"sqlite:///{tmp_path / 't.db'}"!r})
        stm.exchange_code("acme", {tsim.issue_code(company_id=7)!r})
        print(stm.credentials("acme").company_id)
        """
    )
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "7"
    assert result.stderr == ""


def test_close_from_a_thread_with_a_running_loop(tsim: FakeFactorial, stm: SyncTokenManager) -> None:
    # An async view or an async test closing the facade: its own thread has a running loop.
    import asyncio

    connect(tsim, stm, ["acme"])

    async def inside() -> None:
        stm.close()

    asyncio.run(inside())
    assert stm.closed and loop_threads() == []


def test_managers_on_loops_of_their_own_in_two_threads_keep_their_books(tsim: FakeFactorial) -> None:
    # Two managers, each on its own loop in its own thread (two SyncTokenManagers, or one
    # beside an async app). A context is entered by one thread at a time: done callbacks
    # that keep the books (a flight's landing, its callers' wake-up) in a context shared by
    # every manager failed whenever the other loop was in one ("cannot enter context"), and
    # did not run: the callers of that flight waited forever.
    import asyncio

    from factorial_tokens import TokenManager

    failures: list[object] = []
    start = threading.Barrier(2)

    async def work(first: int) -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _, context: failures.append(context.get("exception", context["message"]))
        )
        async with TokenManager(app_for(tsim), "memory://", lease_ttl=6.0, provider_timeout=2.0) as tm:
            tenants = [f"tenant-{first + i}" for i in range(64)]
            for tenant in tenants:
                await tm.exchange_code(tenant, tsim.issue_code(company_id=int(tenant.split("-")[1])))
            start.wait()
            until = time.monotonic() + 5.0
            while time.monotonic() < until and not failures:
                await asyncio.wait_for(
                    asyncio.gather(*(tm.refresh(tenant) for tenant in tenants for _ in range(8))), 10.0
                )

    def run(first: int) -> None:
        try:
            asyncio.run(work(first))
        except BaseException as exc:
            failures.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often, as under load
    try:
        threads = [threading.Thread(target=run, args=(first,)) for first in (1, 101)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []


def test_close_lets_a_call_in_flight_from_another_thread_end(
    make_thread_sim: ThreadSimFactory, tmp_path: Path
) -> None:
    """``close`` stopped the loop under a call another thread was waiting for: that thread
    never got a result or an error."""
    with make_thread_sim(latency=0.5) as sim:
        stm = SyncTokenManager(app_for(sim), f"sqlite:///{tmp_path / 't.db'}")
        stm.exchange_code("acme", sim.issue_code(company_id=1))
        outcome: list[object] = []

        def worker() -> None:
            try:
                outcome.append(stm.credentials("acme"))
            except BaseException as exc:
                outcome.append(exc)

        caller = threading.Thread(target=worker, daemon=True)
        caller.start()
        time.sleep(0.2)
        stm.close()
        caller.join(5.0)
        assert not caller.is_alive(), "stm.credentials() never returns nor raises after close()"
        assert len(outcome) == 1 and not isinstance(outcome[0], BaseException), outcome  # it finished first


def test_the_interpreter_exits_while_a_worker_thread_is_mid_call(
    make_thread_sim: ThreadSimFactory, tmp_path: Path
) -> None:
    """The exit hook (which runs before Python waits for plain threads) closed the manager
    under a worker thread's call, which then waited forever, and so did the interpreter."""
    with make_thread_sim(latency=1.0) as sim:
        code = sim.issue_code(company_id=1)
        script = f"""
import threading, time
from factorial_tokens import FactorialApp
from factorial_tokens.sync import SyncTokenManager
app = FactorialApp(client_id={app_for(sim).client_id!r}, client_secret={app_for(sim).client_secret!r},
                   redirect_uri={app_for(sim).redirect_uri!r}, base_url={sim.base_url!r})
stm = SyncTokenManager(app, {f"sqlite:///{tmp_path / 't.db'}"!r})
stm.exchange_code("acme", {code!r})
def work():
    try:
        stm.credentials("acme")
        print("worker done", flush=True)
    except Exception as exc:
        print("worker raised", type(exc).__name__, flush=True)
threading.Thread(target=work).start()   # a plain (non-daemon) worker thread
time.sleep(0.3)
# the main thread ends here; the interpreter must wait for the worker, then exit
"""
        try:
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(
                "the interpreter never exits: the worker's call hangs after the exit hook closed the manager"
            )
        assert done.returncode == 0 and "worker done" in done.stdout, done.stderr


# -- review-sync: failing tests ------------------------------------------------------------


@contextlib.contextmanager
def other_origin(status: int = 401) -> Iterator[tuple[str, list[str | None]]]:
    """A plain HTTP server on another port (another origin) that answers ``status`` to
    every GET and records the Authorization header of each request."""
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5.0)


def test_repr_hides_the_store_url_password(tsim: FakeFactorial) -> None:
    """``repr(SyncTokenManager)`` quotes the store URL as given, password included
    (``redis://:pw@...``, ``postgresql://user:pw@...``), where every store's own repr and
    the TokenManager's hide it: the password lands in logs, tracebacks and debuggers."""
    stm = SyncTokenManager(app_for(tsim), "redis://:pw-S3cret-sync@127.0.0.1:1/0")
    try:
        assert "pw-S3cret-sync" not in repr(stm), repr(stm)
    finally:
        stm.close()


def test_requests_auth_never_sends_the_token_where_a_redirect_led(
    tsim: FakeFactorial, stm: SyncTokenManager
) -> None:
    """requests copies a request's hooks (the same dict) onto every redirected request, so
    the 401-retry hook also sees the answer of the host a redirect led to: a 401 from that
    other origin makes it force a refresh (Factorial never refused the token) and resend the
    request *to that other origin* with a fresh Bearer token set by hand."""
    connect(tsim, stm, ["acme"])
    stm.access_token("acme")
    with other_origin(401) as (elsewhere, seen):
        tsim.add_client("other-app", "other-secret", elsewhere + "/cb")
        query = urlencode(
            {"client_id": "other-app", "redirect_uri": elsewhere + "/cb", "response_type": "code"}
        )
        tsim.reset_stats()
        with requests.Session() as session:
            resp = session.get(
                f"{tsim.base_url}/oauth/authorize?{query}", auth=FactorialAuth(stm, "acme"), timeout=10
            )
        assert resp.status_code == 401  # the other origin's answer
        leaked = [header for header in seen if header is not None]
        assert leaked == [], f"the tenant's token was sent to another origin: {len(leaked)} time(s)"
        assert tsim.stats.refreshes == 0, "a 401 from another origin forced a refresh"


def test_requests_auth_renews_the_token_after_a_401_to_a_stream_body(
    tsim: FakeFactorial, stm: SyncTokenManager
) -> None:
    """After a 401 to a request whose body is a file (not resendable), the hook returns the
    401 without telling the manager (``token_rejected`` is only called on the retry path):
    the rejected token stays cached, so every following upload gets a 401 too, for up to
    the token's whole remaining lifetime. (``tm.client`` reports it either way.)"""
    connect(tsim, stm, ["acme"])
    stm.access_token("acme")
    tsim.expire_access_tokens()  # Factorial now refuses the cached token
    statuses = []
    with requests.Session() as session:
        session.auth = FactorialAuth(stm, "acme")
        for _ in range(2):
            resp = session.get(tsim.base_url + EMPLOYEES, data=io.BytesIO(b"upload"), timeout=10)
            statuses.append(resp.status_code)
    assert statuses == [401, 200], f"the rejected token was used again: {statuses}"


def test_close_from_the_loop_thread_raises_instead_of_hanging(tmp_path: Path) -> None:
    """Every facade call made on the loop thread (an async event listener, ``run``'s
    function) raises RuntimeError, but ``close()`` has no such check: it submits
    ``finish()`` to the loop it is blocking and waits for it forever; the loop thread, and
    every thread that calls the facade after that, are stuck for good."""
    script = f"""
import os, threading
from factorial_tokens import FactorialApp
from factorial_tokens.sync import SyncTokenManager
app = FactorialApp(client_id={CLIENT_ID!r}, client_secret={CLIENT_SECRET!r},
                   redirect_uri={REDIRECT_URI!r}, base_url="http://127.0.0.1:9")
stm = SyncTokenManager(app, {f"sqlite:///{tmp_path / 't.db'}"!r})
outcome = []

async def shut(tm):
    stm.close()

def caller():
    try:
        stm.run(shut)
        outcome.append("returned")
    except BaseException as exc:
        outcome.append(type(exc).__name__)

thread = threading.Thread(target=caller, daemon=True)
thread.start()
thread.join(2.0)
print("hung" if thread.is_alive() else outcome[0], flush=True)
os._exit(0)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert done.stdout.strip() in ("RuntimeError", "returned"), (done.stdout, done.stderr)


def test_a_facade_dropped_without_close_leaves_no_thread_running(tmp_path: Path) -> None:
    """A SyncTokenManager that is garbage-collected without ``close()`` (made per request,
    per task, in a helper) leaves its loop thread (and the store's threads and connections)
    running for the rest of the process: the thread's target holds the runner, nothing
    stops it when the facade goes, and ``_LIVE`` is a WeakSet, so even the exit hook never
    closes that manager. Each such facade leaks a thread for good."""
    script = f"""
import gc, threading
from factorial_tokens import FactorialApp
from factorial_tokens.sync import SyncTokenManager
app = FactorialApp(client_id={CLIENT_ID!r}, client_secret={CLIENT_SECRET!r},
                   redirect_uri={REDIRECT_URI!r}, base_url="http://127.0.0.1:9")

def once():
    stm = SyncTokenManager(app, {f"sqlite:///{tmp_path / 't.db'}"!r})
    stm.tenants()

for _ in range(3):
    once()
gc.collect()
print(sum(t.name.startswith("factorial-tokens") for t in threading.enumerate()), flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0", f"threads left running after 3 dropped facades: {done.stdout.strip()}"


def test_close_closes_a_store_its_factory_built(tsim: FakeFactorial, tmp_path: Path) -> None:
    """With ``store=`` a factory, the facade builds the store and hands it to TokenManager as
    an instance, which the manager does not own (``_owns_store`` is for URLs) and never
    closes; nobody else can (it lives on the facade's loop, which close() ends). After
    ``close()`` its connection and its executor thread stay open for good (an SQLite
    store's thread here; a Redis or Postgres store's pool likewise)."""
    from factorial_tokens.store import SQLiteStore

    before = set(threading.enumerate())
    stm = SyncTokenManager(app_for(tsim), lambda: SQLiteStore(tmp_path / "t.db"))
    stm.tenants()
    stm.close()
    started = [t for t in threading.enumerate() if t not in before and t.name.startswith("factorial-tokens")]
    for thread in started:
        thread.join(2.0)  # an executor shut down lets its idle thread go at once
    assert [t.name for t in started if t.is_alive()] == [], "the factory's store was never closed"


def test_the_exit_hook_closes_every_facade_though_one_fails_to_close(
    tsim: FakeFactorial, tmp_path: Path
) -> None:
    """At exit every facade is closed in turn; one whose close raised (its store would not
    close) left the facades after it open, their threads and connections running."""
    from factorial_tokens import StoreUnavailable
    from factorial_tokens.store import SQLiteStore
    from factorial_tokens.sync import _close_all

    class Stuck(SQLiteStore):
        async def aclose(self) -> None:
            await super().aclose()
            raise StoreUnavailable("the store would not close")

    failing = SyncTokenManager(app_for(tsim), lambda: Stuck(tmp_path / "a.db"))
    other = SyncTokenManager(app_for(tsim), f"sqlite:///{tmp_path / 'b.db'}")
    failing.tenants()
    other.tenants()
    _close_all()
    assert failing.closed and other.closed

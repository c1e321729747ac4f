"""SQLiteStore: the store contract in one SQLite file, shared by the processes of one host.

Every check-and-modify step is one ``BEGIN IMMEDIATE`` transaction, so the contract holds
across processes: SQLite takes the file's write lock at ``BEGIN`` and other writers wait
(up to the busy timeout) instead of failing halfway. Leases, fencing numbers and code
claims live in the file; lease expiry is judged by the wall clock, which the processes of
one host share.

Blocking calls run on one worker thread per store, which owns the store's only
connection, so the event loop never blocks on the disk or on another process's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import attrs

from .._errors import ConfigurationError, StoreUnavailable
from ._contract import ChangeListener, Watch, closed_error
from ._notifier import Notifier
from ._options import choice, seconds, url_options
from ._values import (
    CLAIM_RETENTION,
    Acquisition,
    ClaimState,
    CodeClaim,
    Freshness,
    Lease,
    Record,
    TenantKey,
    ThrottleState,
    Update,
    hold_digest,
    record_from_columns,
)

__all__ = ["SQLiteStore"]

log = logging.getLogger("factorial_tokens.sqlite")

T = TypeVar("T")

#: The schema this code writes; a file with a higher version was written by a newer release.
SCHEMA_VERSION = 1

#: How long change-log rows are kept (seconds); a poller that falls further behind wakes everyone.
_CHANGES_KEPT = 120.0

#: How often (seconds, at most) a store prunes claims past their retention.
_PRUNE_EVERY = 60.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS tenants (
        namespace TEXT NOT NULL,
        tenant TEXT NOT NULL,
        digest TEXT NOT NULL,
        payload BLOB,
        status TEXT,
        version INTEGER NOT NULL DEFAULT 0,
        expires_at REAL,
        updated_at REAL,
        fence INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_expires REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (namespace, tenant)
    )""",
    """CREATE TABLE IF NOT EXISTS claims (
        namespace TEXT NOT NULL,
        code_hash TEXT NOT NULL,
        tenant TEXT NOT NULL,
        owner TEXT NOT NULL,
        state TEXT NOT NULL,
        expires REAL NOT NULL,
        outcome TEXT,
        PRIMARY KEY (namespace, code_hash)
    )""",
    """CREATE TABLE IF NOT EXISTS changes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        digest TEXT NOT NULL,
        at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS changes_at ON changes (at)",
)

_SYNCHRONOUS = ("off", "normal", "full", "extra")
#: Options of an sqlite URL, and the constructor arguments they set.
#: The longest busy timeout taken, in seconds.
_LONGEST_BUSY_TIMEOUT = 86400.0

_URL_OPTIONS = {"timeout": seconds, "poll": seconds, "synchronous": choice(*_SYNCHRONOUS)}
_URL_NAMES = {"timeout": "busy_timeout", "poll": "poll_interval"}
_FINISHED = (ClaimState.DONE.value, ClaimState.FAILED.value)


class SQLiteStore:
    """A token store in one SQLite file (``sqlite:///relative.db``, ``sqlite:////abs/path.db``).

    The embedded default: every process of one host that opens the same file shares
    leases, fencing numbers, token records and code claims, with the same guarantees as
    the networked stores. The file and its tables are created on first use (schema
    version in the ``meta`` table), safely when several processes start at once.

    Args:
        path: the database file; a relative path is resolved against the current
            directory when the store is built.
        busy_timeout: how long (seconds) a write waits for another process's write lock
            before failing with StoreUnavailable.
        poll_interval: how often (seconds, jittered +-50%) the store looks for other
            processes' writes while anyone watches.
        synchronous: SQLite's ``synchronous`` setting; ``full`` (default) makes every
            committed refresh survive a power cut, ``normal`` is faster and survives
            process crashes only.

    Writes of this store wake its own watchers at once. Writes of other processes are
    seen by a poll of ``PRAGMA data_version`` every ``poll_interval``: when the file
    changed, the store reads its ``changes`` log to learn which tenants changed, wakes
    their watchers and tells its ``on_change`` listeners (so managers drop stale cached
    tokens). The bound on a cross-process wake-up is thus about ``1.5 * poll_interval``
    plus the time to take the file's read lock. A lease whose holder died announces
    nothing; waiters re-check at least every second, so they take over soon after it
    expires.

    Limitations: one host only (the lease clock is the host's wall clock, and SQLite's
    locks do not work over NFS or other network file systems: never put the file on
    one); wake-ups across processes are poll-based, not pushed; writes of all processes
    are serialized on the file's lock; an ``await`` cancelled while its statement runs
    does not undo it (a lease so taken lapses after its TTL); a step of the wall clock
    shortens or stretches the leases running at that moment (fencing still refuses a
    stale holder's write).
    """

    acquires_unless_fresh = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        poll_interval: float = 0.05,
        synchronous: str = "full",
    ) -> None:
        raw = os.fspath(path)
        if not raw or raw == ":memory:" or raw.startswith("file:"):
            raise ConfigurationError(
                "SQLiteStore needs a file path (sqlite:///tokens.db); for one process use memory://"
            )
        if "\0" in raw:
            raise ConfigurationError("SQLiteStore's path holds a NUL character")
        if not (0 < busy_timeout < math.inf and 0 < poll_interval < math.inf):
            raise ConfigurationError("busy_timeout and poll_interval must be > 0 (finite numbers of seconds)")
        if busy_timeout > _LONGEST_BUSY_TIMEOUT:
            # SQLite keeps it in milliseconds in a 32-bit int (about 24.8 days): more overflows.
            raise ConfigurationError(f"busy_timeout must be at most a day ({_LONGEST_BUSY_TIMEOUT:g} s)")
        if synchronous.lower() not in _SYNCHRONOUS:
            raise ConfigurationError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}")
        self.path = os.path.abspath(raw)
        self.busy_timeout = float(busy_timeout)
        self.poll_interval = float(poll_interval)
        self.synchronous = synchronous.lower()
        self._pid = os.getpid()
        self._executor = _executor()
        self._conn: sqlite3.Connection | None = None  # used only on the executor's thread
        self._inherited: list[sqlite3.Connection] = []
        self._last_prune = 0.0  # executor's thread only
        # A dead lease holder announces nothing: waiters re-check at least this often.
        self._notifier = Notifier(poll=max(1.0, 10 * self.poll_interval))
        self._poller: asyncio.Task[None] | None = None
        self._baseline: asyncio.Event | None = None  # set once the poller read its starting point
        self._own_changes: set[int] = set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        """Build from ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.

        Options as query parameters: ``timeout`` (busy timeout, seconds), ``poll``
        (cross-process poll interval, seconds), ``synchronous`` (off, normal, full, extra).
        Raises ConfigurationError for a URL without a path, with a host, or with an
        unknown or malformed option.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() != "sqlite":
            raise ConfigurationError(f"not an sqlite:// URL: {parts.scheme}://")
        if "#" in url:
            # urlsplit would drop what follows, and open another file than the one named.
            raise ConfigurationError("an sqlite URL's path holds a '#': write it as %23")
        if parts.netloc and parts.netloc != "localhost":
            raise ConfigurationError(
                "an sqlite URL names a local file: sqlite:///relative.db or sqlite:////absolute.db"
            )
        path = unquote(parts.path)
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise ConfigurationError("an sqlite URL needs a file path, e.g. sqlite:///tokens.db")
        options, _ = url_options(url, _URL_OPTIONS, store="sqlite", rename=_URL_NAMES)
        return cls(path, **options)

    def __repr__(self) -> str:
        return f"SQLiteStore(path={self.path!r})"

    # -- the worker thread ---------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on the store's thread; sqlite3 errors become StoreUnavailable."""
        if self._closed:
            raise closed_error("SQLite", f" at {self.path}")
        if self._pid != os.getpid():
            self._after_fork()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, fn, args)
        except RuntimeError as exc:  # the executor was shut down under us
            raise closed_error("SQLite", f" at {self.path}") from exc

    def _after_fork(self) -> None:
        """Built before a fork (a pre-loading server): start afresh in the child.

        The parent's worker thread does not exist here, and SQLite forbids using a
        connection across a fork; closing it could disturb the parent's locks, so it
        is kept, unused, for the life of the process.
        """
        self._pid = os.getpid()
        self._executor = _executor()
        if self._conn is not None:
            self._inherited.append(self._conn)
            self._conn = None
        self._poller = None
        self._baseline = None

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            conn = self._conn if self._conn is not None else self._open()
            try:
                return fn(conn, *args)
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.rollback()
                raise
        except sqlite3.Error as exc:
            if not isinstance(exc, sqlite3.OperationalError) or "locked" not in str(exc):
                self._drop_connection()  # reopen on the next call: recovery without restart
            raise StoreUnavailable(f"SQLite store at {self.path}: {exc}") from exc

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _open(self) -> sqlite3.Connection:
        # Created 0600 before SQLite sees it: SQLite gives the -wal and -shm files the
        # database file's permissions, so all three stay private to the owner.
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            with contextlib.suppress(OSError):
                mode = os.stat(self.path).st_mode & 0o777
                if mode & 0o077:
                    log.warning("%s is accessible to group or others (mode %04o)", self.path, mode)
        except OSError:
            pass  # sqlite3.connect below reports it
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            self._retry_locked(lambda: self._set_wal(conn))
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            self._retry_locked(lambda: self._create_schema(conn))
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _retry_locked(self, step: Callable[[], None]) -> None:
        """Run a setup step, retrying while another process holds a lock SQLite will not wait on."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                step()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL mode (got {mode})")

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        found = _schema_version(conn)
        if found == SCHEMA_VERSION:
            return
        self._check_version(found)
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Again under the write lock: another process may have created it meanwhile. A
            # schema this release does not know is refused before anything is written.
            self._check_version(_schema_version(conn))
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            found = _schema_version(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.rollback()
            raise
        self._check_version(found)

    def _check_version(self, found: int | None) -> None:
        """Refuse a schema version other than this release's (``None``: none yet)."""
        if found is not None and found != SCHEMA_VERSION:
            raise ConfigurationError(
                f"{self.path} holds token store schema version {found}; this release reads "
                f"version {SCHEMA_VERSION} (upgrade factorial-tokens)"
            )

    # -- the contract --------------------------------------------------------------

    async def read(self, key: TenantKey) -> Record | None:
        """Return the tenant's record, or ``None``."""
        return await self._run(_read, key)

    async def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Acquisition:
        """Take the tenant's lease if free or expired, with the next fencing number; with
        ``unless_fresh``, only if the record is due (a fresh one costs a read, no write)."""
        return await self._run(_acquire, key, owner, ttl, unless_fresh)

    async def extend(self, lease: Lease, ttl: float) -> bool:
        """Push the lease's expiry to ``ttl`` from now, if ``lease`` is still current."""
        return await self._run(_extend, lease, ttl)

    async def release(self, lease: Lease) -> bool:
        """Give the lease back (owner- and fence-checked) and announce."""
        change = await self._run(_release, lease)
        return self._announce(lease.key.digest, change)

    async def commit(self, lease: Lease, update: Update) -> Record | None:
        """Write ``update`` if ``lease`` is still current, release and announce; else ``None``."""
        result = await self._run(_commit, lease, update)
        if result is None:
            return None
        record, change = result
        self._announce(lease.key.digest, change)
        return record

    async def replace(self, key: TenantKey, update: Update | None) -> None:
        """Write ``update`` (``None`` forgets the tenant), fence out any holder, announce."""
        change = await self._run(_replace, key, update)
        self._announce(key.digest, change)

    async def hold(self, namespace: str, until: float) -> float:
        """Raise the app's "not before" instant to ``until`` if later (and announce it)."""
        not_before, change = await self._run(_hold, namespace, until)
        if change is not None:
            self._announce(hold_digest(namespace), change)
        return not_before

    async def admit(self, namespace: str, ticket: str, interval: float, burst: int) -> float:
        """Seconds to wait before a provider call (the hold, or the shared budget); 0: admitted."""
        return await self._run(_admit, namespace, ticket, interval, burst)

    async def claim_code(self, key: TenantKey, code_hash: str, owner: str, ttl: float) -> CodeClaim:
        """Claim a code if unclaimed (or its CLAIMED claim expired); else report the claim."""
        return await self._run(self._claim_code, key, code_hash, owner, ttl)

    def _claim_code(
        self, conn: sqlite3.Connection, key: TenantKey, code_hash: str, owner: str, ttl: float
    ) -> CodeClaim:
        now = time.time()
        with _immediate(conn):
            if now - self._last_prune >= _PRUNE_EVERY:
                # Finished claims go after CLAIM_RETENTION; unfinished ones a retention
                # after their deadline, so a dead SENT claim is reported in doubt all day.
                conn.execute(
                    "DELETE FROM claims WHERE expires <= ? - CASE WHEN state IN (?, ?) THEN 0 ELSE ? END",
                    (now, *_FINISHED, CLAIM_RETENTION),
                )
                self._last_prune = now
            row = conn.execute(
                "SELECT tenant, owner, state, expires, outcome FROM claims "
                "WHERE namespace = ? AND code_hash = ?",
                (key.namespace, code_hash),
            ).fetchone()
            if row is None or (row[2] == ClaimState.CLAIMED.value and _number(row[3], "code claim") <= now):
                conn.execute(
                    "INSERT OR REPLACE INTO claims "
                    "(namespace, code_hash, tenant, owner, state, expires, outcome) "
                    "VALUES (?, ?, ?, ?, ?, ?, NULL)",
                    (key.namespace, code_hash, key.tenant, owner, ClaimState.CLAIMED.value, now + ttl),
                )
                return CodeClaim(key, code_hash, owner, ClaimState.CLAIMED, won=True)
        tenant, held_by, state, expires, outcome = row
        try:
            claim_state = ClaimState(state)
        except ValueError:
            raise StoreUnavailable("the SQLite store holds a malformed code claim") from None
        expires = _number(expires, "code claim")
        expired = claim_state in (ClaimState.CLAIMED, ClaimState.SENT) and expires <= now
        return CodeClaim(
            TenantKey(key.namespace, tenant),
            code_hash,
            owner,
            claim_state,
            held_by == owner,
            expired,
            outcome,
        )

    async def advance_code(
        self, claim: CodeClaim, state: ClaimState, ttl: float, outcome: str | None = None
    ) -> bool:
        """Move an owned claim to ``state`` and announce on its tenant; False if not ours."""
        result = await self._run(_advance_code, claim, state, ttl, outcome)
        if result is None:
            return False
        digest, change = result
        self._announce(digest, change)
        return True

    async def tenants(self, namespace: str) -> list[Record]:
        """Every tenant record of ``namespace`` (forgotten tenants excluded)."""
        return await self._run(_tenants, namespace)

    async def check(self) -> None:
        """Open the file (creating the schema if needed); raise StoreUnavailable on failure."""
        await self._run(_check)

    async def aclose(self) -> None:
        """Stop polling and close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        poller, self._poller = self._poller, None
        if poller is not None and not poller.done() and poller.get_loop() is asyncio.get_running_loop():
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreUnavailable):
                await poller
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._drop_connection)
        self._executor.shutdown(wait=False)

    # -- notifications -------------------------------------------------------------

    def watch(self, key: TenantKey) -> AbstractAsyncContextManager[Watch]:
        """Register for changes of ``key``, this process's and (by polling) other processes'."""
        return self._watch(key)

    @asynccontextmanager
    async def _watch(self, key: TenantKey) -> AsyncIterator[Watch]:
        async with self._notifier.watch(key) as watch:
            self._ensure_poller()
            baseline = self._baseline
            if baseline is not None and not baseline.is_set():
                # Registering must miss nothing: another process's write made before the
                # poller read its starting point would never be announced.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(baseline.wait()), self.busy_timeout)
            yield watch

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        """Call ``callback(digest)`` on every change, this process's and other processes'."""
        unsubscribe = self._notifier.on_change(callback)
        self._ensure_poller()
        return unsubscribe

    def _announce(self, digest: str, change: int | None) -> bool:
        if change is None:
            return False
        if self._poller is not None:
            self._own_changes.add(change)  # the poller need not announce it again
        self._notifier.notify(digest)
        return True

    def _ensure_poller(self) -> None:
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on a loop yet: the next watch() starts it
        poller = self._poller
        if poller is not None and not poller.done() and poller.get_loop() is loop:
            return
        # None yet, or left behind by an event loop that is gone (one asyncio.run after another).
        self._baseline = asyncio.Event()
        self._poller = loop.create_task(
            self._poll(self._baseline), name="factorial-tokens-sqlite-poll", context=contextvars.Context()
        )

    async def _poll(self, baseline: asyncio.Event) -> None:
        """While anyone watches: look for other processes' writes and announce them.

        ``baseline`` is set once the first starting point was read (or could not be).
        """
        me = asyncio.current_task()
        try:
            version, last = -1, -1
            while self._notifier.watching and not self._closed:
                try:
                    if last < 0:
                        try:
                            version, last = await self._run(_poll_start)
                        finally:
                            baseline.set()
                        self._own_changes.clear()
                    await asyncio.sleep(self.poll_interval * random.uniform(0.5, 1.5))
                    version, last, digests, complete = await self._run(_poll_changes, version, last)
                except StoreUnavailable as exc:
                    log.warning("cannot poll %s for changes (%s); retrying", self.path, exc)
                    last = -1  # changes may be missed: start over and wake everyone
                    self._notifier.notify_all()
                    await asyncio.sleep(max(1.0, self.poll_interval))
                    continue
                # (The notifier guards each listener: one's bug stops nobody's wake-up.)
                if not complete:
                    self._notifier.notify_all()
                for change, digest in digests:
                    if change in self._own_changes:
                        self._own_changes.discard(change)
                    else:
                        self._notifier.notify(digest)
                if len(self._own_changes) > 4096:
                    # Alone on the file, nobody else's write makes the poller read ours:
                    # forget them (at worst a few redundant announcements later).
                    self._own_changes.clear()
        finally:
            baseline.set()
            if self._poller is me:
                self._poller = None


def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="factorial-tokens-sqlite")


# -- statements (run on the store's thread) ----------------------------------------


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that holds the file's write lock from its first statement."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.execute("COMMIT")


def _schema_version(conn: sqlite3.Connection) -> int | None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    if row is None:
        return None
    try:
        return int(row[0])
    except (TypeError, ValueError):
        # A damaged row: sqlite3 errors and this one are the store's StoreUnavailable.
        raise sqlite3.DatabaseError("the meta table's schema_version is not a number") from None


def _record(key: TenantKey, row: tuple[Any, ...]) -> Record | None:
    return record_from_columns(key, *row[:5])


def _number(value: object, what: str) -> float:
    """A numeric column's value. SQLite keeps whatever was written: a tampered one (text,
    a blob) is a typed error, not a comparison's TypeError."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    raise StoreUnavailable(f"the SQLite store holds a malformed {what}")


def _log_change(conn: sqlite3.Connection, digest: str) -> int:
    now = time.time()
    change = conn.execute("INSERT INTO changes (digest, at) VALUES (?, ?)", (digest, now)).lastrowid
    assert change is not None
    if change % 256 == 0:
        conn.execute("DELETE FROM changes WHERE at < ?", (now - _CHANGES_KEPT,))
    return change


def _read(conn: sqlite3.Connection, key: TenantKey) -> Record | None:
    row = conn.execute(
        "SELECT payload, status, version, expires_at, updated_at FROM tenants "
        "WHERE namespace = ? AND tenant = ?",
        (key.namespace, key.tenant),
    ).fetchone()
    return None if row is None else _record(key, row)


_LEASE_ROW = (
    "SELECT payload, status, version, expires_at, updated_at, fence, lease_owner, lease_expires "
    "FROM tenants WHERE namespace = ? AND tenant = ?"
)


def _acquire(
    conn: sqlite3.Connection, key: TenantKey, owner: str, ttl: float, unless_fresh: Freshness | None
) -> Acquisition:
    if unless_fresh is not None:
        # Judged outside the write lock first: a fresh record costs a read, as ``read`` does.
        row = conn.execute(_LEASE_ROW, (key.namespace, key.tenant)).fetchone()
        record = None if row is None else _record(key, row)
        if not unless_fresh.due(record) and not (row is not None and row[6] == owner):
            return Acquisition(None, record)
    with _immediate(conn):
        now = time.time()
        row = conn.execute(_LEASE_ROW, (key.namespace, key.tenant)).fetchone()
        record = None if row is None else _record(key, row)
        held = row is not None and row[6] is not None and _number(row[7], "lease") > now
        if held and row[6] == owner:
            # A replay: owner tokens are unique per call, so this lease is the caller's own.
            return Acquisition(Lease(key, owner, int(_number(row[5], "lease"))), record)
        if unless_fresh is not None and not unless_fresh.due(record):
            return Acquisition(None, record)  # written meanwhile: fresh (or gone) now
        if held:
            return Acquisition(None, record)
        fence = conn.execute(
            "INSERT INTO tenants (namespace, tenant, digest, fence, lease_owner, lease_expires) "
            "VALUES (?, ?, ?, 1, ?, ?) "
            "ON CONFLICT (namespace, tenant) DO UPDATE SET "
            "fence = fence + 1, lease_owner = excluded.lease_owner, lease_expires = excluded.lease_expires "
            "RETURNING fence",
            (key.namespace, key.tenant, key.digest, owner, now + ttl),
        ).fetchone()[0]
    return Acquisition(Lease(key, owner, int(fence)), record)


def _extend(conn: sqlite3.Connection, lease: Lease, ttl: float) -> bool:
    cursor = conn.execute(
        "UPDATE tenants SET lease_expires = ? "
        "WHERE namespace = ? AND tenant = ? AND fence = ? AND lease_owner = ?",
        (time.time() + ttl, lease.key.namespace, lease.key.tenant, lease.fence, lease.owner),
    )
    return cursor.rowcount == 1


def _release(conn: sqlite3.Connection, lease: Lease) -> int | None:
    with _immediate(conn):
        cursor = conn.execute(
            "UPDATE tenants SET lease_owner = NULL "
            "WHERE namespace = ? AND tenant = ? AND fence = ? AND lease_owner = ?",
            (lease.key.namespace, lease.key.tenant, lease.fence, lease.owner),
        )
        if cursor.rowcount != 1:
            # A replay finds its own release done: same fence, nobody holding.
            done = conn.execute(
                "SELECT 1 FROM tenants WHERE namespace = ? AND tenant = ? AND fence = ? "
                "AND lease_owner IS NULL",
                (lease.key.namespace, lease.key.tenant, lease.fence),
            ).fetchone()
            return None if done is None else _log_change(conn, lease.key.digest)
        return _log_change(conn, lease.key.digest)


def _commit(conn: sqlite3.Connection, lease: Lease, update: Update) -> tuple[Record, int] | None:
    key = lease.key
    with _immediate(conn):
        row = conn.execute(
            "UPDATE tenants SET payload = ?, status = ?, expires_at = ?, updated_at = ?, "
            "version = version + 1, lease_owner = NULL "
            "WHERE namespace = ? AND tenant = ? AND fence = ? AND lease_owner = ? "
            "RETURNING payload, status, version, expires_at, updated_at",
            (
                update.payload,
                update.status.value,
                update.expires_at,
                update.updated_at,
                key.namespace,
                key.tenant,
                lease.fence,
                lease.owner,
            ),
        ).fetchone()
        if row is None:
            # A replay finds its own write: same fence, nobody holding, the same values.
            row = conn.execute(
                "SELECT payload, status, version, expires_at, updated_at FROM tenants "
                "WHERE namespace = ? AND tenant = ? AND fence = ? AND lease_owner IS NULL "
                "AND payload = ? AND status = ? AND expires_at IS ? AND updated_at = ?",
                (key.namespace, key.tenant, lease.fence, *_columns(update)),
            ).fetchone()
            if row is None:
                return None
        change = _log_change(conn, key.digest)
    record = _record(key, row)
    assert record is not None
    return record, change


def _replace(conn: sqlite3.Connection, key: TenantKey, update: Update | None) -> int | None:
    values = (None, None, None, None) if update is None else _columns(update)
    with _immediate(conn):
        # A replay (or forgetting an unknown tenant) finds it already done: nothing to write,
        # nobody to fence out, no row left behind.
        done = conn.execute(
            "SELECT 1 FROM tenants WHERE namespace = ? AND tenant = ? AND lease_owner IS NULL "
            "AND payload IS ? AND status IS ? AND expires_at IS ? AND updated_at IS ?",
            (key.namespace, key.tenant, *values),
        ).fetchone()
        known = (
            done is not None
            or conn.execute(
                "SELECT 1 FROM tenants WHERE namespace = ? AND tenant = ?", (key.namespace, key.tenant)
            ).fetchone()
        )
        if done is not None or (update is None and known is None):
            return None
        conn.execute(
            "INSERT INTO tenants (namespace, tenant, digest, payload, status, expires_at, updated_at, "
            "version, fence) VALUES (?, ?, ?, ?, ?, ?, ?, 1, 1) "
            "ON CONFLICT (namespace, tenant) DO UPDATE SET "
            "payload = excluded.payload, status = excluded.status, expires_at = excluded.expires_at, "
            "updated_at = excluded.updated_at, version = version + 1, fence = fence + 1, "
            "lease_owner = NULL",
            (key.namespace, key.tenant, key.digest, *values),
        )
        return _log_change(conn, key.digest)


def _columns(update: Update) -> tuple[bytes, str, float | None, float]:
    return update.payload, update.status.value, update.expires_at, update.updated_at


def _advance_code(
    conn: sqlite3.Connection, claim: CodeClaim, state: ClaimState, ttl: float, outcome: str | None
) -> tuple[str, int] | None:
    with _immediate(conn):
        row = conn.execute(
            "SELECT tenant, owner, state FROM claims WHERE namespace = ? AND code_hash = ?",
            (claim.key.namespace, claim.code_hash),
        ).fetchone()
        if row is not None and row[1] == claim.owner and row[2] == state.value:
            # A replay of the step already made.
            done = conn.execute(
                "SELECT 1 FROM claims WHERE namespace = ? AND code_hash = ? AND outcome IS ?",
                (claim.key.namespace, claim.code_hash, outcome),
            ).fetchone()
            digest = TenantKey(claim.key.namespace, row[0]).digest
            return None if done is None else (digest, _log_change(conn, digest))
        if row is None or row[1] != claim.owner or row[2] in _FINISHED:
            return None
        if state is ClaimState.SENT and row[2] != ClaimState.CLAIMED.value:
            return None
        expires = time.time() + (ttl if state is ClaimState.SENT else CLAIM_RETENTION)
        conn.execute(
            "UPDATE claims SET state = ?, outcome = ?, expires = ? WHERE namespace = ? AND code_hash = ?",
            (state.value, outcome, expires, claim.key.namespace, claim.code_hash),
        )
        digest = TenantKey(claim.key.namespace, row[0]).digest
        return digest, _log_change(conn, digest)


def _throttle(conn: sqlite3.Connection, namespace: str) -> ThrottleState:
    # Kept in ``meta`` (one row per app), so the schema needs no new table.
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (f"throttle:{namespace}",)).fetchone()
    return ThrottleState.decode(None if row is None else str(row[0]))


def _set_throttle(conn: sqlite3.Connection, namespace: str, state: ThrottleState) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (f"throttle:{namespace}", state.encode()),
    )


def _hold(conn: sqlite3.Connection, namespace: str, until: float) -> tuple[float, int | None]:
    with _immediate(conn):
        state = _throttle(conn, namespace)
        if until <= state.not_before:
            return state.not_before, None
        _set_throttle(conn, namespace, attrs.evolve(state, not_before=until))
        return until, _log_change(conn, hold_digest(namespace))


def _admit(conn: sqlite3.Connection, namespace: str, ticket: str, interval: float, burst: int) -> float:
    with _immediate(conn):
        state = _throttle(conn, namespace)
        wait, after = state.admit(time.time(), ticket, interval, burst)
        if after != state:
            _set_throttle(conn, namespace, after)
        return wait


def _tenants(conn: sqlite3.Connection, namespace: str) -> list[Record]:
    rows = conn.execute(
        "SELECT tenant, payload, status, version, expires_at, updated_at FROM tenants "
        "WHERE namespace = ? AND payload IS NOT NULL",
        (namespace,),
    ).fetchall()
    records = []
    for row in rows:
        if not isinstance(row[0], str):  # a tenant column tampered with (a blob): not a tenant
            log.warning("the SQLite store holds a row whose tenant id is not text; skipped")
            continue
        record = _record(TenantKey(namespace, row[0]), row[1:])
        if record is not None:
            records.append(record)
    return records


def _check(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT count(*) FROM meta").fetchone()


def _poll_start(conn: sqlite3.Connection) -> tuple[int, int]:
    version = conn.execute("PRAGMA data_version").fetchone()[0]
    last = conn.execute("SELECT coalesce(max(id), 0) FROM changes").fetchone()[0]
    return int(version), int(last)


def _poll_changes(
    conn: sqlite3.Connection, version: int, last: int
) -> tuple[int, int, list[tuple[int, str]], bool]:
    """``(data_version, last change id, [(id, digest)] since, complete)``; cheap when unchanged."""
    now_version = int(conn.execute("PRAGMA data_version").fetchone()[0])
    if now_version == version:
        return version, last, [], True
    rows = conn.execute("SELECT id, digest FROM changes WHERE id > ? ORDER BY id", (last,)).fetchall()
    changes = [(int(change), str(digest)) for change, digest in rows]
    # Ids are handed out in order and never reused: a hole after ``last`` means rows were
    # trimmed before this poller read them.
    complete = not changes or changes[0][0] == last + 1
    return now_version, (changes[-1][0] if changes else last), changes, complete

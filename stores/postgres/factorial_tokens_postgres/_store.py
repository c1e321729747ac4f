"""PostgresStore: the token store contract on PostgreSQL, through asyncpg.

Every primitive is ONE statement on a pooled connection (autocommit): a row-level
compare-and-set (``UPDATE ... WHERE ... RETURNING`` or ``INSERT ... ON CONFLICT DO UPDATE
... WHERE ... RETURNING``) whose announcement (``pg_notify``) rides in the same statement,
so it is sent exactly when the write commits. No transaction and no connection is held
between primitives, hence never across a provider call. Lease expiry is judged by the
database's clock (``clock_timestamp()``), never the client's. Reads, acquisitions, commits
and releases issued in one turn of the event loop go as one such statement per kind, over
arrays (``Batcher``); each row is still fenced, and each caller gets its own answer.

Wake-ups: one dedicated LISTEN connection per store, started when the first watcher or
change listener registers, re-listening after any reconnect (then waking every watcher,
since messages may have been lost), plus a jittered poll as the fallback. In PgBouncer
mode (transaction pooling) there is no LISTEN: wake-ups come from this process's own
writes and from a shorter poll.

Limitations: a worker paused beyond its lease may still have one provider request in
flight (fencing keeps its answer from being written). Forgotten tenants keep a tombstone
row so their fence keeps growing.
"""

# Identifiers in the SQL below come only from ``Names`` (validated, then double-quoted);
# every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import math
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]

from factorial_tokens import ConfigurationError, InvalidTenant, StoreUnavailable
from factorial_tokens.store import (
    CLAIM_RETENTION,
    Acquisition,
    Batcher,
    ChangeListener,
    ClaimState,
    CodeClaim,
    Freshness,
    Lease,
    Notifier,
    OrphanLeases,
    PushListener,
    Record,
    TenantKey,
    TenantStatus,
    ThrottleState,
    Update,
    Watch,
    closed_error,
    flag,
    hold_digest,
    integer,
    number,
    text,
    url_options,
)

from ._schema import SCHEMA_VERSION, Names, migrations

__all__ = ["PostgresStore"]

log = logging.getLogger("factorial_tokens.postgres")

T = TypeVar("T")

#: How many times an admission refused while the budget row changed under it is asked again.
_ADMIT_TRIES = 3

#: Everything the driver raises for a failing backend.
_FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)
#: Connection-level failures: the statement may not have run (or its answer was lost);
#: a retry on another connection is safe because every statement tolerates a replay.
#: (asyncpg reports a connection killed under it in several ways, including "another
#: operation is in progress" internal errors.) A deadlock victim was rolled back whole.
_RETRYABLE: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
)
#: Client-side mistakes that a retry cannot fix.
_NOT_RETRYABLE: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.ClientConfigurationError,
)
_CLOSE_FAILURES: tuple[type[BaseException], ...] = (*_FAILURES, asyncio.CancelledError)
#: What a starter's CREATE ... IF NOT EXISTS raises when it did not see another's work.
_CREATE_RACES: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.UniqueViolationError,
    asyncpg.exceptions.DuplicateSchemaError,
    asyncpg.exceptions.DuplicateTableError,
    asyncpg.exceptions.DuplicateObjectError,
)
_MIGRATE_ATTEMPTS = 3
#: How long giving a connection back may take (the server confirming a cancelled
#: statement) before the connection is closed instead.
_RELEASE_TIMEOUT = 5.0
#: A TimeoutError this much earlier than acquire_timeout came from connecting, not waiting.
_CLOCK_SLACK = 0.01
#: A database name as shown in errors (anything else may be a piece of a mangled password).
_DATABASE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,63}|\?")
_ATTEMPTS = 3
_COMMIT_ATTEMPTS = 6
#: Options of ours in a store URL (removed before the URL reaches asyncpg).
_URL_OPTIONS = {
    "schema": text,
    "table_prefix": text,
    "pgbouncer": flag,
    "poll": number,
    "min_size": integer,
    "max_size": integer,
    "command_timeout": number,
    "connect_timeout": number,
    "acquire_timeout": number,
    "migrate": flag,
}
_PRUNE_EVERY = 600.0
#: Batching: at most this many reads (or commits) in one statement, and this many such
#: statements of each kind in flight; what comes meanwhile waits for the next batch.
_BATCH_SIZE = 500
_BATCHES_IN_FLIGHT = 2
#: A commit's notice rides in its NOTIFY (at most 8000 bytes) in hex up to this size.
_NOTICE_MAX = 3800
#: A batch failing with one of these may be one item's fault (a value the database
#: refuses): each item then runs alone, so the others are not failed for it.
_ITEM_FAULTS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
)
#: What a missing schema answers (migrate=false); a conditional acquire writes nothing for
#: an absent record.
_READS = frozenset({"read", "tenants", "check", "acquire_if_due"})


class PostgresStore:
    """A token store in PostgreSQL (``postgresql://`` and ``postgres://``), shared by any
    number of processes and hosts.

    Args:
        pool: a ready ``asyncpg`` pool (not closed by :meth:`aclose`); or
        dsn: a libpq-style URL to build a pool from (closed by :meth:`aclose`).
        schema: the schema holding the tables (created if missing).
        table_prefix: prepended to every table name, to share one schema.
        pgbouncer: PgBouncer transaction-pooling mode: no LISTEN, no prepared statement
            cache, no session state; wake-ups by a shorter poll.
        poll: the fallback poll period (seconds); default 1.0, or 0.25 with ``pgbouncer``.
        min_size, max_size, command_timeout, connect_timeout: for the pool built from ``dsn``.
        acquire_timeout: how long a store call waits for a free connection of the pool
            (built or injected) before it raises StoreUnavailable.
        migrate: create or upgrade the schema on first use (the default). With ``False``
            (for read-only tools) a schema that does not exist yet reads as empty and is
            not created (a write then raises StoreUnavailable); a schema at another
            version than this package's raises ConfigurationError.

    Every backend failure raises :class:`~factorial_tokens.StoreUnavailable`; a connection
    lost mid-statement is retried on a fresh connection first (each statement is safe to
    replay). Bad names raise :class:`~factorial_tokens.ConfigurationError`.
    """

    acquires_unless_fresh = True

    def __init__(
        self,
        pool: Any = None,
        *,
        dsn: str | None = None,
        schema: str = "factorial_tokens",
        table_prefix: str = "",
        pgbouncer: bool = False,
        poll: float | None = None,
        min_size: int = 0,
        max_size: int = 10,
        command_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        acquire_timeout: float = 10.0,
        migrate: bool = True,
    ) -> None:
        if (pool is None) == (dsn is None):
            raise ConfigurationError("PostgresStore needs exactly one of pool= or dsn=")
        if dsn is not None:
            _check_dsn(dsn)
        if poll is not None and poll <= 0:
            raise ConfigurationError("poll must be positive")
        if not acquire_timeout > 0:
            raise ConfigurationError("acquire_timeout must be positive")
        if pool is None and not pgbouncer and max_size < 2:
            raise ConfigurationError("max_size must be at least 2: one connection is kept for LISTEN")
        self._names = Names(schema, table_prefix)
        self._pool: Any = pool
        self._dsn = dsn
        self._owns_pool = pool is None
        self._acquire_timeout = float(acquire_timeout)
        self.pgbouncer = pgbouncer
        self._pool_options: dict[str, Any] = {
            "min_size": int(min_size),
            "max_size": int(max_size),
            "command_timeout": command_timeout,
            "timeout": connect_timeout,
            "statement_cache_size": 0 if pgbouncer else 100,
            "reset": _keep_session,
        }
        self._notifier = Notifier(poll=poll if poll is not None else (0.25 if pgbouncer else 1.0))
        self._init_lock = asyncio.Lock()
        # When opening (pool, schema) last failed, and why: for the calls queued behind it.
        self._open_failed: tuple[float, str] | None = None
        self._migrated = False
        self._migrate_schema = migrate
        self._absent = False  # migrate=False and the schema does not exist (yet)
        self._closed = False
        self._last_prune = -_PRUNE_EVERY
        # Tags this store's NOTIFY payloads: its own writes are announced locally at once,
        # so their echo from the server is ignored (it would only evict fresh caches).
        self._origin = secrets.token_hex(8)
        self._sql = _Statements(self._names, self._origin)
        self._listener = _Listen(self)
        self._changes = _ChangePoll(self)
        # Reads, acquisitions, commits and releases issued in one turn of the loop leave as
        # one statement per kind.
        self._reads: Batcher[TenantKey, Any] = Batcher(
            functools.partial(self._each, self._read_batch),
            concurrency=_BATCHES_IN_FLIGHT,
            size=_BATCH_SIZE,
            cancelled=self._cancelled,
        )
        self._commits: Batcher[tuple[Lease, Update], int | None] = Batcher(
            functools.partial(self._each, self._commit_batch),
            concurrency=_BATCHES_IN_FLIGHT,
            size=_BATCH_SIZE,
            cancelled=self._cancelled,
        )
        self._acquires: Batcher[tuple[TenantKey, str, float], Acquisition] = Batcher(
            functools.partial(self._each, self._acquire_batch),
            concurrency=_BATCHES_IN_FLIGHT,
            size=_BATCH_SIZE,
            cancelled=self._cancelled,
            orphaned=self._won_for_nobody,
        )
        self._acquires_if_due: Batcher[tuple[TenantKey, str, float, Freshness], Acquisition] = Batcher(
            functools.partial(self._each, self._acquire_if_due_batch),
            concurrency=_BATCHES_IN_FLIGHT,
            size=_BATCH_SIZE,
            cancelled=self._cancelled,
            orphaned=self._won_for_nobody,
        )
        # The leases of cancelled callers go in batches of their own: ``aclose`` waits for
        # these and lets them run (a caller's own release after ``aclose`` is refused).
        self._orphan_releases: Batcher[Lease, bool] = Batcher(
            functools.partial(self._each, functools.partial(self._release_batch, closing=True)),
            concurrency=_BATCHES_IN_FLIGHT,
            size=_BATCH_SIZE,
            cancelled=self._cancelled,
        )
        # A lease won for a caller cancelled meanwhile is given back at once, not left to expire.
        self._orphan_leases = OrphanLeases(self._orphan_releases, store="postgres")
        self._releases: Batcher[Lease, bool] = Batcher(
            functools.partial(self._each, self._release_batch),
            concurrency=_BATCHES_IN_FLIGHT,
            size=_BATCH_SIZE,
            cancelled=self._cancelled,
        )

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """Build from ``postgresql://user@host:port/db?schema=...&pgbouncer=true``.

        Options (removed before the URL reaches asyncpg): ``schema``, ``table_prefix``,
        ``pgbouncer``, ``poll``, ``min_size``, ``max_size``, ``command_timeout``,
        ``connect_timeout``, ``acquire_timeout``, ``migrate``. Other query parameters
        (``sslmode``, ...) go to asyncpg.
        """
        _check_dsn(url)  # as given: taking our options out re-encodes what is left
        kwargs, dsn = url_options(url, _URL_OPTIONS, store="postgres", rest=True)
        return cls(dsn=dsn, **kwargs)

    def __repr__(self) -> str:
        return (
            f"PostgresStore(schema={self._names.schema!r}, table_prefix={self._names.table_prefix!r}, "
            f"pgbouncer={self.pgbouncer})"
        )

    @property
    def schema(self) -> str:
        """The schema holding the store's tables."""
        return self._names.schema

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up (always False in PgBouncer mode)."""
        return self._listener.listening

    @property
    def listens(self) -> int:
        """How many times the LISTEN connection was (re)established; for health checks."""
        return self._listener.connections

    # -- plumbing --------------------------------------------------------------------

    async def _ready(self, closing: bool = False) -> Any:
        # ``closing``: the leases of cancelled callers, which ``aclose`` still gives back.
        if self._closed and not (closing and self._pool is not None and self._migrated):
            raise closed_error("Postgres")
        if self._pool is not None and self._migrated:
            return self._pool
        loop = asyncio.get_running_loop()
        queued_at = loop.time()
        async with self._init_lock:
            failed = self._open_failed
            if failed is not None and failed[0] >= queued_at:
                # It failed while this call waited its turn: the same answer, not another wait.
                raise StoreUnavailable(failed[1])
            for attempt in range(_ATTEMPTS):
                try:
                    await self._open()
                    break
                except StoreUnavailable as exc:
                    # No connection came from the pool in time: the calls queued meanwhile
                    # would each wait as long again, one after the other.
                    self._open_failed = (loop.time(), str(exc))
                    raise
                except _FAILURES as exc:
                    # Retried here, holding the lock: the calls queued meanwhile find the
                    # store open, or get this answer (they would each try as long again).
                    if self._last_try(exc, attempt, _ATTEMPTS):
                        message = f"Postgres store{self._where()}: opening failed: {_describe(exc)}"
                        self._open_failed = (loop.time(), message)
                        raise StoreUnavailable(message) from exc
                    log.warning("postgres store: opening failed (%s); retrying", _describe(exc))
                    await asyncio.sleep(_backoff(attempt))
        return self._pool

    async def _open(self) -> None:
        """Create the pool and migrate (or look up) the schema, whichever is not done yet."""
        if self._pool is None:
            try:
                pool = await asyncpg.create_pool(self._dsn, **self._pool_options)
            except ValueError:  # with min_size > 0 it connects, and reads the DSN, here
                raise _unreadable_dsn() from None
            if self._closed:  # aclose came meanwhile, and found no pool to close
                await _close_pool(pool)
                raise closed_error("Postgres")
            self._pool = pool
        if not self._migrated:
            if self._migrate_schema:
                await self._migrate(self._pool)
                self._migrated = True
            else:
                # Looked up again on each use while absent: another process may create it.
                self._absent = not await self._schema_current(self._pool)
                self._migrated = not self._absent

    async def _schema_current(self, pool: Any) -> bool:
        """With ``migrate=False``: True if the schema is at this package's version, False
        if it does not exist; ConfigurationError if it is at another version."""
        n = self._names
        async with self._connection(pool, "opening") as con:
            if not await con.fetchval("SELECT to_regclass($1) IS NOT NULL", n.meta):
                return False
            version = await con.fetchval(f"SELECT value FROM {n.meta} WHERE name = 'schema_version'")
        if version != SCHEMA_VERSION:
            raise ConfigurationError(
                f"Postgres store{self._where()}: schema {n.schema!r} is at version {version}, not "
                f"{SCHEMA_VERSION}, and migrate=false: run a command that writes to migrate it"
            )
        return True

    async def _migrate(self, pool: Any) -> None:
        # A starter that waited on the migration lock may still not see, in its catalog
        # lookups, the schema the previous holder just committed: seen on long-lived server
        # connections that looked the schema up before (always the case behind PgBouncer).
        # Its CREATE ... IF NOT EXISTS then fails on a duplicate; a new transaction sees the
        # other's work (and finds the current version), so start again from the top.
        for attempt in range(_MIGRATE_ATTEMPTS):
            try:
                await self._migrate_once(pool)
                return
            except _CREATE_RACES:
                if attempt + 1 == _MIGRATE_ATTEMPTS:
                    raise
                log.info("postgres store: schema %r created concurrently; checking again", self.schema)

    async def _migrate_once(self, pool: Any) -> None:
        n = self._names
        async with self._connection(pool, "migrating") as con:
            try:
                version = await con.fetchval(f"SELECT value FROM {n.meta} WHERE name = 'schema_version'")
            except (asyncpg.exceptions.UndefinedTableError, asyncpg.exceptions.InvalidSchemaNameError):
                version = None
            if version == SCHEMA_VERSION:
                return
            async with con.transaction():
                # Serializes concurrent starters; released at commit (safe under PgBouncer).
                await con.execute("SELECT pg_advisory_xact_lock($1)", n.lock_key)
                exists = await con.fetchval("SELECT to_regclass($1) IS NOT NULL", n.meta)
                current = 0
                if exists:
                    found = await con.fetchval(f"SELECT value FROM {n.meta} WHERE name = 'schema_version'")
                    current = int(found or 0)
                if current > SCHEMA_VERSION:
                    raise ConfigurationError(
                        f"schema {n.schema!r} is at version {current}, newer than this "
                        f"factorial-tokens-postgres understands ({SCHEMA_VERSION}); upgrade it"
                    )
                steps = migrations(n)
                for target in range(current + 1, SCHEMA_VERSION + 1):
                    for statement in steps[target]:
                        await con.execute(statement)
                    log.info("postgres store: schema %r migrated to version %d", n.schema, target)
                await con.execute(
                    f"INSERT INTO {n.meta} (name, value) VALUES ('schema_version', $1) "
                    "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                    SCHEMA_VERSION,
                )

    @contextlib.asynccontextmanager
    async def _connection(self, pool: Any, op: str) -> AsyncIterator[Any]:
        """A connection of the pool for ``op``; StoreUnavailable if none is free within
        ``acquire_timeout`` (a pool exhausted by its other users, or losing connections)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            con = await pool.acquire(timeout=self._acquire_timeout)
        except ValueError:  # asyncpg could not read the DSN; its words may quote it
            raise _unreadable_dsn() from None
        except TimeoutError:
            if loop.time() - started < self._acquire_timeout - _CLOCK_SLACK:
                raise  # a new connection's own connect_timeout: a failure like any other
            raise StoreUnavailable(
                f"Postgres store{self._where()}: {op} got no connection from the pool in time "
                f"(acquire_timeout={self._acquire_timeout:g} s): all are busy, or the database "
                "accepts no new one"
            ) from None
        try:
            yield con
        finally:
            # The caller gets the body's outcome (its result, error or cancellation); a
            # release that fails (the server slow to confirm a cancelled statement) only
            # closes the connection.
            try:
                await pool.release(con, timeout=_RELEASE_TIMEOUT)
            except _FAILURES as exc:
                log.info("postgres store: a connection could not be given back (%s); closed", _describe(exc))
                with contextlib.suppress(*_FAILURES):
                    con.terminate()

    async def _call(
        self,
        op: str,
        fn: Callable[[Any, bool], Awaitable[T]],
        attempts: int = _ATTEMPTS,
        *,
        closing: bool = False,
    ) -> T:
        """Run ``fn(connection, replay)``; the one place driver errors become StoreUnavailable.

        A connection lost mid-statement is retried on a fresh connection with
        ``replay=True`` (the first attempt may have committed); other failures are not.
        """
        for attempt in range(attempts):
            try:
                pool = await self._ready(closing)
                if self._absent and op not in _READS:
                    raise StoreUnavailable(
                        f"Postgres store{self._where()}: {op} refused: schema {self.schema!r} does not "
                        "exist and this store was opened with migrate=false (read-only)"
                    )
                async with self._connection(pool, op) as con:
                    return await fn(con, attempt > 0)
            except _FAILURES as exc:
                if self._last_try(exc, attempt, attempts):
                    raise StoreUnavailable(
                        f"Postgres store{self._where()}: {op} failed: {_describe(exc)}"
                    ) from exc
                what = (
                    "was a deadlock's victim"
                    if isinstance(exc, asyncpg.exceptions.DeadlockDetectedError)
                    else "lost its connection"
                )
                log.warning("postgres store: %s %s (%s); retrying", op, what, _describe(exc))
                await asyncio.sleep(_backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _last_try(self, exc: BaseException, attempt: int, attempts: int) -> bool:
        """Whether a driver failure ends the call (else it is retried on a fresh
        connection). A failure that came of the caller's cancellation (a rollback the
        server never confirmed, say) raises CancelledError: the caller is cancelled, as it
        asked."""
        if _cancelling():
            raise asyncio.CancelledError() from exc
        retryable = isinstance(exc, _RETRYABLE) and not isinstance(exc, _NOT_RETRYABLE)
        return not retryable or attempt + 1 == attempts or self._closed

    async def _each(self, send: Callable[[list[T]], Awaitable[list[Any]]], items: list[T]) -> list[Any]:
        """``send(items)``, one outcome per item; when the database refused the batch for
        what may be one item's value, each item alone, with its own result or error."""
        try:
            return await send(items)
        except StoreUnavailable as exc:
            if len(items) == 1 or not isinstance(exc.__cause__, _ITEM_FAULTS):
                raise
        log.info("postgres store: a batch of %d was refused; sending each alone", len(items))
        outcomes: list[Any] = []
        for item in items:
            try:
                outcomes.extend(await send([item]))
            except StoreUnavailable as exc:
                outcomes.append(exc)
        return outcomes

    def _cancelled(self) -> StoreUnavailable:
        return StoreUnavailable(f"Postgres store{self._where()}: the batch was cancelled before its answer")

    def _where(self) -> str:
        """`` at host:port/database`` of the store's own DSN, for errors; never a password:
        nothing at all for a DSN that does not split as a URL should (a password with an
        unescaped ``/`` puts its pieces in the port and the path)."""
        if not self._dsn:
            return ""
        try:
            parts = urlsplit(self._dsn)
            host, port, database = parts.hostname or "localhost", parts.port or 5432, parts.path.lstrip("/")
        except ValueError:
            return ""
        if not _DATABASE_NAME.fullmatch(database or "?"):
            return ""
        return f" at {host}:{port}/{database or '?'}"

    def _check_key(self, key: TenantKey) -> None:
        # Postgres text cannot hold NUL; refuse it as a bad id rather than a store failure.
        if "\x00" in key.tenant or "\x00" in key.namespace:
            raise InvalidTenant("tenant ids and namespaces must not contain NUL characters")

    def _announce(self, digest: str) -> None:
        # Our own writes wake this process's watchers at once (LISTEN or not).
        self._notifier.notify(digest)

    # -- primitives ------------------------------------------------------------------

    async def read(self, key: TenantKey) -> Record | None:
        """The tenant's record, or ``None`` (never written, or forgotten).

        Reads issued in one turn of the event loop are sent as one statement."""
        self._check_key(key)
        row = await self._reads(key)
        if row is None:
            return None
        record = _record(key, row)
        self._changes.saw(key.namespace, key.tenant, key.digest, record.version)
        return record

    async def _read_batch(self, keys: list[TenantKey]) -> list[Any]:
        """Each key's row (or ``None``), read in one statement."""

        async def run(con: Any, replay: bool) -> Any:
            if self._absent:
                return []
            return await con.fetch(self._sql.read_many, _rows([[k.namespace, k.tenant] for k in keys]))

        found: list[Any] = [None] * len(keys)
        for row in await self._call("read", run):
            found[row["i"] - 1] = row
        return found

    async def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Acquisition:
        """Take the lease if free or expired (by the database clock), with a new fence;
        also returns the record seen, all in one statement. With ``unless_fresh``, only if
        the record is due (judged in the same statement; a fresh one is not written).

        Acquisitions issued in one turn of the event loop are sent as one statement per
        kind (plain, conditional), each row fenced on its own."""
        self._check_key(key)
        with self._orphan_leases.sending(key, owner):
            if unless_fresh is not None:
                won = await self._acquires_if_due((key, owner, float(ttl), unless_fresh))
            else:
                won = await self._acquires((key, owner, float(ttl)))
        if won.record is not None:
            self._changes.saw(key.namespace, key.tenant, key.digest, won.record.version)
        return won

    def _won_for_nobody(self, _: object, acquisition: Acquisition) -> None:
        """A batch's answer for a caller cancelled while it was out (also while closing:
        ``aclose`` waits for such batches): a lease won is given back."""
        self._orphan_leases.give_back(acquisition.lease)

    async def _acquire_batch(self, items: list[tuple[TenantKey, str, float]]) -> list[Acquisition]:
        """Each plain acquisition's answer, in one statement per round (a key twice waits
        for the next round)."""

        def columns(part: list[tuple[TenantKey, str, float]]) -> str:
            return _rows([[k.namespace, k.tenant, k.digest, owner, repr(ttl)] for k, owner, ttl in part])

        return await self._acquire_rounds("acquire", self._sql.acquire_many, items, columns, tries=3)

    async def _acquire_if_due_batch(
        self, items: list[tuple[TenantKey, str, float, Freshness]]
    ) -> list[Acquisition]:
        """Each conditional acquisition's answer, in one statement per round."""

        def columns(part: list[tuple[TenantKey, str, float, Freshness]]) -> str:
            return _rows(
                [
                    [
                        key.namespace,
                        key.tenant,
                        owner,
                        repr(ttl),
                        repr(float(rule.at)),
                        repr(float(rule.margin)),
                        repr(float(rule.share)),
                    ]
                    for key, owner, ttl, rule in part
                ]
            )

        return await self._acquire_rounds(
            "acquire_if_due", self._sql.acquire_if_due_many, items, columns, tries=1
        )

    async def _acquire_rounds(
        self,
        op: str,
        statement: str,
        items: list[Any],
        columns: Callable[[list[Any]], str],
        *,
        tries: int,
    ) -> list[Acquisition]:
        """Run an acquisition ``statement`` over ``items`` (each a key first, then its
        owner), in rounds with no key twice, each round's rows in key order (so that two
        batches lock the rows they share in the same order, never each waiting for the
        other). An item without a row is asked again, up to ``tries`` times in all: a
        plain acquisition finds no row when a concurrent first insert committed after its
        statement began (its snapshot cannot see the row it conflicted with)."""

        async def run(con: Any, replay: bool) -> list[Any]:
            found: list[Any] = [None] * len(items)
            if self._absent:
                return found
            pending = list(range(len(items)))
            for _ in range(tries):
                for indices in _rounds([items[i][0] for i in pending]):
                    positions = sorted((pending[j] for j in indices), key=lambda i: _order(items[i][0]))
                    rows = await con.fetch(statement, columns([items[i] for i in positions]))
                    for row in rows:
                        found[positions[row["i"] - 1]] = row
                pending = [i for i in pending if found[i] is None]
                if not pending:
                    break
            return found

        # Always replay-safe: a lease already held by this very owner (random per call) is
        # taken again, with a new fence.
        rows = await self._call(op, run)
        answers: list[Acquisition] = []
        for item, row in zip(items, rows, strict=True):
            key, owner = item[0], item[1]
            if row is None:
                answers.append(Acquisition(None, None))  # never written
                continue
            record = None if row["payload"] is None else _record(key, row)
            lease = Lease(key, owner, int(row["fence"])) if row["won"] else None
            answers.append(Acquisition(lease, record))
        return answers

    async def extend(self, lease: Lease, ttl: float) -> bool:
        """Push the lease's expiry to ``ttl`` from now (database clock) if still ours."""
        key = lease.key

        async def run(con: Any, replay: bool) -> Any:
            return await con.execute(
                self._sql.extend, key.namespace, key.tenant, lease.fence, lease.owner, float(ttl)
            )

        return bool(await self._call("extend", run) == "UPDATE 1")

    async def release(self, lease: Lease) -> bool:
        """Give the lease back if still ours, and announce.

        Releases issued in one turn of the event loop are sent as one statement."""
        return await self._releases(lease)

    async def _release_batch(self, leases: list[Lease], *, closing: bool = False) -> list[bool]:
        """Whether each lease was given back, in one statement; announces each.
        ``closing``: also while ``aclose`` waits for it (the leases of cancelled callers)."""

        async def run(con: Any, replay: bool) -> list[bool]:
            done = [False] * len(leases)
            for indices in _rounds([lease.key for lease in leases]):
                indices = sorted(indices, key=lambda i: _order(leases[i].key))
                part = [leases[i] for i in indices]
                rows = _rows([_lease_row(lease) for lease in part])
                for row in await con.fetch(self._sql.release_many, rows, self._names.channel):
                    done[indices[row["i"] - 1]] = True
            return done

        released = await self._call("release", run, closing=closing)
        for lease, done in zip(leases, released, strict=True):
            if done:
                self._announce(lease.key.digest)
        return released

    async def commit(self, lease: Lease, update: Update) -> Record | None:
        """Write ``update`` iff ``lease`` is still the tenant's current one; release; announce.

        Commits issued in one turn of the event loop are sent as one statement (each row
        fenced on its own)."""
        version = await self._commits((lease, update))
        if version is None:
            return None
        key = lease.key
        self._changes.saw(key.namespace, key.tenant, key.digest, version, own=True)
        return Record(lease.key, update.payload, update.status, version, update.expires_at, update.updated_at)

    async def _commit_batch(self, commits: list[tuple[Lease, Update]]) -> list[int | None]:
        """Each commit's new version (``None``: fenced out), written in one statement;
        announces each commit that landed."""

        async def run(con: Any, replay: bool) -> list[int | None]:
            versions: list[int | None] = [None] * len(commits)
            for indices in _rounds([lease.key for lease, _ in commits]):
                indices = sorted(indices, key=lambda i: _order(commits[i][0].key))
                part = [commits[i] for i in indices]
                data = _rows([_lease_row(lease) + _update_row(update) for lease, update in part])
                rows = await con.fetch(self._sql.commit_many, data, self._names.channel)
                for row in rows:
                    versions[indices[row["i"] - 1]] = int(row["version"])
            for index, (lease, update) in enumerate(commits):
                if versions[index] is None:
                    # A resent statement (ours, or a client's after a lost reply) may
                    # find its own commit done.
                    key = lease.key
                    found = await con.fetchval(
                        self._sql.committed, key.namespace, key.tenant, lease.fence, update.payload
                    )
                    versions[index] = None if found is None else int(found)
            return versions

        # A commit is the one write whose loss costs a rotated token: retry it harder. A
        # replay is always safe, since it is fenced.
        versions = await self._call("commit", run, attempts=_COMMIT_ATTEMPTS)
        for (lease, _), version in zip(commits, versions, strict=True):
            if version is not None:
                self._announce(lease.key.digest)  # even if its caller was cancelled meanwhile
        return list(versions)

    async def replace(self, key: TenantKey, update: Update | None) -> None:
        """Write ``update`` unconditionally (``None`` forgets), fence out any holder, announce."""
        self._check_key(key)
        if update is None:
            values: tuple[Any, ...] = (None, TenantStatus.ACTIVE.value, None, 0.0)
        else:
            values = (update.payload, update.status.value, update.expires_at, update.updated_at)

        async def run(con: Any, replay: bool) -> Any:
            if update is None:
                return await con.execute(self._sql.forget, key.namespace, key.tenant, self._names.channel)
            return await con.execute(
                self._sql.replace, key.namespace, key.tenant, key.digest, *values, self._names.channel
            )

        await self._call("replace", run)
        self._changes.saw(key.namespace, key.tenant, key.digest, None, own=True)  # its version: polled
        self._announce(key.digest)

    async def claim_code(self, key: TenantKey, code_hash: str, owner: str, ttl: float) -> CodeClaim:
        """Claim the code for the tenant, take over an expired CLAIMED claim, or report the
        existing claim (possibly another tenant's) with ``won=False``."""
        self._check_key(key)
        if time.monotonic() - self._last_prune >= _PRUNE_EVERY:
            self._last_prune = time.monotonic()

            async def prune(con: Any, replay: bool) -> Any:
                return await con.execute(self._sql.prune, CLAIM_RETENTION)

            await self._call("prune code claims", prune)

        async def run(con: Any, replay: bool) -> Any:
            for _ in range(3):
                row = await con.fetchrow(
                    self._sql.claim,
                    key.namespace,
                    code_hash,
                    key.tenant,
                    key.digest,
                    owner,
                    float(ttl),
                    CLAIM_RETENTION,
                )
                if row is not None:
                    return row
            return None

        row = await self._call("claim_code", run)
        if row is None:
            raise StoreUnavailable("Postgres store: claim_code saw no claim after three tries")
        return CodeClaim(
            TenantKey(key.namespace, row["tenant"]),
            code_hash,
            owner,
            ClaimState(row["state"]),
            won=row["owner"] == owner,
            expired=bool(row["expired"]),
            outcome=row["outcome"],
        )

    async def advance_code(
        self, claim: CodeClaim, state: ClaimState, ttl: float, outcome: str | None = None
    ) -> bool:
        """Move an owned claim to ``state`` and announce on its tenant."""
        hold = float(ttl) if state is ClaimState.SENT else CLAIM_RETENTION

        async def run(con: Any, replay: bool) -> Any:
            return await con.fetch(
                self._sql.advance,
                claim.key.namespace,
                claim.code_hash,
                claim.owner,
                state.value,
                outcome,
                hold,
                self._names.channel,
                True,  # a step this owner already made is a replay, answered alike
            )

        rows = await self._call("advance_code", run)
        if not rows:
            return False
        self._announce(claim.key.digest)
        return True

    async def hold(self, namespace: str, until: float) -> float:
        """Raise the app's "not before" instant to ``until`` if later, and announce it."""
        if "\x00" in namespace:
            raise InvalidTenant("namespaces must not contain NUL characters")
        digest = hold_digest(namespace)

        async def run(con: Any, replay: bool) -> Any:
            return await con.fetchrow(self._sql.hold, namespace, digest, float(until), self._names.channel)

        row = await self._call("hold", run)
        if row["raised"]:
            self._announce(digest)
        self._changes.saw(namespace, "", digest, float(row["not_before"]), own=True)
        return float(row["not_before"])

    async def admit(self, namespace: str, ticket: str, interval: float, burst: int) -> float:
        """Seconds to wait before a provider call (the hold, or the shared budget); 0: admitted.
        The database clock judges."""
        if "\x00" in namespace:
            raise InvalidTenant("namespaces must not contain NUL characters")
        digest = hold_digest(namespace)
        burst = max(burst, 1)

        async def run(con: Any, replay: bool) -> Any:
            for _ in range(_ADMIT_TRIES):
                if await con.fetchval(self._sql.admit, namespace, digest, ticket, float(interval), burst):
                    return 0.0
                row = await con.fetchrow(self._sql.throttle, namespace)
                state = ThrottleState(row["not_before"] or 0.0, row["tat"] or 0.0, row["ticket"] or "")
                wait = state.admit(float(row["now"]), ticket, interval, burst)[0]
                if wait > 0 or state.ticket == ticket:  # held, out of budget, or a resend
                    return wait
                # Refused, yet free now: the row changed while the statement waited for its
                # lock. Ask again: a caller let through here would take no unit.
            return float(interval)

        return float(await self._call("admit", run))

    async def tenants(self, namespace: str) -> list[Record]:
        """Every stored tenant record of ``namespace`` (forgotten tenants excluded)."""

        if "\x00" in namespace:
            raise InvalidTenant("namespaces must not contain NUL characters")

        async def run(con: Any, replay: bool) -> Any:
            if self._absent:
                return []
            return await con.fetch(self._sql.tenants, namespace)

        rows = await self._call("tenants", run)
        return [_record(TenantKey(namespace, row["tenant"]), row) for row in rows]

    # -- wake-ups --------------------------------------------------------------------

    def watch(self, key: TenantKey) -> AbstractAsyncContextManager[Watch]:
        """Register for changes of ``key``; starts the shared LISTEN connection if needed."""
        if self.pgbouncer or self._closed or self._listener.settled:
            return self._notifier.watch(key)  # nothing to start or wait for
        return self._notifier.watch(key, self._subscribed)

    async def _subscribed(self) -> None:
        """Once a watch is registered: the shared LISTEN started and (at most 5 s) in effect,
        so that the caller's read that follows misses nothing (the poll covers a database
        that does not answer)."""
        if self._start_listener():
            await self._listener.ready(5.0)

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        """Call ``callback(digest)`` on every change announced (here or by other processes)."""
        unsubscribe = self._notifier.on_change(callback)
        with contextlib.suppress(RuntimeError):  # no running loop: the first watch starts it
            self._start_listener()
            if self.pgbouncer and not self._closed:
                self._changes.start()
        return unsubscribe

    def _start_listener(self) -> bool:
        """Start the LISTEN connection unless in PgBouncer mode or closed; True if it runs."""
        if self.pgbouncer or self._closed:
            return False
        self._listener.start()
        return True

    # -- health and lifecycle --------------------------------------------------------

    async def check(self) -> None:
        """Raise StoreUnavailable unless the database answers (and the schema is ready)."""

        async def run(con: Any, replay: bool) -> Any:
            return await con.fetchval("SELECT 1")

        await self._call("check", run)

    async def aclose(self) -> None:
        """Stop listening; close the pool if this store built it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        acquiring = self._acquires.in_flight | self._acquires_if_due.in_flight
        if acquiring:  # their callers may be gone: what they win is given back
            await asyncio.wait(acquiring, timeout=5.0)
        await self._orphan_leases.wait(5.0)  # leases won for cancelled callers
        await self._listener.aclose()
        await self._changes.aclose()
        if self._owns_pool and self._pool is not None:
            await _close_pool(self._pool)


async def _close_pool(pool: Any) -> None:
    """Close ``pool``, waiting at most 5 s for its connections to come back."""
    try:
        await asyncio.wait_for(pool.close(), 5.0)
    except _FAILURES:
        pool.terminate()


def _finite(value: float | None) -> float | None:
    """``value``, with a damaged (NaN, infinite) number read as 0 (it equals itself)."""
    return value if value is None or math.isfinite(value) else 0.0


class _ChangePoll:
    """PgBouncer mode's stand-in for LISTEN, for change listeners (a manager's cache, the
    fleet's hold): every two ``poll`` periods (at least half a second), the versions of the
    rows this process has seen (the hold's instant for a namespace's hold row), read in one
    statement; a row that changed is announced. Watchers need none of it: they poll."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._every = max(0.5, 2 * (store._notifier.poll or 0.25))
        # (namespace, tenant) -> (digest, the version or hold instant last seen; None: not yet)
        self._seen: dict[tuple[str, str], tuple[str, float | None]] = {}
        self._task: asyncio.Task[None] | None = None

    def saw(
        self, namespace: str, tenant: str, digest: str, value: float | None, *, own: bool = False
    ) -> None:
        """Note a row this process read (``own=False``: only a row not yet watched is taken
        at that version; a read that bypasses the cache must not hide a change from it) or
        wrote itself, or learnt the hold of (``own=True``: that version is the one it
        holds). Only in PgBouncer mode."""
        if not self._store.pgbouncer:
            return
        if own:
            self._seen[(namespace, tenant)] = (digest, _finite(value))
        else:
            self._seen.setdefault((namespace, tenant), (digest, _finite(value)))

    def start(self) -> None:
        """Start polling unless it runs (needs a running loop; a task whose loop is gone,
        a new ``asyncio.run``, is started over on this one)."""
        task = self._task
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="factorial-tokens-postgres-changes", context=contextvars.Context()
            )

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._every * random.uniform(0.75, 1.25))
            try:
                await self.poll()
                failing = False
            except Exception as exc:  # the next round compares again; said once per streak
                if not failing:
                    log.warning("PgBouncer change poll failed (%s); retrying", type(exc).__name__)
                failing = True

    async def poll(self) -> None:
        """Announce every seen row whose version (or hold instant) changed."""
        keys = list(self._seen)
        if not keys:
            return
        data = _rows([[namespace, tenant] for namespace, tenant in keys])

        async def run(con: Any, replay: bool) -> Any:
            return await con.fetch(self._store._sql.versions, data)

        for row in await self._store._call("changes", run):
            key = keys[row["i"] - 1]
            digest, before = self._seen.get(key, ("", None))
            now = _finite(row["expires_at"]) if key[1] == "" else float(row["version"])
            if now != before:
                self._seen[key] = (digest, now)
                self._store._notifier.notify(digest)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=5.0)


class _Listen(PushListener):
    """The store's one LISTEN connection (taken from its pool)."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__(store._notifier, name="postgres", log=log, origin=store._origin, backoff=(0.1, 5.0))
        self._store = store
        self._channel = store._names.channel

    def _on_notify(self, con: object, pid: int, channel: str, payload: str) -> None:
        self.deliver(payload)

    def notice_of(self, text: bytes) -> bytes:
        """A commit's notice rides in hex (NOTIFY carries text only)."""
        return bytes.fromhex(text.decode("ascii"))

    async def listen(self, connected: Callable[[], None]) -> None:
        """LISTEN on a pooled connection until it is lost; a ``SELECT 1`` every 5 s finds a
        half-open socket."""
        pool = await self._store._ready()
        con = await pool.acquire(timeout=self._store._acquire_timeout)
        lost = asyncio.Event()
        try:
            con.add_termination_listener(lambda _con: lost.set())
            await con.add_listener(self._channel, self._on_notify)
            connected()
            while not lost.is_set() and not con.is_closed():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), 5.0)
                if not lost.is_set() and not con.is_closed():
                    await con.execute("SELECT 1", timeout=5.0)
        finally:
            await self._give_back(pool, con)

    async def _give_back(self, pool: Any, con: Any) -> None:
        with contextlib.suppress(*_CLOSE_FAILURES):
            if not con.is_closed():
                await asyncio.shield(con.remove_listener(self._channel, self._on_notify))
        try:
            await asyncio.shield(pool.release(con, timeout=5.0))
        except _CLOSE_FAILURES:
            with contextlib.suppress(*_FAILURES):
                con.terminate()


def _check_dsn(dsn: str) -> None:
    """ConfigurationError unless ``dsn`` is a well-formed ``postgresql://`` URL. A password
    with an unescaped ``@``, ``/``, ``?`` or ``#`` moves its pieces into the host, the
    path or the query, where errors (ours or asyncpg's) would show them: such a DSN is
    refused without quoting any of it."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        parts = None
    if parts is not None and parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError("PostgresStore's dsn is a postgresql:// URL (libpq's URI form)")
    if parts is not None and not all(_port_ok(host) for host in parts.netloc.rpartition("@")[2].split(",")):
        raise ConfigurationError("PostgresStore's dsn names a port that is not a number in 1-65535")
    if (
        parts is None
        or not all("=" in field for field in parts.query.split("&") if field)
        or parts.fragment
        or parts.netloc.count("@") > 1
        or "@" in parts.path
    ):
        raise ConfigurationError(
            "PostgresStore's dsn is malformed (not shown: it may hold a password); "
            "percent-encode the password's reserved characters (@ / ? # :)"
        )


def _port_ok(host: str) -> bool:
    """False if ``host`` (``name:port``, ``[v6]:port``) names a port out of range."""
    _, colon, port = host.rpartition("]")[2].rpartition(":")
    return not colon or not port or (port.isdigit() and 0 < int(port) < 65536)


def _unreadable_dsn() -> ConfigurationError:
    return ConfigurationError(
        "PostgresStore's dsn could not be read by asyncpg (not shown: it may hold a password)"
    )


def _backoff(attempt: int) -> float:
    """Seconds before retry number ``attempt + 1`` (jittered)."""
    return min(0.05 * 3.0**attempt, 0.5) * random.uniform(0.5, 1.5)


def _cancelling() -> bool:
    """True if the running task is being cancelled: its call is not retried."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _keep_session(con: Any) -> None:
    """The pool's reset between two uses of a connection: nothing to undo.

    Our statements leave no session state (no SET, no session locks, no cursors; the LISTEN
    connection unlistens before it goes back; asyncpg itself still rolls back any open
    transaction), so asyncpg's default reset query would only cost every primitive a
    second round trip.
    """


def _describe(exc: BaseException) -> str:
    # Driver messages never carry parameters; still, keep to the class and SQLSTATE.
    code = getattr(exc, "sqlstate", None)
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}{f' ({code})' if code else ''}"


#: The statuses by their column value (a lookup, not an Enum call, per row read).
_STATUSES = {status.value: status for status in TenantStatus}


def _record(key: TenantKey, row: Any) -> Record:
    """The record of a row with a payload. asyncpg already decodes the columns to their
    Python types (bytes, str, int, float or None), so they go to ``Record`` as they are."""
    payload = row["payload"]
    assert payload is not None  # every caller selects rows with a payload
    status = row["status"]
    return Record(
        key,
        payload,
        _STATUSES.get(status) or TenantStatus(status),
        row["version"],
        row["expires_at"],
        row["updated_at"],
    )


def _rounds(keys: list[TenantKey]) -> list[list[int]]:
    """Positions of ``keys`` in rounds with no key twice: a row that an ``UPDATE ... FROM``
    joins twice is written once, so a tenant twice in one batch (two leases of one process,
    at most one of them current, or a resent call) waits for the next round."""
    rounds: list[list[int]] = []
    seen: dict[TenantKey, int] = {}
    for index, key in enumerate(keys):
        count = seen.get(key, 0)
        seen[key] = count + 1
        if count == len(rounds):
            rounds.append([])
        rounds[count].append(index)
    return rounds


def _order(key: TenantKey) -> tuple[bytes, bytes]:
    """The order in which a batch takes its rows' locks: the same in every process."""
    return key.namespace.encode(), key.tenant.encode()


# The batched statements take their items as ONE jsonb array of rows (one array per item,
# every value a JSON string or null; numbers in exact text, cast in the statement). Not a
# text[] per column: asyncpg's array encoder checks each element against three ABCs, which
# made the encoding the largest client cost of a batch. Not bigint[], bytea[] or float8[]
# either: each would cost a type introspection query on every new connection.


def _rows(rows: list[list[str | None]]) -> str:
    """The ``jsonb`` parameter of a batched statement: its rows, in order. Characters go
    as they are (not ``\\u`` escapes), converted to the database's encoding like any text:
    escapes above U+007F are refused by a database not in UTF8."""
    return json.dumps(rows, separators=(",", ":"), ensure_ascii=False)


def _lease_row(lease: Lease) -> list[str | None]:
    """A lease's namespace, tenant, fence and owner (the first four values of a write's row)."""
    key = lease.key
    return [key.namespace, key.tenant, str(lease.fence), lease.owner]


def _update_row(update: Update) -> list[str | None]:
    """``commit_many``'s values 5-9 of a row: the payload in hex, numbers as exact float text,
    the notice in hex (none when NOTIFY, at most 8000 bytes, could not take it)."""
    expires = update.expires_at
    notice = update.notice
    return [
        update.payload.hex(),
        update.status.value,
        None if expires is None else repr(float(expires)),
        repr(float(update.updated_at)),
        None if notice is None or len(notice) > _NOTICE_MAX else notice.hex(),
    ]


def _items(*columns: str) -> str:
    """A batched statement's items: one row per element of the jsonb array ``$1`` (see
    ``_rows``), its values as text under ``columns``, and its position ``i`` (from 1)."""
    values = ", ".join(f"r->>{index} AS {name}" for index, name in enumerate(columns))
    return f"SELECT {values}, i FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS j(r, i)"


class _Statements:
    """The store's SQL, one statement per primitive, built once per (schema, prefix)."""

    def __init__(self, n: Names, origin: str) -> None:
        assert origin.isalnum()  # pasted into the SQL as a literal
        t, c = n.tenants, n.claims
        cols = "payload, status, version, expires_at, updated_at"
        # $1 rows (namespace, tenant): the rows found, each with its key's position (from 1).
        self.read_many = f"""
            SELECT k.i, t.payload, t.status, t.version, t.expires_at, t.updated_at
              FROM ({_items("namespace", "tenant")}) k
              JOIN {t} t ON t.namespace = k.namespace AND t.tenant = k.tenant
             WHERE t.payload IS NOT NULL"""
        self.tenants = (
            f"SELECT tenant, {cols} FROM {t} WHERE namespace = $1 AND payload IS NOT NULL ORDER BY tenant"
        )
        # $1 rows (namespace, tenant): each row's version and expiry (the hold's instant for
        # tenant ''), for PgBouncer mode's change poll.
        self.versions = f"""
            SELECT k.i, t.version, t.expires_at
              FROM ({_items("namespace", "tenant")}) k
              JOIN {t} t ON t.namespace = k.namespace AND t.tenant = k.tenant"""
        # $1 rows, one per acquisition, keys unique, in lock order: (namespace, tenant,
        # digest, owner, ttl seconds). Returns each
        # one's position (from 1), whether it won, and the row: taken if free, expired, or
        # already this very owner's (a replay: owners are random per call), with a new
        # fence; the rows are locked in the order given (INSERT ... SELECT ... ORDER BY).
        # No row for a key means a concurrent first insert our snapshot could not see.
        self.acquire_many = f"""
            WITH u AS (
                {_items("namespace", "tenant", "digest", "owner", "ttl")}
            ), won AS (
                INSERT INTO {t} AS t (namespace, tenant, digest, fence, lease_owner, lease_expires)
                SELECT namespace, tenant, digest, 1, owner,
                       clock_timestamp() + make_interval(secs => ttl::float8)
                  FROM u ORDER BY i
                ON CONFLICT (namespace, tenant) DO UPDATE
                    SET fence = t.fence + 1,
                        lease_owner = EXCLUDED.lease_owner,
                        lease_expires = EXCLUDED.lease_expires
                    WHERE t.lease_owner IS NULL
                       OR t.lease_expires <= clock_timestamp()
                       OR t.lease_owner = EXCLUDED.lease_owner
                RETURNING t.namespace, t.tenant, t.fence, t.payload, t.status, t.version,
                          t.expires_at, t.updated_at
            )
            SELECT u.i, true AS won, w.fence, w.payload, w.status, w.version, w.expires_at, w.updated_at
              FROM u JOIN won w ON w.namespace = u.namespace AND w.tenant = u.tenant
            UNION ALL
            SELECT u.i, false, t.fence, t.payload, t.status, t.version, t.expires_at, t.updated_at
              FROM u JOIN {t} t ON t.namespace = u.namespace AND t.tenant = u.tenant
             WHERE NOT EXISTS (SELECT FROM won w WHERE w.namespace = u.namespace AND w.tenant = u.tenant)"""
        # $1 rows, one per acquisition, keys unique, in lock order: (namespace, tenant,
        # owner, ttl seconds, at, margin, share), doubles in exact text: the lease only for
        # an ACTIVE record that is not fresh by the rule (Freshness in the store kit, the
        # same doubles as Python's); an absent row is left absent (no answer row). A replay
        # (this owner's live lease) takes it again with a new fence. The rows to take are
        # chosen and locked first, in the order given (FOR UPDATE rechecks a row changed
        # meanwhile, as an UPDATE's WHERE would), so that the UPDATE, whatever its join
        # order, waits for no one; rows left alone are not locked.
        self.acquire_if_due_many = f"""
            WITH u AS MATERIALIZED (
                SELECT namespace, tenant, owner, ttl::float8 AS ttl, at::float8 AS at,
                       margin::float8 AS margin, share::float8 AS share, i
                  FROM ({_items("namespace", "tenant", "owner", "ttl", "at", "margin", "share")}) u
            ), due AS (
                SELECT u.i, u.namespace, u.tenant, u.owner, u.ttl
                  FROM u JOIN {t} t ON t.namespace = u.namespace AND t.tenant = u.tenant
                 WHERE (t.lease_owner = u.owner AND t.lease_expires > clock_timestamp())  -- a replay
                    OR ((t.lease_owner IS NULL OR t.lease_expires <= clock_timestamp())
                        AND t.payload IS NOT NULL AND t.status = 'active'
                        AND t.expires_at IS NOT NULL
                        AND t.expires_at
                            - LEAST(u.margin, u.share * GREATEST(t.expires_at - t.updated_at, 0))
                            <= u.at)
                 ORDER BY u.i
                   FOR UPDATE OF t
            ), won AS (
                UPDATE {t} AS t
                   SET fence = t.fence + 1, lease_owner = d.owner,
                       lease_expires = clock_timestamp() + make_interval(secs => d.ttl)
                  FROM due d
                 WHERE t.namespace = d.namespace AND t.tenant = d.tenant
                RETURNING d.i, t.fence, t.payload, t.status, t.version, t.expires_at, t.updated_at
            )
            SELECT i, true AS won, fence, {cols} FROM won
            UNION ALL
            SELECT u.i, false, t.fence, t.payload, t.status, t.version, t.expires_at, t.updated_at
              FROM u JOIN {t} t ON t.namespace = u.namespace AND t.tenant = u.tenant
             WHERE NOT EXISTS (SELECT FROM won w WHERE w.i = u.i)"""
        # $1 namespace, $2 tenant, $3 fence, $4 owner, $5 ttl seconds.
        self.extend = f"""
            UPDATE {t} SET lease_expires = clock_timestamp() + make_interval(secs => $5)
             WHERE namespace = $1 AND tenant = $2 AND fence = $3 AND lease_owner = $4"""
        # $1 rows, one per lease, keys unique, in lock order: (namespace, tenant, fence,
        # owner); $2 channel. Returns the position (from 1) of each
        # lease given back. The rows are chosen and locked first, in the order given, as in
        # ``acquire_if_due_many`` (a plan-ordered UPDATE ... FROM deadlocked against an
        # acquisition batch, which locks every row it conflicts with, held ones too).
        self.release_many = f"""
            WITH u AS MATERIALIZED (
                {_items("namespace", "tenant", "fence", "owner")}
            ), mine AS (
                SELECT u.i, u.namespace, u.tenant
                  FROM u JOIN {t} t ON t.namespace = u.namespace AND t.tenant = u.tenant
                 WHERE t.fence = u.fence::bigint
                   AND (t.lease_owner = u.owner OR t.lease_owner IS NULL)  -- NULL: a replay, done
                 ORDER BY u.i
                   FOR UPDATE OF t
            ), up AS (
                UPDATE {t} AS t SET lease_owner = NULL, lease_expires = NULL
                  FROM mine m
                 WHERE t.namespace = m.namespace AND t.tenant = m.tenant
                RETURNING m.i, t.digest
            )
            SELECT i, pg_notify($2, digest || ' ' || '{origin}') IS NULL FROM up"""
        # $1 rows (see _lease_row, _update_row), one per commit, keys unique, in lock order:
        # (namespace, tenant, fence, owner, payload in hex, status, expires_at, updated_at,
        # notice in hex or null: announced after the digest, not stored);
        # $2 channel. Each row is fenced on its own; returns
        # (position from 1, new version) per commit that landed. Rows locked first, in the
        # order given, as in ``release_many``.
        self.commit_many = f"""
            WITH u AS MATERIALIZED (
                {
            _items(
                "namespace",
                "tenant",
                "fence",
                "owner",
                "payload",
                "status",
                "expires_at",
                "updated_at",
                "notice",
            )
        }
            ), mine AS (
                SELECT u.*
                  FROM u JOIN {t} t ON t.namespace = u.namespace AND t.tenant = u.tenant
                 WHERE t.fence = u.fence::bigint AND t.lease_owner = u.owner
                 ORDER BY u.i
                   FOR UPDATE OF t
            ), up AS (
                UPDATE {t} AS t
                   SET payload = decode(m.payload, 'hex'), status = m.status,
                       expires_at = m.expires_at::float8, updated_at = m.updated_at::float8,
                       version = t.version + 1, written_fence = t.fence,
                       lease_owner = NULL, lease_expires = NULL
                  FROM mine m
                 WHERE t.namespace = m.namespace AND t.tenant = m.tenant
                RETURNING m.i, t.digest, t.version, m.notice
            )
            SELECT i, version, pg_notify($2, digest || ' ' || '{
            origin
        }' || coalesce(' ' || notice, '')) IS NULL
              FROM up"""
        # After a lost answer: did the commit with fence $3 land, with nothing since?
        self.committed = f"""
            SELECT version FROM {t}
             WHERE namespace = $1 AND tenant = $2 AND fence = $3 AND written_fence = $3
               AND lease_owner IS NULL AND payload = $4"""
        # $1 namespace, $2 tenant, $3 digest, $4 payload (NULL forgets), $5 status,
        # $6 expires_at, $7 updated_at, $8 channel. Bumps the fence: fences out any holder.
        self.replace = f"""
            WITH up AS (
                INSERT INTO {t} AS t
                    (namespace, tenant, digest, payload, status, expires_at, updated_at, version, fence)
                VALUES ($1, $2, $3, $4, $5, $6, $7, 1, 1)
                ON CONFLICT (namespace, tenant) DO UPDATE
                    SET payload = EXCLUDED.payload, status = EXCLUDED.status,
                        expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at,
                        version = t.version + 1, fence = t.fence + 1,
                        lease_owner = NULL, lease_expires = NULL
                    -- A replay (already written, nobody holding) changes nothing.
                    WHERE t.lease_owner IS NOT NULL
                       OR t.payload IS DISTINCT FROM EXCLUDED.payload
                       OR t.status IS DISTINCT FROM EXCLUDED.status
                       OR t.expires_at IS DISTINCT FROM EXCLUDED.expires_at
                       OR t.updated_at IS DISTINCT FROM EXCLUDED.updated_at
                RETURNING t.digest
            )
            SELECT pg_notify($8, digest || ' ' || '{origin}') FROM up"""
        # $1 namespace, $2 tenant, $3 channel. Forgets a known tenant (its row stays, so the
        # fence keeps growing); an unknown one, or a replay, writes nothing.
        self.forget = f"""
            WITH up AS (
                UPDATE {t}
                   SET payload = NULL, status = 'active', expires_at = NULL, updated_at = 0,
                       version = version + 1, fence = fence + 1,
                       lease_owner = NULL, lease_expires = NULL
                 WHERE namespace = $1 AND tenant = $2
                   AND (payload IS NOT NULL OR lease_owner IS NOT NULL)
                RETURNING digest
            )
            SELECT pg_notify($3, digest || ' ' || '{origin}') FROM up"""
        # $1 namespace, $2 code_hash, $3 tenant, $4 digest, $5 owner, $6 ttl, $7 retention.
        # Takes over an expired CLAIMED claim, or any claim older than the retention.
        self.claim = f"""
            WITH won AS (
                INSERT INTO {c} AS c (namespace, code_hash, tenant, digest, owner, state, expires)
                VALUES ($1, $2, $3, $4, $5, 'claimed', clock_timestamp() + make_interval(secs => $6))
                ON CONFLICT (namespace, code_hash) DO UPDATE
                    SET tenant = EXCLUDED.tenant, digest = EXCLUDED.digest, owner = EXCLUDED.owner,
                        state = 'claimed', expires = EXCLUDED.expires, outcome = NULL
                    WHERE (c.state = 'claimed' AND c.expires <= clock_timestamp())
                       OR c.expires <= clock_timestamp() - make_interval(secs => $7)
                RETURNING c.tenant, c.owner, c.state, c.outcome, false AS expired
            )
            SELECT tenant, owner, state, outcome, expired FROM won
            UNION ALL
            SELECT tenant, owner, state, outcome,
                   state IN ('claimed', 'sent') AND expires <= clock_timestamp()
              FROM {c}
             WHERE namespace = $1 AND code_hash = $2 AND NOT EXISTS (SELECT FROM won)"""
        # $1 namespace, $2 code_hash, $3 owner, $4 new state, $5 outcome, $6 seconds to keep,
        # $7 channel, $8 replay (a replay may find its own step already applied).
        self.advance = f"""
            WITH up AS (
                UPDATE {c}
                   SET state = $4, outcome = $5, expires = clock_timestamp() + make_interval(secs => $6)
                 WHERE namespace = $1 AND code_hash = $2 AND owner = $3
                   AND ((state IN ('claimed', 'sent') AND ($4 <> 'sent' OR state = 'claimed'))
                        OR ($8 AND state = $4 AND outcome IS NOT DISTINCT FROM $5))
                RETURNING digest
            )
            SELECT pg_notify($7, digest || ' ' || '{origin}') IS NULL FROM up"""
        # The app's back-pressure lives in its own row of the tenants table: tenant '' (never
        # a tenant id), payload NULL (so never read or listed); expires_at is the "not
        # before" instant, updated_at the budget's theoretical arrival time (GCRA),
        # lease_owner the last ticket admitted.
        # $1 namespace, $2 hold digest, $3 until, $4 channel. Keeps the later instant.
        self.hold = f"""
            WITH up AS (
                INSERT INTO {t} AS t (namespace, tenant, digest, expires_at)
                VALUES ($1, '', $2, $3)
                ON CONFLICT (namespace, tenant) DO UPDATE SET expires_at = EXCLUDED.expires_at
                    WHERE coalesce(t.expires_at, 0) < EXCLUDED.expires_at
                RETURNING t.expires_at, t.digest
            ), note AS (
                SELECT pg_notify($4, digest || ' ' || '{origin}') FROM up
            )
            SELECT coalesce((SELECT expires_at FROM up),
                            (SELECT expires_at FROM {t} WHERE namespace = $1 AND tenant = ''),
                            0) AS not_before,
                   (SELECT count(*) FROM note) > 0 AS raised"""
        # $1 namespace, $2 hold digest, $3 ticket, $4 interval seconds (0: no budget), $5 burst.
        # One row when admitted (one unit taken); none when held, out of budget, or a resend.
        # The clock when the row's lock is had (an admit may wait for another's).
        now = "extract(epoch FROM clock_timestamp())::float8"
        self.admit = f"""
            INSERT INTO {t} AS t (namespace, tenant, digest, expires_at, updated_at, lease_owner)
            VALUES ($1, '', $2, 0, {now} + $4, $3)
            ON CONFLICT (namespace, tenant) DO UPDATE
                SET updated_at = greatest(t.updated_at, {now}) + $4, lease_owner = $3
                WHERE t.lease_owner IS DISTINCT FROM $3
                  AND coalesce(t.expires_at, 0) <= {now}
                  AND $4 > 0
                  AND greatest(t.updated_at, {now}) - ($5 - 1) * $4 <= {now}
            RETURNING true"""
        # $1 namespace. The back-pressure row as it is, and the database clock.
        self.throttle = f"""
            SELECT n.now, t.expires_at AS not_before, t.updated_at AS tat, t.lease_owner AS ticket
              FROM (SELECT extract(epoch FROM clock_timestamp())::float8 AS now) n
              LEFT JOIN {t} t ON t.namespace = $1 AND t.tenant = ''"""
        # $1 retention seconds.
        self.prune = f"DELETE FROM {c} WHERE expires <= clock_timestamp() - make_interval(secs => $1)"

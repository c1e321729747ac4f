"""RedisStore: the store contract on Redis or Redis Cluster, one Lua script per step.

Key layout (``P`` is the prefix, ``D`` a tenant's ``TenantKey.digest``, so one hash tag
per tenant and every script touches one slot)::

    P:{D}:rec           hash: payload, status, version, expires_at, updated_at, ns, tenant,
                        fence (the fencing counter), holder (the current lease's owner)
    P:{D}:lease         string with PX expiry: a live lease (Redis judges its TTL)
    P:{N}:tenants       set of digests ever written in namespace N (N = sha256(namespace))
    P:claim:{C}         hash with PX expiry: a code claim (C = sha256(namespace, code hash))
    P:changes           the pub/sub channel; messages are "<digest> <origin>"

No tenant id or namespace ever appears in a key name: only digests. The tenant id is kept
as a hash field so listings can return it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, suppress
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from factorial_tokens import ConfigurationError, StoreUnavailable
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
    Record,
    TenantKey,
    Update,
    Watch,
    closed_error,
    flag,
    hold_digest,
    record_from_columns,
    seconds,
    text,
    url_options,
)

from ._listener import Listener

__all__ = ["RedisStore"]


def _hiredis_packer() -> Callable[[tuple[Any, ...]], bytes] | None:
    """hiredis's ``pack_command`` when it is installed (optional): it packs commands in C,
    where redis-py's asyncio client packs them in Python."""
    try:
        return importlib.import_module("hiredis").pack_command  # type: ignore[no-any-return]
    except ImportError:
        return None


_pack_command = _hiredis_packer()

T = TypeVar("T")
log = logging.getLogger("factorial_tokens.redis")

_PREFIX = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
#: Options of ours in a store URL; everything else goes to redis-py.
_OPTIONS = {"prefix": text, "cluster": flag, "poll": seconds}
_RECORD_FIELDS = ("payload", "status", "version", "expires_at", "updated_at")
_SCRIPTS = (
    "acquire",
    "extend",
    "release",
    "commit",
    "replace",
    "claim_code",
    "advance_code",
    "hold",
    "admit",
)

Client = aioredis.Redis | RedisCluster

#: Auto-pipelining: at most this many pipelines of queued commands in flight at once ...
_PIPELINES = 4
#: ... each of at most this many commands.
_PIPELINE_SIZE = 1000
#: A script the server does not know yet (``NOSCRIPT``): it did not run; send it on its own.
_NOSCRIPT = object()
#: A queued command, and what gets its reply if the caller is gone.
_Queued = tuple[tuple[Any, ...], Callable[[Any], None] | None]


def _load_scripts() -> dict[str, str]:
    folder = resources.files("factorial_tokens_redis") / "lua"
    return {name: (folder / f"{name}.lua").read_text(encoding="utf-8") for name in _SCRIPTS}


_LUA = _load_scripts()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _float_text(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _seconds(reply: Any, what: str) -> float:
    """A script's numeric reply; StoreUnavailable if the stored value it came from was not
    one Python reads (Lua's ``tonumber`` takes ``0x10``, say)."""
    try:
        return float(_text(reply) or 0.0)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise StoreUnavailable(f"redis holds a malformed {what} instant") from None


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


class RedisStore:
    """A token store on Redis (``redis://``, ``rediss://``) or Redis Cluster.

    Args:
        client: a ready ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster`` built with
            ``decode_responses=False`` (payloads are bytes). Not closed by :meth:`aclose`.
        prefix: the first part of every key and of the change channel, so several apps
            (or test runs) can share one Redis. Letters, digits and ``_.:/-`` only.
        poll: the fallback poll of waiters, in seconds, for announcements lost while the
            subscription was down.

    Every check-and-modify is one Lua script (one round trip); ``read`` is one ``HMGET``;
    ``replace`` is a ``SADD`` to the namespace index followed by its script (two), since a
    script may touch only one Cluster slot. Redis failures raise StoreUnavailable.

    Limitations: Redis acknowledges a write before it reaches disk or a replica. Without
    AOF (``appendfsync always`` or ``everysec``) a restart loses tokens, and a failover
    with asynchronous replication can lose a lease or a fence increment (the Redlock
    caveat); see the package README.
    """

    acquires_unless_fresh = True

    def __init__(
        self,
        client: Client,
        *,
        prefix: str = "ft",
        poll: float = 1.0,
    ) -> None:
        _check_options(prefix, poll)
        if _decodes_responses(client):
            raise ConfigurationError("the redis client must use decode_responses=False (payloads are bytes)")
        self._client = client
        self._owned = False
        self.prefix = prefix
        self.cluster = isinstance(client, RedisCluster)
        self._channel = f"{prefix}:changes"
        self._origin = secrets.token_hex(8)
        self._notifier = Notifier(poll=poll)
        self._listener = Listener(self._notifier, self._channel, self._origin, self._open_pubsub)
        self._scripts = {name: client.register_script(text) for name, text in _LUA.items()}
        self._uninitialized = self.cluster
        self._init_lock = asyncio.Lock()
        self._closed = False
        # Queue calls beyond the pool's size here (FIFO, one wake-up per free slot) rather
        # than in the pool, whose waiters all re-check on every release: with thousands of
        # tenants in flight that costs more CPU than the commands. One connection is left
        # for the pub/sub listener.
        limit = getattr(getattr(client, "connection_pool", None), "max_connections", None)
        self._slots = (
            asyncio.Semaphore(max(limit - 1, 1)) if isinstance(limit, int) and limit < 2**31 else None
        )
        # Auto-pipelining (one server, not Cluster, whose slots a pipeline would span): the
        # refresh path's commands issued in one turn of the loop leave together, in one
        # pipeline on one connection. With thousands of tenants due at once this saves a
        # connection checkout, a send and a task wake-up per command (most of a command's
        # client CPU); alone, a command waits one turn of the loop.
        self._pipeline: Batcher[_Queued, Any] = Batcher(
            self._send_pipeline,
            concurrency=_PIPELINES,
            size=_PIPELINE_SIZE,
            cancelled=lambda: RedisError("pipeline cancelled"),  # its commands' fate unknown
            orphaned=_orphaned_reply,
        )
        self._orphan_leases = OrphanLeases(functools.partial(self._release, closing=True), store="redis")
        # Acquisitions sent outside a pipeline (a Cluster, a NOSCRIPT fallback) whose caller
        # may be gone: ``_outliving``.
        self._outlivers: set[asyncio.Future[Any]] = set()

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """Build a store (and its own client, closed by :meth:`aclose`) from a URL.

        Accepts ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS),
        ``redis+cluster://host:port`` / ``rediss+cluster://...`` (any node of a Redis
        Cluster; ``?cluster=true`` does the same), plus the query options ``prefix``
        (default ``ft``) and ``poll`` (seconds, default 1), and any redis-py connection
        option (``socket_timeout`` and ``socket_connect_timeout`` default to 5 s,
        ``protocol`` to 2).
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        cluster = scheme.endswith("+cluster")
        scheme = scheme.removesuffix("+cluster")
        if scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"not a redis URL: {scheme}://")
        ours, rest_url = url_options(url, _OPTIONS, store="redis", rest=True)
        cluster = cluster or ours.get("cluster", False)
        poll = ours.get("poll", 1.0)
        prefix = ours.get("prefix", "ft")
        _check_options(prefix, poll)  # before a client exists that would need closing
        rest = parse_qsl(urlsplit(rest_url).query, keep_blank_values=True)
        names = {k for k, _ in rest}
        # RESP2 by default: redis-py 8 skips its check for idle connections the server
        # closed when RESP3 maintenance notifications are on, so a restart or a killed
        # connection would cost one failed call.
        # A blocking pool: past max_connections a call waits up to `timeout` seconds for a
        # free connection (redis-py's plain pool raises MaxConnectionsError at once, which
        # failed 99% of a 10,000-tenant storm in the benchmarks).
        defaults = {
            "socket_timeout": "5",
            "socket_connect_timeout": "5",
            "protocol": "2",
            "max_connections": "50",
            "timeout": "10",
        }
        rest += [(k, v) for k, v in defaults.items() if k not in names]
        target = urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), ""))
        client: Client
        try:
            # No blind retries on one server: a script re-sent after a lost reply could act
            # twice. The cluster client keeps its own (it needs them to follow failovers).
            if cluster:
                client = RedisCluster.from_url(_without(target, "timeout"))
            else:
                pool = aioredis.BlockingConnectionPool.from_url(target, retry=None)
                client = aioredis.Redis.from_pool(pool)  # closes the pool with the client
        except (ValueError, TypeError, RedisError, RedisClusterException) as exc:
            # redis-py's words may quote a piece of a password (read as a port, a path).
            why = "not shown: it may hold a password" if "@" in url else str(exc)
            raise ConfigurationError(
                f"bad redis URL ({why}); percent-encode a password's reserved characters (@ / ? # :)"
            ) from None
        store = cls(client, prefix=prefix, poll=poll)
        store._owned = True
        return store

    def _where(self) -> str:
        """`` at host:port/db`` (or the cluster's start-up nodes) for errors; never a password."""
        if isinstance(self._client, RedisCluster):
            nodes = getattr(getattr(self._client, "nodes_manager", None), "startup_nodes", {})
            return f" at cluster {','.join(sorted(nodes))}" if nodes else ""
        kwargs = getattr(getattr(self._client, "connection_pool", None), "connection_kwargs", {})
        if "path" in kwargs:
            return f" at {kwargs['path']}"
        if "host" in kwargs:
            return f" at {kwargs['host']}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
        return ""

    def __repr__(self) -> str:
        kind = "cluster" if self.cluster else "redis"
        return f"RedisStore({kind}, prefix={self.prefix!r})"

    @property
    def client(self) -> Client:
        """The redis-py client in use."""
        return self._client

    # -- keys ------------------------------------------------------------------------

    def _rec(self, digest: str) -> str:
        return f"{self.prefix}:{{{digest}}}:rec"

    def _lease(self, digest: str) -> str:
        return f"{self.prefix}:{{{digest}}}:lease"

    def _index(self, namespace: str) -> str:
        digest = hashlib.sha256(namespace.encode()).hexdigest()[:32]
        return f"{self.prefix}:{{{digest}}}:tenants"

    def _claim(self, namespace: str, code_hash: str) -> str:
        digest = hashlib.sha256(f"{namespace}\x00{code_hash}".encode()).hexdigest()[:32]
        return f"{self.prefix}:claim:{{{digest}}}"

    def _throttle(self, namespace: str) -> str:
        return f"{self.prefix}:{{{hold_digest(namespace)}}}:throttle"

    def _message(self, digest: str) -> str:
        return f"{digest} {self._origin}"

    # -- the one boundary where driver errors become ours ------------------------------

    async def _call(self, what: str, operation: Any, *, queued: bool = False, closing: bool = False) -> Any:
        """Await ``operation`` (a redis-py call, or ``queued``: one of :meth:`_queued`,
        whose pipeline takes the connection slot), its errors as StoreUnavailable.
        ``closing``: a lease given back while ``aclose`` waits, which it still allows."""
        if self._closed and not closing:
            operation.close()  # never awaited: close it so it does not warn
            raise closed_error("redis")
        try:
            if self._uninitialized:
                await self._initialize()
            if self._slots is None or queued:
                return await operation
            async with self._slots:
                return await operation
        except (RedisError, OSError) as exc:
            operation.close()  # in case it never started
            raise StoreUnavailable(f"redis {what} failed{self._where()}: {type(exc).__name__}") from exc
        except BaseException:
            operation.close()  # cancelled while waiting for a slot: never awaited
            raise

    async def _initialize(self) -> None:
        # redis-py's asyncio cluster client can hand a connection that is being torn down
        # to one of many commands racing through its first initialization; initialize
        # once, alone, before the first command instead.
        async with self._init_lock:
            if self._uninitialized and isinstance(self._client, RedisCluster):
                await self._client.initialize()
            self._uninitialized = False

    async def _script(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[str | bytes | int],
        orphaned: Callable[[Any], None] | None = None,
        closing: bool = False,
    ) -> Any:
        """Run a script; ``orphaned`` gets its reply if its caller is gone (cancelled)."""
        if not self.cluster:
            script = self._scripts[name]
            reply = await self._call(
                name,
                self._pipeline((("EVALSHA", script.sha, len(keys), *keys, *args), orphaned)),
                queued=True,
                closing=closing,
            )
            if reply is not _NOSCRIPT:
                return reply
            # First use on this server (or after SCRIPT FLUSH): it did not run; redis-py's
            # script object loads it and runs it.
        script = self._scripts[name]
        if orphaned is None:
            return await self._call(name, script(keys=keys, args=args), closing=closing)
        outliving = self._outliving(lambda: script(keys=keys, args=args), orphaned)
        return await self._call(name, outliving, closing=closing)

    async def _outliving(self, call: Callable[[], Awaitable[Any]], orphaned: Callable[[Any], None]) -> Any:
        """``call()``'s reply, the call run in a task of its own: a caller cancelled after it
        left does not cut it short (its reply would be lost with the connection), and its
        reply goes to ``orphaned``. ``aclose`` waits for these tasks."""
        task = asyncio.ensure_future(call())
        self._outlivers.add(task)
        task.add_done_callback(self._outlivers.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and me is not None and not me.cancelling():
                # Cut short by aclose, not by this caller's own cancellation.
                raise closed_error("redis") from None
            task.add_done_callback(functools.partial(_hand_on, orphaned))
            raise

    async def _send_pipeline(self, queued: list[_Queued]) -> list[Any]:
        """The replies of ``queued`` commands sent as one pipeline: a server error is its
        command's outcome, ``NOSCRIPT`` becomes ``_NOSCRIPT``."""
        commands = [command for command, _ in queued]
        if self._slots is None:
            replies = await self._exchange(commands)
        else:
            async with self._slots:
                replies = await self._exchange(commands)
        return [_NOSCRIPT if isinstance(reply, NoScriptError) else reply for reply in replies]

    async def _exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write on one pooled connection and read their replies
        (a server error is its command's reply, as redis-py's pipeline with
        ``raise_on_error=False`` gives it).

        What that pipeline does, for less CPU: one timer bounds the whole exchange (redis-py
        arms one per reply), and hiredis, when installed, packs the commands (redis-py's
        asyncio client packs them in Python, about ten times slower). A connection that
        fails or times out mid-exchange is closed by redis-py before it goes back to the pool.
        """
        assert not isinstance(self._client, RedisCluster)  # auto-pipelining is for one server
        pool = self._client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            if _pack_command is None:
                packed: Any = connection.pack_commands(commands)
            else:
                packed = b"".join([_pack_command(command) for command in commands])
            await connection.send_packed_command(packed)
            replies: list[Any] = []
            async with asyncio.timeout(connection.socket_timeout):
                for _ in commands:
                    try:
                        replies.append(await connection.read_response(timeout=math.inf))
                    except ResponseError as error:
                        replies.append(error)
            return replies
        finally:
            await pool.release(connection)

    # -- records ---------------------------------------------------------------------

    def _update_args(self, key: TenantKey, update: Update) -> list[str | bytes]:
        return [
            update.payload,
            update.status.value,
            _float_text(update.expires_at),
            _float_text(update.updated_at),
            key.namespace,
            key.tenant,
        ]

    async def read(self, key: TenantKey) -> Record | None:
        """The tenant's record (one ``HMGET``), or ``None``."""
        rec = self._rec(key.digest)
        command = (
            self._client.hmget(rec, list(_RECORD_FIELDS))
            if self.cluster
            else self._pipeline((("HMGET", rec, *_RECORD_FIELDS), None))
        )
        fields = await self._call("read", command, queued=not self.cluster)
        return record_from_columns(key, *fields)

    async def acquire(
        self, key: TenantKey, owner: str, ttl: float, *, unless_fresh: Freshness | None = None
    ) -> Acquisition:
        """Take the lease (one script): a new fence from ``HINCRBY`` and the record seen;
        with ``unless_fresh``, only if the record is due (judged in the same script)."""
        args: list[str | bytes | int] = [owner, _ms(ttl)]
        if unless_fresh is not None:
            rule = unless_fresh
            args += [_float_text(rule.at), _float_text(rule.margin), _float_text(rule.share)]
        with self._orphan_leases.sending(key, owner):
            reply = await self._script(
                "acquire",
                [self._rec(key.digest), self._lease(key.digest)],
                args,
                orphaned=functools.partial(self._won_for_nobody, key, owner),
            )
        fence = int(reply[0])
        record = record_from_columns(key, *reply[1:6])
        return Acquisition(Lease(key, owner, fence) if fence else None, record)

    def _won_for_nobody(self, key: TenantKey, owner: str, reply: Any) -> None:
        """An acquisition's reply that found its caller gone: a lease won is given back."""
        if isinstance(reply, list) and reply and int(reply[0]):
            self._orphan_leases.give_back(Lease(key, owner, int(reply[0])))

    async def extend(self, lease: Lease, ttl: float) -> bool:
        """Push the lease's PX expiry (one script); False if fenced out or released."""
        digest = lease.key.digest
        reply = await self._script(
            "extend", [self._rec(digest), self._lease(digest)], [str(lease.fence), lease.owner, _ms(ttl)]
        )
        return bool(reply)

    async def release(self, lease: Lease) -> bool:
        """Give the lease back and announce (one script); False if it was not ours."""
        return await self._release(lease)

    async def _release(self, lease: Lease, *, closing: bool = False) -> bool:
        digest = lease.key.digest
        reply = await self._script(
            "release",
            [self._rec(digest), self._lease(digest)],
            [str(lease.fence), lease.owner, self._channel, self._message(digest)],
            closing=closing,
        )
        if reply:
            self._notifier.notify(digest)
        return bool(reply)

    async def commit(self, lease: Lease, update: Update) -> Record | None:
        """Fenced write, release and announce (one script, its ``notice`` in the
        announcement); ``None`` when fenced out."""
        key = lease.key
        version = await self._script(
            "commit",
            [self._rec(key.digest), self._lease(key.digest)],
            [
                str(lease.fence),
                lease.owner,
                self._channel,
                self._message(key.digest),
                *self._update_args(key, update),
                update.notice or b"",
            ],
        )
        if not version:
            return None
        self._notifier.notify(key.digest)
        return Record(key, update.payload, update.status, int(version), update.expires_at, update.updated_at)

    async def replace(self, key: TenantKey, update: Update | None) -> None:
        """Unconditional write or forget that fences out any holder, then announce.

        Two commands: ``SADD`` of the digest to the namespace index (its own slot), then
        the script. The index is written first and never shrinks, so it is always a
        superset of the live tenants; listings skip forgotten ones.
        """
        digest = key.digest
        if update is not None:
            await self._call("replace", self._client.sadd(self._index(key.namespace), digest))
        args: list[str | bytes] = [self._channel, self._message(digest)]
        args += ["forget"] if update is None else ["set", *self._update_args(key, update)]
        await self._script("replace", [self._rec(digest), self._lease(digest)], args)
        self._notifier.notify(digest)

    async def tenants(self, namespace: str) -> list[Record]:
        """Every live record of the namespace: ``SMEMBERS`` of its index, then one
        pipelined ``HMGET`` per tenant."""
        digests = await self._call("tenants", self._client.smembers(self._index(namespace)))
        if not digests:
            return []
        ordered = sorted(_text(d) or "" for d in digests)
        pipe = self._client.pipeline(transaction=False)
        for digest in ordered:
            pipe.hmget(self._rec(digest), [*_RECORD_FIELDS, "ns", "tenant"])
        rows = await self._call("tenants", pipe.execute())
        records = []
        for digest, row in zip(ordered, rows, strict=True):
            try:
                ns, tenant = _text(row[5]), _text(row[6])
            except UnicodeDecodeError:
                log.warning(
                    "redis store: record %s names no readable tenant; left out of the listing", digest
                )
                continue
            if ns != namespace or tenant is None:
                continue
            record = record_from_columns(TenantKey(ns, tenant), *row[:5])
            if record is not None:
                records.append(record)
        return records

    # -- code claims -----------------------------------------------------------------

    async def hold(self, namespace: str, until: float) -> float:
        """Raise the app's "not before" instant to ``until`` if later, and announce it."""
        digest = hold_digest(namespace)
        reply = await self._script(
            "hold", [self._throttle(namespace)], [repr(float(until)), self._channel, self._message(digest)]
        )
        in_force = _seconds(reply, "hold")
        if until > 0 and in_force == until:  # raised now (or a resend: a spare wake-up)
            self._notifier.notify(digest)
        return in_force

    async def admit(self, namespace: str, ticket: str, interval: float, burst: int) -> float:
        """Seconds to wait before a provider call (the hold, or the shared budget); 0: admitted."""
        reply = await self._script(
            "admit", [self._throttle(namespace)], [ticket, repr(float(interval)), str(max(burst, 1))]
        )
        return max(_seconds(reply, "admission"), 0.0)

    async def claim_code(self, key: TenantKey, code_hash: str, owner: str, ttl: float) -> CodeClaim:
        """Claim a code (one script, expiry judged by Redis ``TIME``)."""
        won, state, ns, tenant, expired, outcome = await self._script(
            "claim_code",
            [self._claim(key.namespace, code_hash)],
            [owner, _ms(ttl), _ms(CLAIM_RETENTION), key.namespace, key.tenant, key.digest],
        )
        try:
            claimant = TenantKey(_text(ns) or key.namespace, _text(tenant) or "")
            claim_state = ClaimState(_text(state))
            claim_outcome = _text(outcome)
        except (ValueError, TypeError, UnicodeDecodeError):
            raise StoreUnavailable("redis holds a malformed code claim") from None
        return CodeClaim(
            claimant,
            code_hash,
            owner,
            claim_state,
            won=bool(won),
            expired=bool(expired),
            outcome=claim_outcome,
        )

    async def advance_code(
        self, claim: CodeClaim, state: ClaimState, ttl: float, outcome: str | None = None
    ) -> bool:
        """Move an owned claim forward and announce on its tenant (one script)."""
        reply = await self._script(
            "advance_code",
            [self._claim(claim.key.namespace, claim.code_hash)],
            [
                claim.owner,
                state.value,
                _ms(ttl),
                _ms(CLAIM_RETENTION),
                "0" if outcome is None else "1",
                outcome or "",
                self._channel,
                self._origin,
            ],
        )
        if reply:
            self._notifier.notify(claim.key.digest)
        return bool(reply)

    # -- change notification ---------------------------------------------------------

    def watch(self, key: TenantKey) -> AbstractAsyncContextManager[Watch]:
        """Register for changes of ``key``; starts the store's one subscription lazily."""
        if self._listener.settled:
            return self._notifier.watch(key)  # nothing to start or wait for
        return self._notifier.watch(key, self._subscribed)

    async def _subscribed(self) -> None:
        """Once a watch is registered: the subscription is started and (at most 2 s) up."""
        if not self._closed:
            self._listener.start()
            await self._listener.ready(timeout=2.0)

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        """Call ``callback(digest)`` on every change announced by any process."""
        unsubscribe = self._notifier.on_change(callback)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # started by the first watch instead
        else:
            if not self._closed:
                self._listener.start()
        return unsubscribe

    async def _open_pubsub(self) -> Any:
        if not isinstance(self._client, RedisCluster):
            return self._client.pubsub()
        # Classic PUBLISH reaches every node of a cluster, so one node is enough; a plain
        # connection to it works with every redis-py version (the asyncio cluster client
        # has no pubsub before redis-py 8).
        cluster = self._client
        if not cluster.get_nodes():
            await cluster.initialize()
        node = cluster.get_random_node()
        pool = aioredis.ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
        return _OwnedPubSub(aioredis.Redis(connection_pool=pool))

    # -- health and lifecycle --------------------------------------------------------

    async def check(self) -> None:
        """Raise StoreUnavailable unless Redis answers a ``PING``."""
        await self._call("ping", self._client.ping())

    async def aclose(self) -> None:
        """Stop the subscription; close the client if this store built it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        in_flight = self._pipeline.in_flight | self._outlivers
        if in_flight:  # commands already sent get their replies (and a lease won, its give-back)
            await asyncio.wait(in_flight, timeout=10.0)
        for task in self._outlivers:
            task.cancel()  # still out after that: nothing more is sent for it
        await self._orphan_leases.wait(5.0)  # leases won for cancelled callers
        await self._listener.aclose()
        if self._owned:
            with suppress(RedisError, OSError):
                await self._client.aclose()


class _OwnedPubSub:
    """A pub/sub on a client of its own: closing it closes that client's pool too."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pubsub = client.pubsub()

    async def subscribe(self, channel: str) -> None:
        await self._pubsub.subscribe(channel)

    async def get_message(self, **options: Any) -> Any:
        return await self._pubsub.get_message(**options)

    @property
    def connection(self) -> Any:
        """The subscribed connection (``None`` before the first subscribe)."""
        return self._pubsub.connection

    async def aclose(self) -> None:
        try:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        finally:
            await self._client.connection_pool.disconnect()


def _hand_on(orphaned: Callable[[Any], None], task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is None:
        orphaned(task.result())


def _orphaned_reply(queued: _Queued, reply: Any) -> None:
    """A queued command's reply whose caller is gone goes to the command's own handler."""
    handler = queued[1]
    if handler is not None:
        handler(reply)


def _check_options(prefix: str, poll: float) -> None:
    if not _PREFIX.fullmatch(prefix):
        raise ConfigurationError(
            f"a redis store prefix must be 1-64 characters of letters, digits and _.:/- (got {prefix!r})"
        )
    if not poll > 0:
        raise ConfigurationError("poll must be a positive number of seconds")


def _decodes_responses(client: Client) -> bool:
    try:
        kwargs = client.get_connection_kwargs()
    except AttributeError:  # pragma: no cover - older redis-py
        kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    return bool(kwargs.get("decode_responses"))


def _without(url: str, option: str) -> str:
    """``url`` without the query ``option`` (the cluster client has no blocking pool)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != option]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))

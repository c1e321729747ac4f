"""Real Redis servers for the tests: the shared one, throwaway ones, a 3-master cluster.

* :func:`shared_redis_url` reuses ``$FT_TEST_REDIS_URL`` (default 127.0.0.1:6379) when it
  answers (never flushed: tests use a unique key prefix), else starts one throwaway server
  for the session. When neither works it raises: Redis tests fail, they never skip.
* :class:`RedisServer` is a throwaway ``redis-server`` on a free port with its own temp
  dir, which a test may stop, kill and restart (optionally with AOF).
* :class:`RedisClusterServers` starts three masters with ``--cluster-enabled yes`` and
  joins them with ``redis-cli --cluster create``; :func:`shared_cluster` is one for the
  whole run (started on first use, stopped at exit).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .stores import REDIS_URL as DEFAULT_URL
from .stores import REDIS_URL_ENV as SHARED_URL_ENV


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found on PATH: install redis-server (apt-get install redis-server)")
    return path


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, bus: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (and ``port + 10000`` too when ``bus``, for Cluster)."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if _port_free(port) and (not bus or _port_free(port + 10000)):
            return port
    raise RuntimeError("no free port found")


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING at ``host:port`` (RESP over a raw socket)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def unique_prefix() -> str:
    """A key prefix no other test (or engineer) uses."""
    return f"ft-test-{secrets.token_hex(6)}"


class RedisServer:
    """A throwaway ``redis-server`` owned by the test: own port, own temp dir.

    ``aof=True`` turns on ``--appendonly yes --appendfsync always`` so a restart (even
    after SIGKILL) keeps every acknowledged write.
    """

    def __init__(self, *, aof: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port(bus="--cluster-enabled" in extra)
        self.dir = Path(tempfile.mkdtemp(prefix="ft-redis-"))
        self.aof = aof
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart, on the same port and data) and wait until it answers."""
        args = [
            _binary("redis-server"),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        args += list(self.extra)
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not ping("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGKILL simulates a crash) and wait until it is gone."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def close(self) -> None:
        """Stop the server and remove its temp dir."""
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RedisClusterServers:
    """Three masters joined into a Redis Cluster (no replicas), from the local binaries."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(
                extra=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                )
            )
            for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        """A cluster URL naming one node (the client discovers the others)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        result = subprocess.run(
            [
                _binary("redis-cli"),
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {result.stdout[-2000:]!r}")
        deadline = time.monotonic() + 30
        while not all(self._state_ok(node.port) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        return self

    @staticmethod
    def _state_ok(port: int) -> bool:
        out = subprocess.run(
            [_binary("redis-cli"), "-p", str(port), "cluster", "info"],
            capture_output=True,
            timeout=10,
            check=False,
        ).stdout
        return b"cluster_state:ok" in out

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisClusterServers:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def shared_redis_url() -> Iterator[str]:
    """The URL of a Redis the tests may share (with unique prefixes), for the session.

    Reuses ``$FT_TEST_REDIS_URL`` (default 127.0.0.1:6379) when it answers; otherwise
    starts a throwaway server. Raises (the tests fail, never skip) when neither works.
    """
    url = os.environ.get(SHARED_URL_ENV, DEFAULT_URL)
    host_port = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = host_port.partition(":")
    if ping(host or "127.0.0.1", int(port or 6379)):
        yield url
        return
    if SHARED_URL_ENV in os.environ:
        raise RuntimeError(f"${SHARED_URL_ENV} ({url}) does not answer PING")
    with RedisServer() as server:
        yield server.url


class CommandLog:
    """What clients send to a (throwaway) server, seen through ``MONITOR``.

    Commands run by Lua scripts are left out: they are part of the one ``EVALSHA`` that
    ran them. Use :meth:`measure` to collect exactly the commands one awaitable sent.
    """

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        self._monitor_client = aioredis.Redis.from_url(url)
        self._admin = aioredis.Redis.from_url(url)
        self._seen: list[tuple[str, str]] = []
        self._marks: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CommandLog:
        started = asyncio.Event()

        async def collect() -> None:
            async with self._monitor_client.monitor() as monitor:
                started.set()
                while True:
                    info = await monitor.next_command()
                    command = str(info["command"])
                    if info["client_type"] == "lua":
                        continue
                    if command.startswith("ECHO ft-mark-"):
                        self._marks.setdefault(command.split()[1], asyncio.Event()).set()
                        continue
                    self._seen.append((command.split(" ", 1)[0].lower(), command))

        self._task = asyncio.create_task(collect())
        await asyncio.wait_for(started.wait(), 10)
        await self._sync()
        return self

    async def _sync(self) -> None:
        """Return once every command sent before this call has been logged."""
        mark = f"ft-mark-{secrets.token_hex(4)}"
        event = self._marks.setdefault(mark, asyncio.Event())
        await self._admin.echo(mark)
        await asyncio.wait_for(event.wait(), 10)

    async def measure(self, awaitable: Any) -> tuple[Any, list[str]]:
        """Run ``awaitable``; return its result and the names of the commands it sent."""
        await self._sync()
        self._seen.clear()
        result = await awaitable
        await self._sync()
        return result, [name for name, _ in self._seen]

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._monitor_client.aclose()
        await self._admin.aclose()


_prefixes: list[tuple[str, str]] = []
_fallback: RedisServer | None = None
_cluster: RedisClusterServers | None = None


def server_url() -> str:
    """The shared Redis URL when it answers, else a throwaway server kept until exit."""
    global _fallback
    url = os.environ.get(SHARED_URL_ENV, DEFAULT_URL)
    host_port = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = host_port.partition(":")
    if ping(host or "127.0.0.1", int(port or 6379)):
        return url
    if SHARED_URL_ENV in os.environ:
        raise RuntimeError(f"${SHARED_URL_ENV} ({url}) does not answer PING")
    if _fallback is None:
        _fallback = RedisServer().start()
        atexit.register(_fallback.close)
    return _fallback.url


def store_url(base: str | None = None) -> str:
    """A store URL on ``base`` (default :func:`server_url`) with a unique key prefix, whose
    keys are deleted at exit (only that prefix's); its connections are named after the
    prefix (``client_name``), so a test can find and kill them."""
    base = base or server_url()
    prefix = unique_prefix()
    _prefixes.append((base, prefix))
    return f"{base}{'&' if '?' in base else '?'}prefix={prefix}&client_name={prefix}"


def shared_cluster() -> RedisClusterServers:
    """One 3-master Redis Cluster for the whole test run, started on first use."""
    global _cluster
    if _cluster is None:
        cluster = RedisClusterServers()
        cluster.__enter__()
        atexit.register(cluster.close)
        _cluster = cluster
    return _cluster


def node_urls(url: str) -> list[str]:
    """The plain ``redis://`` URL of every master behind a store URL (one for a single server)."""
    from urllib.parse import urlsplit

    import redis

    parts = urlsplit(url)
    plain = f"redis://{parts.netloc}{'' if '+cluster' in parts.scheme else parts.path}"
    if "+cluster" not in parts.scheme:
        return [plain]
    client = redis.Redis.from_url(plain, socket_timeout=5)
    try:
        nodes = client.execute_command("CLUSTER NODES")  # {"host:port": {"flags": "master,...", ...}}
    finally:
        client.close()
    return [
        f"redis://{address.split('@')[0]}" for address, node in nodes.items() if "master" in node["flags"]
    ]


def _drop_prefixes() -> None:
    import redis

    for base, prefix in _prefixes:
        with contextlib.suppress(Exception):
            for node in node_urls(base.split("?", 1)[0]):
                client = redis.Redis.from_url(node, socket_timeout=5)
                try:
                    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                    if keys:
                        client.unlink(*keys)
                finally:
                    client.close()


atexit.register(_drop_prefixes)

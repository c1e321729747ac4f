"""PostgreSQL for the tests: the shared server when it answers, else a throwaway cluster.

* :func:`server_url` is the base URL of a server to test against: ``$FT_TEST_POSTGRES_URL``
  (default 127.0.0.1:5432, database ``test``) when it answers, else a cluster started from the local
  ``initdb``/``pg_ctl`` for this test run. If neither works it raises, so the Postgres tests
  FAIL instead of being skipped.
* :func:`store_url` gives a URL with a fresh schema (``ft_<random>``); every schema made
  through this module is dropped at exit. Tests never touch any other schema.
* :class:`TempCluster` is a private cluster in a temp dir (as the ``postgres`` user when
  running as root, since postgres refuses root), for tests that stop or restart the server.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from urllib.parse import urlsplit

import asyncpg

from .stores import POSTGRES_URL as SHARED_URL

_base: str | None = None
_fallback: TempCluster | None = None
_schemas: list[tuple[str, str]] = []


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=2):
            return True
    except OSError:
        return False


def _ensure_database(url: str) -> None:
    """Create the URL's database if the server lacks it (a fresh CI machine)."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    psql = shutil.which("psql")
    if not name or psql is None:
        return
    base = [psql, "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432)]
    base += ["-U", parts.username or "postgres", "-d", "postgres", "-tAc"]
    found = subprocess.run([*base, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    if found.returncode == 0 and found.stdout.strip() != "1":
        subprocess.run([*base, f'CREATE DATABASE "{name}"'], capture_output=True, timeout=30)


def server_url() -> str:
    """The base URL of a PostgreSQL server for the tests (see the module docstring)."""
    global _base, _fallback
    if _base is None:
        if _answers(SHARED_URL):
            _ensure_database(SHARED_URL)
            _base = SHARED_URL
        else:
            _fallback = TempCluster()
            _fallback.start()
            atexit.register(_fallback.close)
            _base = _fallback.url
    return _base


def unique_schema() -> str:
    """A schema name no other test uses."""
    return f"ft_{secrets.token_hex(6)}"


def store_url(base: str | None = None, **options: str) -> str:
    """A store URL on ``base`` (default :func:`server_url`) with a fresh schema, dropped at exit."""
    base = base or server_url()
    schema = options.pop("schema", None) or unique_schema()
    _schemas.append((base, schema))
    query = "&".join([f"schema={schema}", *(f"{k}={v}" for k, v in options.items())])
    return f"{base}{'&' if '?' in base else '?'}{query}"


def postgres_store_url() -> str:
    """For the multi-process harness: a store URL with a unique schema."""
    return store_url()


async def drop_schema(base: str, schema: str) -> None:
    """Drop ``schema`` (only names this module made: ``ft_`` + hex)."""
    assert schema.startswith("ft_") and schema[3:].replace("_", "").isalnum()
    con = await asyncpg.connect(base, timeout=5)
    try:
        await con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await con.close()


def _drop_all() -> None:
    async def run() -> None:
        for base, schema in _schemas:
            with contextlib.suppress(Exception):
                await drop_schema(base, schema)

    if _schemas:
        with contextlib.suppress(Exception):
            asyncio.run(run())


atexit.register(_drop_all)


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if found is None:
        raise RuntimeError(f"no {name} binary: install PostgreSQL's server package to run these tests")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TempCluster:
    """A throwaway PostgreSQL cluster in a temp dir, on a free port of 127.0.0.1.

    Runs ``initdb``/``pg_ctl`` as the ``postgres`` user when the tests run as root.
    """

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ft-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._initialized = False

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr[-2000:]}")

    def start(self) -> None:
        """Create the cluster (first time) and start it; returns once it accepts connections."""
        if not self._initialized:
            self._run(_pg_bin("initdb"), "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "-N")
            self._initialized = True
        options = f"-k {self.dir} -h 127.0.0.1 -p {self.port} -c fsync=off -c max_connections=60"
        self._run(
            _pg_bin("pg_ctl"), "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "-t", "60",
            "-o", options, "start",
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server (fast: clients are disconnected)."""
        self._run(_pg_bin("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")

    def close(self) -> None:
        """Stop the server if running and delete its files."""
        with contextlib.suppress(Exception):
            self._run(_pg_bin("pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TempCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def migrate_worker(url: str, index: int, start: object, results: object) -> None:
    """One of the processes that start at once on an empty schema (spawned by a test)."""
    from factorial_tokens_postgres import PostgresStore

    from factorial_tokens.store import TenantKey, Update

    async def run() -> str:
        store = PostgresStore.from_url(url)
        try:
            await store.check()
            key = TenantKey("workers", f"w{index}")
            await store.replace(key, Update(f"w{index}".encode(), updated_at=float(index)))
            record = await store.read(key)
            assert record is not None and record.payload == f"w{index}".encode()
            return "ok"
        finally:
            await store.aclose()

    start.wait(30)  # type: ignore[attr-defined]
    try:
        outcome = asyncio.run(run())
    except BaseException as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    results.put((index, outcome))  # type: ignore[attr-defined]

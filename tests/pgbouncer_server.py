"""Throwaway PgBouncers in transaction pooling, in front of the tests' PostgreSQL.

* :class:`TempPgBouncer` is a ``pgbouncer`` on a free port of 127.0.0.1 with its own temp
  dir and config: ``pool_mode = transaction``, trust auth, small pools, pointing at the
  database of :func:`tests.postgres_server.server_url`. It runs as the ``postgres`` user
  when the tests run as root (pgbouncer refuses root). :meth:`TempPgBouncer.admin` runs a
  ``SHOW`` command on its admin console (through ``psql``: the console speaks only the
  simple query protocol).
* :func:`shared` is one such PgBouncer for the whole test run (stopped at exit), and
  :func:`store_url` a store URL through it with a fresh schema and ``pgbouncer=true``.

No ``pgbouncer`` binary is an error, never a skip: ``scripts/ensure-services.sh`` installs it.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import io
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from urllib.parse import urlsplit

from . import postgres_server

_shared: TempPgBouncer | None = None


def _binary() -> str:
    found = shutil.which("pgbouncer")
    if found is None and os.access("/usr/sbin/pgbouncer", os.X_OK):
        found = "/usr/sbin/pgbouncer"  # not on PATH for non-root users
    if found is None:
        raise RuntimeError("no pgbouncer binary: run scripts/ensure-services.sh (apt-get install pgbouncer)")
    return found


def _version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


class TempPgBouncer:
    """A throwaway PgBouncer (transaction pooling) in front of ``target`` (a postgres URL,
    default :func:`tests.postgres_server.server_url`); :attr:`url` reaches the same database
    through it. At most ``pool_size`` server connections are opened to PostgreSQL."""

    def __init__(self, target: str | None = None, *, pool_size: int = 4) -> None:
        self.binary = _binary()
        self.version = _version(self.binary)
        self.target = target or postgres_server.server_url()
        parts = urlsplit(self.target)
        self.database = parts.path.lstrip("/") or "postgres"
        self.pool_size = pool_size
        self.dir = tempfile.mkdtemp(prefix="ft-pgbouncer-")
        self.port = postgres_server._free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"
        self.config = os.path.join(self.dir, "pgbouncer.ini")
        self.log = os.path.join(self.dir, "pgbouncer.log")
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": self.dir,
            "pidfile": os.path.join(self.dir, "pgbouncer.pid"),
            "logfile": self.log,
            "auth_type": "trust",
            "auth_file": os.path.join(self.dir, "users.txt"),
            "admin_users": "postgres",
            "pool_mode": "transaction",
            "default_pool_size": str(pool_size),
            "min_pool_size": "0",
            "reserve_pool_size": "0",
            "max_client_conn": "200",
            # asyncpg sends these at startup; PgBouncer would refuse the connection otherwise
            "ignore_startup_parameters": "extra_float_digits,options,application_name",
            "log_connections": "0",
            "log_disconnections": "0",
        }
        if self.version >= (1, 21):
            # Newer PgBouncers can track named prepared statements (1.22+ by default);
            # keep the plain transaction pooling the PgBouncer mode is meant for.
            settings["max_prepared_statements"] = "0"
        host, port = parts.hostname or "127.0.0.1", parts.port or 5432
        user = parts.username or "postgres"
        lines = [
            "[databases]",
            f"{self.database} = host={host} port={port} dbname={self.database} user={user}",
            "[pgbouncer]",
            *(f"{name} = {value}" for name, value in settings.items()),
        ]
        with open(self.config, "w") as file:
            file.write("\n".join(lines) + "\n")
        with open(settings["auth_file"], "w") as file:
            file.write('"postgres" ""\n')
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            for path in (self.dir, self.config, settings["auth_file"]):
                os.chown(path, account.pw_uid, account.pw_gid)
            self._as_user = ["-u", "postgres"]
        self._process: subprocess.Popen[bytes] | None = None

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def start(self) -> None:
        """Start it; returns once it accepts connections (raises with its log otherwise)."""
        self._process = subprocess.Popen(
            [self.binary, *self._as_user, self.config], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 20
        while not self._accepts():
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = self._tail()
                self.stop()
                raise RuntimeError(f"pgbouncer did not start: {tail}")
            time.sleep(0.05)

    def _tail(self) -> str:
        text = ""
        with contextlib.suppress(OSError):
            with open(self.log) as file:
                text = file.read()[-2000:]
        process = self._process
        if process is not None and process.stderr is not None and process.poll() is not None:
            text += process.stderr.read().decode(errors="replace")[-2000:]
        return text

    def stop(self) -> None:
        """Stop it (SIGINT: PgBouncer's safe shutdown; SIGKILL if it lingers)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if process.stderr is not None:
            process.stderr.close()

    def close(self) -> None:
        """Stop it and delete its files."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TempPgBouncer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def admin(self, command: str) -> list[dict[str, str]]:
        """Rows of an admin console command (``SHOW POOLS``, ``SHOW STATS``, ...)."""
        psql = shutil.which("psql")
        if psql is None:
            raise RuntimeError("no psql binary: install postgresql-client")
        result = subprocess.run(
            [psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "pgbouncer", "--csv",
             "-c", command],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"pgbouncer admin {command!r} failed: {result.stderr[-1000:]}")
        return list(csv.DictReader(io.StringIO(result.stdout)))

    def pool(self) -> dict[str, str]:
        """This database's row of ``SHOW POOLS``."""
        rows = [r for r in self.admin("SHOW POOLS") if r["database"] == self.database]
        return rows[0] if rows else {}  # no row before its first client

    def stats(self) -> dict[str, str]:
        """This database's row of ``SHOW STATS``."""
        rows = [r for r in self.admin("SHOW STATS") if r["database"] == self.database]
        return rows[0] if rows else {}  # no row before its first client


def shared() -> TempPgBouncer:
    """One PgBouncer for the whole test run, in front of the tests' PostgreSQL."""
    global _shared
    if _shared is None:
        bouncer = TempPgBouncer()
        bouncer.start()
        atexit.register(bouncer.close)
        _shared = bouncer
    return _shared


def store_url(bouncer: TempPgBouncer | None = None, **options: str) -> str:
    """A store URL through ``bouncer`` (default :func:`shared`) with a fresh schema (dropped at
    exit, directly on PostgreSQL) and ``pgbouncer=true`` unless ``options`` say otherwise."""
    bouncer = bouncer or shared()
    options.setdefault("pgbouncer", "true")
    direct = postgres_server.store_url(bouncer.target, **options)  # registers the schema
    return f"{bouncer.url}?{urlsplit(direct).query}"

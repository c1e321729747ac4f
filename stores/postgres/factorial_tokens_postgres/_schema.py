"""The store's tables, their migrations, and safe identifier handling.

Every migration runs in one transaction under ``pg_advisory_xact_lock``, so any number of
workers may start at once on an empty database: one creates the schema, the others wait
for the lock, then see the version already applied and do nothing.
"""

from __future__ import annotations

import hashlib
import re

from factorial_tokens import ConfigurationError

__all__ = ["SCHEMA_VERSION", "Names", "migrations"]

#: The schema version this package writes and understands.
SCHEMA_VERSION = 1

_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_]{0,15}")


class Names:
    """Quoted, validated identifiers for one (schema, table prefix) pair.

    Names are checked against a strict pattern (letters, digits, underscores; a schema of
    at most 40 characters, a prefix of at most 15) and always double-quoted, so neither a
    reserved word nor a hostile setting can change a statement's meaning.
    """

    def __init__(self, schema: str, table_prefix: str) -> None:
        if not isinstance(schema, str) or not _SCHEMA_RE.fullmatch(schema):
            raise ConfigurationError(
                f"invalid Postgres schema name {schema!r}: use 1-40 letters, digits or underscores, "
                "not starting with a digit"
            )
        if schema.lower().startswith("pg_") or schema.lower() == "information_schema":
            raise ConfigurationError(f"schema {schema!r} is reserved by PostgreSQL; pick another name")
        if not isinstance(table_prefix, str) or not _PREFIX_RE.fullmatch(table_prefix):
            raise ConfigurationError(
                f"invalid table prefix {table_prefix!r}: use at most 15 letters, digits or underscores"
            )
        self.schema = schema
        self.table_prefix = table_prefix
        self.q_schema = f'"{schema}"'
        self.meta = f'"{schema}"."{table_prefix}meta"'
        self.tenants = f'"{schema}"."{table_prefix}tenants"'
        self.claims = f'"{schema}"."{table_prefix}code_claims"'
        self.claims_index = f'"{table_prefix}code_claims_expires"'
        #: The NOTIFY channel (at most 63 bytes, Postgres' identifier limit).
        self.channel = f"{schema}.{table_prefix}changes"
        #: The key of the transaction-level advisory lock that serializes migrations.
        digest = hashlib.sha256(f"factorial_tokens:{schema}:{table_prefix}".encode()).digest()
        self.lock_key = int.from_bytes(digest[:8], "big", signed=True)


def migrations(n: Names) -> dict[int, list[str]]:
    """The statements that bring the schema from version ``v - 1`` to ``v``, by ``v``."""
    return {
        1: [
            f"CREATE SCHEMA IF NOT EXISTS {n.q_schema}",
            f"""CREATE TABLE IF NOT EXISTS {n.meta} (
                name text PRIMARY KEY,
                value bigint NOT NULL
            )""",
            # One row per tenant ever seen. A forgotten tenant keeps its row with a NULL
            # payload (a tombstone), so its fence keeps growing across forget/reconnect.
            # Half of each page is left free: every refresh updates its row twice (acquire,
            # commit) and no indexed column, so the new versions fit beside the old ones
            # (HOT updates: no index entry per write, about a third less server time for a
            # batch of acquisitions and commits than with full pages).
            f"""CREATE TABLE IF NOT EXISTS {n.tenants} (
                namespace text NOT NULL,
                tenant text NOT NULL,
                digest text NOT NULL,
                payload bytea,
                status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'needs_reauth')),
                version bigint NOT NULL DEFAULT 0,
                expires_at double precision,
                updated_at double precision NOT NULL DEFAULT 0,
                fence bigint NOT NULL DEFAULT 0,
                written_fence bigint NOT NULL DEFAULT 0,
                lease_owner text,
                lease_expires timestamptz,
                PRIMARY KEY (namespace, tenant)
            ) WITH (fillfactor = 50)""",
            f"""CREATE TABLE IF NOT EXISTS {n.claims} (
                namespace text NOT NULL,
                code_hash text NOT NULL,
                tenant text NOT NULL,
                digest text NOT NULL,
                owner text NOT NULL,
                state text NOT NULL CHECK (state IN ('claimed', 'sent', 'done', 'failed')),
                expires timestamptz NOT NULL,
                outcome text,
                PRIMARY KEY (namespace, code_hash)
            )""",
            f"CREATE INDEX IF NOT EXISTS {n.claims_index} ON {n.claims} (expires)",
        ],
    }

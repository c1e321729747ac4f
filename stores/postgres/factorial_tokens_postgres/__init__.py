"""factorial-tokens-postgres: a PostgreSQL token store for factorial-tokens.

Registered for ``postgresql://`` and ``postgres://`` in the ``factorial_tokens.stores``
entry-point group, so ``TokenManager(app, "postgresql://host/db")`` finds it.
"""

from ._schema import SCHEMA_VERSION
from ._store import PostgresStore

__version__ = "0.1.0"

__all__ = ["SCHEMA_VERSION", "PostgresStore"]

"""factorial-tokens-redis: the Redis and Redis Cluster token store for factorial-tokens.

Registered for ``redis://``, ``rediss://``, ``redis+cluster://`` and ``rediss+cluster://``
through the ``factorial_tokens.stores`` entry points, so
``TokenManager(app, "redis://127.0.0.1:6379/0?prefix=myapp")`` finds it.
"""

from ._store import RedisStore

__all__ = ["RedisStore"]

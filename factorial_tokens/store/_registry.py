"""The scheme registry: a store URL's scheme picks the store, through entry points.

Each store package declares its own schemes, one entry point per scheme in the
``factorial_tokens.stores`` group, naming a class with a ``from_url(url)`` constructor::

    [project.entry-points."factorial_tokens.stores"]
    redis = "factorial_tokens_redis:RedisStore"
    "rediss+cluster" = "factorial_tokens_redis:RedisStore"

A scheme whose store is not installed can still say how to get it: an entry point of the
same name in the ``factorial_tokens.store_hints`` group names the class that would
provide it and, in brackets, the extra of the declaring distribution that installs it
(``redis = "factorial_tokens_redis:RedisStore [redis]"`` in factorial-tokens' metadata reads
"pip install 'factorial-tokens[redis]'"). Hints are never loaded, only read.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Protocol
from urllib.parse import urlsplit

from .._errors import ConfigurationError
from ._contract import Store

__all__ = ["HINT_GROUP", "STORE_GROUP", "known_schemes", "store_from_url"]

#: The entry-point group where store packages declare their schemes.
STORE_GROUP = "factorial_tokens.stores"
#: The entry-point group of install hints for schemes whose store may be missing.
HINT_GROUP = "factorial_tokens.store_hints"


class _StoreFactory(Protocol):
    def from_url(self, url: str) -> Store: ...


def known_schemes() -> list[str]:
    """The schemes an installed store package declares, sorted."""
    return sorted({ep.name for ep in entry_points(group=STORE_GROUP)})


#: Never the URL itself, nor urllib's words about it: it may hold a password.
_MALFORMED = (
    "the store URL is malformed: check its host (an IPv6 address goes in brackets), its port, "
    "and that a password is percent-encoded"
)


def store_from_url(url: str) -> Store:
    """Build a store from its URL through the ``factorial_tokens.stores`` entry points.

    Raises ConfigurationError for a URL without scheme, for an unknown scheme (listing the
    known schemes and, when declared, what to install for the wanted one) and for a store
    package that is installed but cannot be imported (its own dependency missing).
    """
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        raise ConfigurationError(_MALFORMED) from None
    if not scheme:
        raise ConfigurationError("a store URL needs a scheme, e.g. sqlite:///tokens.db or redis://host")
    found = next(iter(entry_points(group=STORE_GROUP, name=scheme)), None)
    if found is None:
        known = ", ".join(f"{name}://" for name in known_schemes()) or "none"
        raise ConfigurationError(f"no token store for {scheme}:// (known: {known}){_hint(scheme)}")
    try:
        factory: _StoreFactory = found.load()
    except ImportError as exc:
        raise ConfigurationError(
            f"the token store for {scheme}:// ({found.value}) cannot be imported: {exc}{_hint(scheme)}"
        ) from exc
    try:
        return factory.from_url(url)
    except ConfigurationError:
        raise
    except ValueError:  # urllib's, on a URL it cannot split (its message may quote a piece of it)
        raise ConfigurationError(_MALFORMED) from None


def _hint(scheme: str) -> str:
    """``; pip install '...' for scheme://`` from the scheme's declared hint, else ``""``."""
    hint: EntryPoint | None = next(iter(entry_points(group=HINT_GROUP, name=scheme)), None)
    if hint is None:
        return ""
    if hint.extras and hint.dist is not None:
        target = f"{hint.dist.name}[{','.join(hint.extras)}]"
    else:
        target = hint.module.split(".")[0].replace("_", "-")
    return f"; pip install '{target}' for {scheme}://"

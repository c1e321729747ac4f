"""Options in a store URL's query: one parser, so every store reads and refuses them alike.

A store names its options and how each is read (:func:`seconds`, :func:`number`,
:func:`integer`, :func:`flag`, :func:`text`, :func:`choice`); :func:`url_options` takes them
out of the URL and hands the rest back, for stores that pass other options on to their
driver (or refuse them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._errors import ConfigurationError

__all__ = ["OptionParser", "choice", "flag", "integer", "number", "seconds", "text", "url_options"]

#: Reads one option's text (``parse(name, value)``); raises ConfigurationError when malformed.
OptionParser = Callable[[str, str], Any]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def text(name: str, value: str) -> str:
    """The option's text as given."""
    return value


def number(name: str, value: str) -> float:
    """A number."""
    try:
        return float(value)
    except ValueError:
        raise ConfigurationError(f"store URL option {name}={value!r} must be a number") from None


def seconds(name: str, value: str) -> float:
    """A number of seconds."""
    try:
        return float(value)
    except ValueError:
        raise ConfigurationError(f"store URL option {name}={value!r} must be a number of seconds") from None


def integer(name: str, value: str) -> int:
    """A whole number (``5`` or ``5.0``)."""
    return int(number(name, value))


def flag(name: str, value: str) -> bool:
    """True for 1, true, yes, on; False for 0, false, no, off or empty (any case)."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigurationError(f"store URL option {name}={value!r} must be true or false")


def choice(*allowed: str) -> OptionParser:
    """One of ``allowed`` (any case; answered in lower case)."""

    def parse(name: str, value: str) -> str:
        if value.lower() not in allowed:
            raise ConfigurationError(f"{name} must be one of {', '.join(allowed)} (got {value!r})")
        return value.lower()

    return parse


def url_options(
    url: str,
    known: Mapping[str, OptionParser],
    *,
    store: str,
    rest: bool = False,
    rename: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], str]:
    """Take the ``known`` options out of ``url``'s query: ``(options, url without them)``.

    ``options`` maps each given option (renamed by ``rename``, e.g. to the constructor's
    argument) to its parsed value. With ``rest=False`` another option raises
    ConfigurationError naming the ``store`` and the known options; with ``rest=True`` it is
    kept in the returned URL (for the driver). Raises ConfigurationError for a malformed value.
    """
    parts = urlsplit(url)
    ours: dict[str, Any] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        parse = known.get(name)
        if parse is not None:
            ours[(rename or {}).get(name, name)] = parse(name, value)
        elif rest:
            theirs.append((name, value))
        else:
            raise ConfigurationError(
                f"unknown {store} store option {name!r} (known: {', '.join(sorted(known))})"
            )
    return ours, urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(theirs), parts.fragment))

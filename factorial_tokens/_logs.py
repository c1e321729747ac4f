"""Structured logs: the fields every record of the library carries, and a JSON formatter.

Every record logged through a ``factorial_tokens`` logger carries five attributes, for
handlers that ship fields rather than text (a JSON formatter, structlog, an OTLP log
bridge): ``tenant``, ``event``, ``fingerprint``, ``store`` and ``duration_ms``. Each is
taken, in order, from the call's own ``extra``, else from the operation the record was
logged in (a refresh or an exchange binds its tenant, its name, the store's scheme and
its start), else ``None``. ``fingerprint`` is the first token fingerprint
(``sha256:1a2b3c4d``) among the message's arguments. No field ever holds a token: the
operation context holds none, and a fingerprint is a hash prefix.

:class:`JsonFormatter` writes one JSON object per line with those fields (what
``factorial-tokens serve --log-format json`` and ``keepalive --log-format json`` use).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
import time
from typing import Any

import attrs

# Internal: the CLI and the telemetry use these; applications configure logging themselves.
__all__: list[str] = []

#: The structured fields every library record carries.
FIELDS = ("tenant", "event", "fingerprint", "store", "duration_ms")

_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{8}$")

#: Loggers of the library and its store plugins. Logging applies a logger's filters to its
#: own records only, so each needs the filter; :func:`install` also covers any other
#: ``factorial_tokens.*`` logger that exists when it runs (the manager calls it).
_LOGGERS = (
    "factorial_tokens",
    "factorial_tokens.cli",
    "factorial_tokens.demo",
    "factorial_tokens.events",
    "factorial_tokens.keepalive",
    "factorial_tokens.postgres",
    "factorial_tokens.redis",
    "factorial_tokens.serve",
    "factorial_tokens.sqlite",
    "factorial_tokens.telemetry",
)


@attrs.define
class OperationContext:
    """The operation a task is doing for a tenant (never holds a token)."""

    tenant: str
    event: str
    store: str | None = None
    started: float = attrs.field(factory=time.monotonic)
    provider_calls: int = 0


_current: contextvars.ContextVar[OperationContext | None] = contextvars.ContextVar(
    "factorial_tokens_operation", default=None
)


def current() -> OperationContext | None:
    """The operation the running task is in, if any."""
    return _current.get()


def bind(context: OperationContext | None) -> contextvars.Token[OperationContext | None]:
    """Make ``context`` the running task's operation; returns the token to reset it."""
    return _current.set(context)


def reset(token: contextvars.Token[OperationContext | None]) -> None:
    """Undo a :func:`bind`."""
    _current.reset(token)


class ContextFilter(logging.Filter):
    """Fills the structured fields of every record (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _current.get()
        values = record.__dict__
        if context is not None:
            values.setdefault("tenant", context.tenant)
            values.setdefault("event", context.event)
            values.setdefault("store", context.store)
            values.setdefault("duration_ms", round((time.monotonic() - context.started) * 1000, 3))
        if "fingerprint" not in values:
            args = record.args if isinstance(record.args, tuple) else ()
            values["fingerprint"] = next(
                (a for a in args if isinstance(a, str) and _FINGERPRINT.match(a)), None
            )
        for field in FIELDS:
            values.setdefault(field, None)
        return True


_FILTER = ContextFilter()


def install() -> None:
    """Attach the field filter to the library's loggers. Idempotent."""
    existing = [name for name in logging.Logger.manager.loggerDict if name.startswith("factorial_tokens.")]
    for name in (*_LOGGERS, *existing):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the structured fields.

    An exception adds ``error`` (its type and message: ours never hold a token) and
    ``traceback``.
    """

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in FIELDS:
            data[field] = getattr(record, field, None)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            data["error"] = f"{type(exc).__name__}: {exc}"
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


install()

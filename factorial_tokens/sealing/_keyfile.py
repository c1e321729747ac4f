"""Key files and keyring text: ``<key id>:<base64 key>`` entries, newest last.

Entries are separated by commas or newlines; in files, blank lines and lines starting with
``#`` are ignored. A key file is refused when group or others may read or write it, and is
written atomically with mode 0600. Errors name the source and an entry's position, never
its content.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .._errors import ConfigurationError

__all__: list[str] = []

#: A key id: 1-40 characters of ``[A-Za-z0-9_.-]``.
KID = re.compile(r"[A-Za-z0-9_.\-]{1,40}")
#: Every key is this many bytes (AES-256).
KEY_BYTES = 32


def parse_keys(text: str, source: str) -> list[tuple[str, bytes]]:
    """The ``(key id, key)`` pairs of keyring text, newest last; raises ConfigurationError."""
    pairs: list[tuple[str, bytes]] = []
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    entries = [e.strip() for line in lines for e in line.split(",") if e.strip()]
    for position, entry in enumerate(entries, 1):
        kid, sep, encoded = entry.partition(":")
        kid = kid.strip()
        if not sep or not KID.fullmatch(kid):
            raise ConfigurationError(f"{source}: entry {position} is not '<key id>:<base64 key>'")
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(
                f"{source}: key {kid!r} (entry {position}) is not valid base64"
            ) from None
        if len(key) != KEY_BYTES:
            raise ConfigurationError(
                f"{source}: key {kid!r} (entry {position}) decodes to {len(key)} bytes, not {KEY_BYTES}"
            )
        pairs.append((kid, key))
    if not pairs:
        raise ConfigurationError(f"{source}: no key found")
    return pairs


def format_keys(pairs: Iterable[tuple[str, bytes]]) -> str:
    """Keyring text: one ``kid:base64`` line per key, in the order given."""
    return "".join(f"{kid}:{base64.b64encode(key).decode()}\n" for kid, key in pairs)


def read_key_file(path: Path) -> str:
    """The text of a key file, refusing one that group or others may read or write.

    Raises ConfigurationError if the file is missing, too open, or not text.
    """
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if os.name == "posix" and mode & 0o077:
                raise ConfigurationError(
                    f"key file {str(path)!r} is accessible to group or others "
                    f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
                )
            data = handle.read()
    except FileNotFoundError:
        raise ConfigurationError(f"key file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigurationError(f"key file {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigurationError(f"key file {str(path)!r} is not a text key file") from None


def write_key_file(path: Path, text: str) -> None:
    """Write keyring ``text`` to ``path`` atomically with mode 0600 (replacing the file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write("# factorial-tokens keys: <key id>:<base64 key>, newest last\n")
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

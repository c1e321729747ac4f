"""The ``factorial-tokens`` command (extra ``cli``: ``pip install 'factorial-tokens[cli]'``).

The demo, the connect server, keepalive and the tenant tools: see
``factorial-tokens --help``. The commands live in ``_commands`` (click), the live status
table in ``_watch`` (rich), the demo in :mod:`factorial_tokens.cli.demo`. Importing this
package loads neither click nor rich; :func:`main` says how to install them when they
are missing.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["INSTALL_HINT", "main"]

#: What to run when the command's own dependencies are missing.
INSTALL_HINT = "pip install 'factorial-tokens[cli]'"
_NEEDS = ("click", "rich")


def main() -> None:
    """Run the ``factorial-tokens`` command; exit 2 with an install hint when click or
    rich is not installed."""
    missing = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"factorial-tokens: the command line needs click and rich ({' and '.join(missing)} "
            f"not installed): {INSTALL_HINT}",
            file=sys.stderr,
        )
        sys.exit(2)
    from ._commands import main as command

    command()

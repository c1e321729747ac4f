"""Every Python block in README.md and docs/*.md runs, against the local simulator.

The blocks of one page run in order in one namespace (a page reads like a session). A
block preceded by ``<!-- test: ... -->`` is then driven by the code in that comment, one
preceded by ``<!-- setup: ... -->`` is prepared by it; top-level ``await`` is allowed in
blocks and comments (a page's blocks share one event loop), and ``sim`` is the simulator. That is how
an example that defines a ``main`` or a web app gets called. The README's quick start has
its own test (tests/test_readme.py). Placeholders (``"my-client-id"``,
``"https://api.factorialhr.com"``, ...) become the simulator's; each page runs in an empty
temporary folder with ``FACTORIAL_*`` set as the docs tell a developer to set them.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from factorial_tokens import TokenManager
from factorial_tokens.sync import SyncTokenManager
from factorial_tokens.testing import FakeFactorial

from .conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, ThreadSimFactory

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(?:<!--\s*setup:(?P<setup>.*?)-->\s*\n)?(?:<!--\s*(?P<kind>test|quickstart):(?P<test>.*?)-->\s*\n)?"
    r"```python\n(?P<code>.*?)```",
    re.S,
)


def blocks(page: Path) -> list[tuple[int, str, str | None, str | None]]:
    """(line, code, setup, test) of every Python block the page runs itself."""
    text = page.read_text()
    found = []
    for match in BLOCK.finditer(text):
        if match.group("kind") == "quickstart":
            continue
        line = text.count("\n", 0, match.start("code")) + 1
        setup = textwrap.dedent(match.group("setup")) if match.group("setup") is not None else None
        test = textwrap.dedent(match.group("test")) if match.group("kind") == "test" else None
        found.append((line, match.group("code"), setup, test))
    return found


def substitute(code: str, sim: FakeFactorial) -> str:
    for old, new in {
        '"my-client-id"': repr(CLIENT_ID),
        '"my-client-secret"': repr(CLIENT_SECRET),
        '"https://example.com/oauth/callback"': repr(REDIRECT_URI),
        '"https://api.factorialhr.com"': repr(sim.base_url),
    }.items():
        code = code.replace(old, new)
    return code


def test_every_page_has_blocks_and_every_python_block_is_run() -> None:
    docs = [p.name for p in PAGES if p.parent.name == "docs"]
    for name in ("getting-started.md", "fastapi.md", "aiohttp.md", "django-celery.md", "httpx.md"):
        assert name in docs
    for name in ("testing.md", "stores.md"):
        assert name in docs
    for page in PAGES:
        text = page.read_text()
        assert len(BLOCK.findall(text)) == text.count("```python"), f"{page.name}: a block the test misses"


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_page_runs(
    page: Path, make_thread_sim: ThreadSimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with make_thread_sim() as sim:
        for name, value in {
            "FACTORIAL_CLIENT_ID": CLIENT_ID,
            "FACTORIAL_CLIENT_SECRET": CLIENT_SECRET,
            "FACTORIAL_REDIRECT_URI": REDIRECT_URI,
            "FACTORIAL_BASE_URL": sim.base_url,
            "FACTORIAL_TOKENS_STORE": f"sqlite:///{tmp_path / 'tokens.db'}",
        }.items():
            monkeypatch.setenv(name, value)
        run_page(page, sim)


def run_page(page: Path, sim: FakeFactorial) -> None:
    """Run the page's blocks in order in one namespace and on one event loop (like one
    session), each with its setup and test; managers left open are closed at the end."""
    namespace: dict[str, Any] = {"__name__": f"docs_{page.stem}", "sim": sim}
    loop = asyncio.new_event_loop()
    try:
        for line, code, setup, test in blocks(page):
            if setup is not None:
                run(setup, f"{page.name}:{line} setup", namespace, loop)
            run("\n" * (line - 1) + substitute(code, sim), str(page), namespace, loop)
            if test is not None:
                run(test, f"{page.name}:{line} test", namespace, loop)
    finally:
        for value in list(namespace.values()):
            if isinstance(value, TokenManager):
                loop.run_until_complete(value.aclose())
            elif isinstance(value, SyncTokenManager):
                value.close()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def run(source: str, filename: str, namespace: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
    """Execute ``source`` in ``namespace``; with top-level ``await`` it runs on ``loop``."""
    code = compile(source, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if code.co_flags & inspect.CO_COROUTINE:
        loop.run_until_complete(eval(code, namespace))
    else:
        exec(code, namespace)


def test_a_failing_block_or_test_fails(make_thread_sim: ThreadSimFactory, tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    with make_thread_sim() as sim:
        page.write_text("<!-- test:\nassert answer == 41\n-->\n```python\nanswer = 42\n```\n")
        with pytest.raises(AssertionError):
            run_page(page, sim)
        page.write_text("```python\nawait undefined()\n```\n")
        with pytest.raises(NameError):
            run_page(page, sim)

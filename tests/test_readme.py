"""The README's quick start runs as written, against the local simulator."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from factorial_tokens.testing import FakeFactorial

from .conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI

README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart() -> str:
    text = README.read_text()
    match = re.search(r"<!-- quickstart.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "the README lost its quick start block"
    return match.group(1)


def test_quickstart_is_short() -> None:
    assert len(quickstart().strip().splitlines()) <= 15


async def test_quickstart_runs(
    sim: FakeFactorial, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = quickstart()
    substitutions = {
        '"my-client-id"': repr(CLIENT_ID),
        '"my-client-secret"': repr(CLIENT_SECRET),
        '"https://example.com/oauth/callback"': repr(REDIRECT_URI),
        '"https://api.factorialhr.com"': repr(sim.base_url),
        '"sqlite:///tokens.db"': repr(f"sqlite:///{tmp_path / 'tokens.db'}"),
    }
    for old, new in substitutions.items():
        assert old in code, old
        code = code.replace(old, new)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    await namespace["main"](sim.issue_code(company_id=1))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{sim.base_url}/oauth/authorize?")
    assert out[1].startswith("200 ")
    assert sim.stats.exchanges == 1
    assert sim.stats.api_ok == 2  # the company check after the exchange, then the employees

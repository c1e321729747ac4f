"""The benchmarks' peers stay in the benchmarks: their packages are never a dependency of the
library or of the tests, and the benchmark entry point loads without them (peers are
imported only when a peer benchmark runs)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The peers' own packages (import name -> distribution name).
PEERS = {"authlib": "authlib", "factorialhr": "factorialhr", "httpx2": "httpx2"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_the_library_and_the_tests_import_no_peer() -> None:
    sources = [p for top in ("factorial_tokens", "stores", "tests") for p in ROOT.glob(f"{top}/**/*.py")]
    offenders = {str(p.relative_to(ROOT)): _imports(p) & set(PEERS) for p in sources}
    assert {path: peers for path, peers in offenders.items() if peers} == {}


def test_peer_packages_are_pinned_only_for_the_benchmarks() -> None:
    def named(path: Path) -> set[str]:
        words = re.findall(r"[A-Za-z0-9_.-]+", path.read_text(encoding="utf-8").lower())
        return {w for w in words if w in PEERS.values()}

    assert named(ROOT / "pyproject.toml") == set()
    assert named(ROOT / "requirements-dev.txt") == set()
    pinned = (ROOT / "benchmarks" / "requirements.txt").read_text(encoding="utf-8")
    assert {name for name in PEERS.values() if re.search(rf"^{name}==", pinned, re.M)} == set(PEERS.values())


def test_the_benchmark_entry_point_loads_without_the_peers() -> None:
    for loaded in [name for name in sys.modules if name.split(".")[0] == "benchmarks"]:
        del sys.modules[loaded]  # import it afresh, with the peers hidden
    hidden = {name: sys.modules.pop(name, None) for name in PEERS}
    sys.modules.update(dict.fromkeys(PEERS))  # None: importing a peer raises ImportError
    try:
        from benchmarks.__main__ import parser

        args = parser().parse_args(["--only", "peers"])
    finally:
        for name, module in hidden.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    assert args.only == ["peers"]

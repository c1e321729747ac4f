"""The manager is the one gate to the store: the shape of the package, checked on its source.

* No module reaches into another module's objects: ``obj._name`` (other than on ``self`` or
  ``cls``) is allowed only for a private name the same module defines, and no module
  imports another module's private names.
* Only the manager (and the stores, their observing wrapper, and ``testing``) calls the
  store's lease and claim primitives.
* Only ``web``, ``cli`` and ``testing`` import ``aiohttp.web``, only ``cli`` click and rich
  (import-linter sees a third-party package whole, not ``aiohttp.web`` apart from ``aiohttp``).
* The import graph of ``factorial_tokens`` has no cycle, counting imports made inside
  functions and under ``TYPE_CHECKING`` (which would hide a cycle, not remove it).

The checks read the source (``ast``), so they are simple and strict, and they have a blind
spot: an attribute spelled like one the module defines itself passes, whatever its object.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import factorial_tokens

PACKAGE = Path(factorial_tokens.__file__).parent

#: The private-looking names of the standard library's public API (``namedtuple``).
STDLIB_API = {"_replace", "_asdict", "_fields", "_make"}

#: Store primitives with names no other API in the package uses.
PRIMITIVES = {"acquire", "acquire_within", "commit", "claim_code", "advance_code", "admit"}

#: Modules that may call them: the manager's and the observing wrapper's (the store kit and
#: ``testing`` are exempt as packages below).
GATE = {"_manager", "_flight", "_exchange", "_callback", "_leases", "_telemetry"}


def _modules() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined(tree: ast.Module) -> set[str]:
    """The private names a module defines: functions, classes, attributes, slots."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries
    return {name for name in names if _private(name)}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name of a ``from ... import``."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def test_no_module_reaches_into_another_modules_objects() -> None:
    reaches: list[str] = []
    modules = {name for name, _, _ in _modules()}
    for name, path, tree in _modules():
        own = _defined(tree) | STDLIB_API
        for node in ast.walk(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and _private(node.attr):
                receiver = node.value
                if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
                    continue
                if node.attr not in own:
                    reaches.append(f"{where}: {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path, node)
                for alias in node.names:  # a private module may be imported, not its private names
                    private = base.startswith("factorial_tokens") and _private(alias.name)
                    if private and f"{base}.{alias.name}" not in modules:
                        reaches.append(f"{where}: imports {alias.name} from {base}")
    assert not reaches, "private names of other modules used:\n" + "\n".join(reaches)


def test_only_the_manager_calls_store_primitives() -> None:
    calls: list[str] = []
    for name, path, tree in _modules():
        module = name.split(".")
        if module[1:2] in (["testing"], ["store"]) or module[-1] in GATE:
            continue
        for node in ast.walk(tree):
            called = node.func if isinstance(node, ast.Call) else None
            attr = called.attr if isinstance(called, ast.Attribute) else getattr(called, "id", None)
            if attr in PRIMITIVES:
                calls.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not calls, "store primitives called outside the manager:\n" + "\n".join(calls)


#: Third-party modules only some packages of the library may import: the aiohttp server
#: (``import factorial_tokens`` must not load it) and the ``cli`` extra's click and rich.
CONFINED = {
    "aiohttp.web": ("factorial_tokens.web", "factorial_tokens.cli", "factorial_tokens.testing"),
    "click": ("factorial_tokens.cli",),
    "rich": ("factorial_tokens.cli",),
}


def test_the_server_and_the_command_lines_libraries_stay_in_their_packages() -> None:
    found: list[str] = []
    for name, path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                imported = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in imported:
                for confined, owners in CONFINED.items():
                    inside = target == confined or target.startswith(confined + ".")
                    if inside and not name.startswith(owners):
                        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: imports {target}")
    assert not found, "imported outside web, cli and testing:\n" + "\n".join(found)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth, under TYPE_CHECKING too).

    Importing ``a.b.c`` runs the packages ``a`` and ``a.b`` first; the importer's own
    packages are running already, so they count only when named explicitly (``from .
    import __version__`` needs the package's ``__init__``; ``from . import _logs`` only
    the submodule)."""
    found = list(_modules())
    known = {name for name, _, _ in found}
    graph: dict[str, set[str]] = {}
    for name, path, tree in found:
        running = {".".join(name.split(".")[:n]) for n in range(1, name.count(".") + 1)}
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path, node)
                named = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            else:
                continue
            for target in named:
                parts = target.split(".")
                prefixes = {".".join(parts[:n]) for n in range(1, len(parts))}
                targets.add(target)
                targets.update(prefixes - running)
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = _cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None

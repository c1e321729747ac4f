"""The public face: one sorted ``__all__`` that exports every public name of the modules."""

from __future__ import annotations

import importlib
import pkgutil

import factorial_tokens

#: Names the private modules share among themselves but do not promise to users.
INTERNAL = {
    "DEFAULT_API_VERSION",
    "MAX_TENANT_LENGTH",
    "OAuthClient",
    "StateSigner",
    "same_origin",
    # the connect routes' pages, shared by the aiohttp and Starlette adapters
    "BINDING_COOKIE",
    "PAGE_HEADERS",
    "callback_failure",
    "page_html",
    "valid_binding",
}


def test_all_is_sorted_and_resolves() -> None:
    names = factorial_tokens.__all__

    def isort_style(name: str) -> tuple[int, str]:  # constants, classes, then functions (ruff RUF022)
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert names == sorted(names, key=isort_style)
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(factorial_tokens, name) is not None


def test_every_public_name_is_exported() -> None:
    exported = set(factorial_tokens.__all__)
    for info in pkgutil.iter_modules(factorial_tokens.__path__):
        if not info.name.startswith("_") or info.name == "__main__":
            continue
        module = importlib.import_module(f"factorial_tokens.{info.name}")
        missing = set(getattr(module, "__all__", ())) - exported - INTERNAL
        assert not missing, f"factorial_tokens.{info.name} exports {missing} but the package does not"


def test_every_error_derives_from_the_root() -> None:
    from factorial_tokens import _errors

    for name in _errors.__all__:
        assert issubclass(getattr(_errors, name), factorial_tokens.FactorialTokensError)

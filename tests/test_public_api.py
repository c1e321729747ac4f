"""The public face: a small top level (the application API and the errors), every public
name of the private modules exported by the package or one of its public modules, and an
``import factorial_tokens`` that loads no web server and no command line."""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import subprocess
import sys

import factorial_tokens

#: Names the private modules share among themselves but do not promise to users.
INTERNAL = {
    "DEFAULT_API_VERSION",
    "MAX_TENANT_LENGTH",
    "OAuthClient",
    "StateSigner",
    "same_origin",
    "fingerprint",
    "validate_tenant",
    # the connect routes' pages and steps, shared by the aiohttp and Starlette adapters
    "BINDING_COOKIE",
    "PAGE_HEADERS",
    "callback_failure",
    "page_html",
    "valid_binding",
    "Answer",
    "BindingCookie",
    "ConnectFlow",
    "check_success_url",
}

#: What an application imports from the top level.
APPLICATION = {
    "CallbackResult",
    "Credentials",
    "EventKind",
    "FactorialApp",
    "Health",
    "KeepAliveReport",
    "Keyring",
    "TenantInfo",
    "TenantSession",
    "TokenEvent",
    "TokenManager",
    "TokenSet",
}
ERRORS = set(factorial_tokens._errors.__all__)


def test_all_is_sorted_and_resolves() -> None:
    names = factorial_tokens.__all__

    def isort_style(name: str) -> tuple[int, str]:  # constants, classes, then functions (ruff RUF022)
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert names == sorted(names, key=isort_style)
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(factorial_tokens, name) is not None


def test_the_top_level_is_the_application_api_and_the_errors() -> None:
    names = set(factorial_tokens.__all__)
    assert names >= APPLICATION | ERRORS
    assert names == APPLICATION | ERRORS
    assert len(APPLICATION | ERRORS) <= 31


def test_every_public_name_is_exported() -> None:
    exported = set(factorial_tokens.__all__)
    for info in pkgutil.iter_modules(factorial_tokens.__path__):
        if info.name.startswith("_") or info.name in ("cli", "testing"):
            continue
        module = importlib.import_module(f"factorial_tokens.{info.name}")
        exported |= set(module.__all__)
    for info in pkgutil.iter_modules(factorial_tokens.__path__):
        if not info.name.startswith("_") or info.name == "__main__":
            continue
        module = importlib.import_module(f"factorial_tokens.{info.name}")
        missing = set(getattr(module, "__all__", ())) - exported - INTERNAL
        assert not missing, f"factorial_tokens.{info.name} exports {missing} but no public module does"


def test_every_error_derives_from_the_root() -> None:
    from factorial_tokens import _errors

    for name in _errors.__all__:
        assert issubclass(getattr(_errors, name), factorial_tokens.FactorialTokensError)


def test_errors_read_as_the_package_and_still_pickle() -> None:
    for name in ERRORS:
        error = getattr(factorial_tokens, name)
        assert error.__module__ == "factorial_tokens", name
        assert f"{error.__module__}.{error.__qualname__}" == f"factorial_tokens.{name}"
    again = pickle.loads(pickle.dumps(factorial_tokens.InvalidTenant("bad tenant id")))
    assert type(again) is factorial_tokens.InvalidTenant and str(again) == "bad tenant id"


def test_importing_the_package_loads_no_web_server_and_no_command_line() -> None:
    check = (
        "import factorial_tokens, sys; "
        "loaded = [m for m in sys.modules if m in ('aiohttp.web', 'click', 'rich') "
        "or m.startswith(('factorial_tokens.web', 'factorial_tokens.cli', 'factorial_tokens.testing'))]; "
        "assert not loaded, loaded"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

"""The three distributions build (wheel and sdist) and install into a fresh virtualenv with
their data files: the Lua scripts, the Postgres schema module, ``py.typed`` everywhere.

Built with ``python -m build --no-isolation`` from the test environment (setuptools is
pinned in requirements-dev.txt): an isolated build would download setuptools for each of
the three projects, which is slow and needs the network. The fresh virtualenv gets the
wheels with ``--no-deps --no-index``; their dependencies are borrowed from the test
environment through a plain path entry, which does not run its editable-install hooks,
so every ``factorial_tokens*`` module imported there comes from the wheels.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DISTS = {
    ".": "factorial_tokens",
    "stores/redis": "factorial_tokens_redis",
    "stores/postgres": "factorial_tokens_postgres",
}
LUA = sorted(p.name for p in (ROOT / "stores/redis/factorial_tokens_redis/lua").glob("*.lua"))
REQUIRED = {
    "factorial_tokens": ["py.typed", "sync.py", "httpx.py", "requests.py", "testing/_server.py"],
    "factorial_tokens_redis": ["py.typed", *(f"lua/{name}" for name in LUA)],
    "factorial_tokens_postgres": ["py.typed", "_schema.py"],
}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # Built from a copy: a build rewrites the checkout's *.egg-info, which the test
    # suite's worker processes (run from the checkout) read their store entry points from.
    source = tmp_path_factory.mktemp("source") / "checkout"
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".*", "*.egg-info", "__pycache__", "build", "dist")
    )
    for folder in DISTS:
        done = subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source / folder)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=out,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_wheels_and_sdists_hold_the_data_files(dist: Path) -> None:
    assert len(LUA) >= 7
    for package, files in REQUIRED.items():
        (wheel,) = dist.glob(f"{package}-*.whl")
        (sdist,) = dist.glob(f"{package}-*.tar.gz")
        names = set(zipfile.ZipFile(wheel).namelist())
        with tarfile.open(sdist) as archive:
            in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        for file in files:
            assert f"{package}/{file}" in names, (wheel.name, file)
            assert f"{package}/{file}" in in_sdist, (sdist.name, file)
        assert {"pyproject.toml", "README.md"} <= in_sdist
        assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)


def test_the_wheels_install_into_a_fresh_virtualenv(dist: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, timeout=120)
    python = fresh / "bin" / "python"
    wheels = sorted(str(p) for p in dist.glob("*.whl"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            *wheels,
        ],
        check=True,
        timeout=120,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "zz-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check = textwrap.dedent(
        f"""
        import importlib, importlib.metadata, importlib.resources, sys
        site = {site!r}
        for name, files in {REQUIRED!r}.items():
            module = importlib.import_module(name)
            assert module.__file__.startswith(site), (name, module.__file__)
            root = importlib.resources.files(name)
            for file in files:
                assert root.joinpath(file).is_file(), (name, file)
        from factorial_tokens.store import store_from_url
        for url in ("redis://127.0.0.1:1/0", "postgresql://u@127.0.0.1:1/db", "sqlite:///x.db"):
            store = store_from_url(url)
            assert type(store).__module__.split(".")[0] in sys.modules
        import factorial_tokens.sync, factorial_tokens.httpx, factorial_tokens.requests
        print("ok")
        """
    )
    done = subprocess.run(
        [str(python), "-c", check], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    version = subprocess.run(
        [str(fresh / "bin" / "factorial-tokens"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and "0.1.0" in version.stdout, version.stderr


def test_the_readme_install_lines_name_the_checkouts_projects() -> None:
    readme = (ROOT / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("pip install -e "))
    # "-e '.[cli]'": the folder without its extras
    folders = [word.strip("'\"").split("[")[0] for word in line.split()[2:] if word != "-e"]
    assert folders and set(folders) <= set(DISTS), folders
    for folder in folders:
        assert (ROOT / folder / "pyproject.toml").is_file()


def test_each_plugin_admits_the_core_of_this_checkout_and_no_next_minor() -> None:
    """The store kit may change between minor releases before 1.0: a plugin names the
    core's minor series it was written for, and a core version bump must update it."""
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    major, minor, _ = (int(part) for part in core.split("."))
    for folder in DISTS:
        if folder == ".":
            continue
        wanted = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]["dependencies"]
        (spec,) = [Requirement(r) for r in wanted if Requirement(r).name == "factorial-tokens"]
        assert core in spec.specifier, (folder, str(spec))
        assert f"{major}.{minor + 1}.0" not in spec.specifier, (folder, str(spec))


def test_the_oldest_requirements_pin_every_declared_floor() -> None:
    """``make test-oldest`` runs the suite with requirements-oldest.txt: it must pin exactly
    the ``>=`` floor of every runtime dependency the three projects declare (but the core
    itself, which a plugin names by its minor series)."""
    floors: dict[str, str] = {}
    for folder in DISTS:
        for line in tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]["dependencies"]:
            requirement = Requirement(line)
            if requirement.name == "factorial-tokens":
                continue
            (lowest,) = [s.version for s in requirement.specifier if s.operator == ">="]
            floors[requirement.name] = lowest
    pinned: dict[str, str] = {}
    for line in (ROOT / "requirements-oldest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (version,) = [s.version for s in requirement.specifier if s.operator == "=="]
            pinned[requirement.name] = version
    assert set(pinned) == set(floors), (sorted(pinned), sorted(floors))
    for name, lowest in floors.items():
        assert Version(pinned[name]) == Version(lowest), (name, pinned[name], lowest)

"""The ``factorial-tokens`` command, run as a user runs it (a subprocess), against the
strict FakeFactorial (in a thread) and an SQLite store in a temporary folder.

Every run is checked for leaks: the client secret never appears, and no token appears
except on ``token``'s stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner

from factorial_tokens import ReauthorizationRequired, TokenManager
from factorial_tokens._keepalive import keep_alive_pass, threshold
from factorial_tokens._state import StateSigner
from factorial_tokens.cli._commands import EXIT_CODES, main
from factorial_tokens.store import MemoryStore, TenantKey, Update, store_from_url
from factorial_tokens.testing import FakeFactorial, RefreshMode

from .conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, SimFactory, app_for

SCRIPT = Path(sys.executable).with_name("factorial-tokens")
TOKEN_RE = re.compile(r"[0-9a-f]{64}")  # the simulator's tokens are 64 hex characters


@pytest.fixture
def sim() -> Iterator[FakeFactorial]:
    """The strict simulator, served from a thread so subprocesses can reach it."""
    fake = FakeFactorial(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        refresh_mode=RefreshMode.REVOKE_AT_REFRESH,
        reuse_detection=True,
        access_token_ttl=3600,
    )
    with fake.serve_in_thread():
        yield fake


@pytest.fixture
def store(tmp_path: Path) -> str:
    return "sqlite:///" + str(tmp_path / "tokens.db")


@pytest.fixture
def env(sim: FakeFactorial, store: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FACTORIAL_")}
    return {
        **clean,
        "FACTORIAL_CLIENT_ID": CLIENT_ID,
        "FACTORIAL_CLIENT_SECRET": CLIENT_SECRET,
        "FACTORIAL_REDIRECT_URI": REDIRECT_URI,
        "FACTORIAL_BASE_URL": sim.base_url,
        "FACTORIAL_TOKENS_STORE": store,
        "COLUMNS": "120",
    }


def cli(
    *args: str, env: dict[str, str], token_out: bool = False, timeout: float = 60, module: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the command; assert that nothing secret leaked."""
    command = [sys.executable, "-m", "factorial_tokens"] if module else [str(SCRIPT)]
    done = subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    for name, text in (("stdout", done.stdout), ("stderr", done.stderr)):
        assert CLIENT_SECRET not in text, f"client secret in {name}"
        if not (token_out and name == "stdout"):
            assert not TOKEN_RE.search(text), f"a token in {name}: {text}"
    return done


def seed(sim: FakeFactorial, store: str, tenant: str, company_id: int, *, company_token: bool = False) -> str:
    """Connect ``tenant`` in the store as the CLI would read it; return its access token."""

    async def run() -> str:
        async with TokenManager(app_for(sim), store) as tm:
            code = sim.issue_code(company_id=company_id, company_token=company_token)
            return (await tm.exchange_code(tenant, code)).access_token

    return asyncio.run(run())


def age(store: str, tenant: str, seconds: float) -> None:
    """Make ``tenant``'s stored tokens look ``seconds`` older than they are."""

    async def run() -> None:
        backend = store_from_url(store)
        try:
            key = TenantKey(CLIENT_ID, tenant)
            record = await backend.read(key)
            assert record is not None
            update = Update(record.payload, record.status, record.expires_at, record.updated_at - seconds)
            await backend.replace(key, update)
        finally:
            await backend.aclose()

    asyncio.run(run())


def status_json(env: dict[str, str]) -> list[dict[str, Any]]:
    done = cli("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


# --------------------------------------------------------------------------- help and configuration


def test_help_documents_every_exit_code_and_shows_no_secret(env: dict[str, str]) -> None:
    done = cli("--help", env=env)
    assert done.returncode == 0 and "Exit codes:" in done.stdout
    for code, meaning in EXIT_CODES.items():
        assert f"{code}  {meaning[:20]}" in done.stdout
    done = cli("--help", env=env, module=True)
    assert done.returncode == 0 and "demo" in done.stdout and "keepalive" in done.stdout
    runner = CliRunner()
    for command in main.commands:
        page = runner.invoke(main, [command, "--help"], env=env)
        assert page.exit_code == 0 and "Exit codes:" in page.output, command
        assert CLIENT_SECRET not in page.output


def test_missing_configuration_exits_2_and_names_the_variable(env: dict[str, str]) -> None:
    del env["FACTORIAL_CLIENT_ID"]
    done = cli("token", "acme", env=env)
    assert done.returncode == 2
    assert "FACTORIAL_CLIENT_ID" in done.stderr and done.stdout == ""
    env["FACTORIAL_CLIENT_ID"] = CLIENT_ID
    del env["FACTORIAL_CLIENT_SECRET"]
    done = cli("refresh", "acme", env=env)  # a refresh needs the secret (status does not)
    assert done.returncode == 2 and "FACTORIAL_CLIENT_SECRET" in done.stderr


def test_bad_configuration_exits_2(env: dict[str, str]) -> None:
    done = cli("status", "--store", "nosuch://x", env=env)
    assert done.returncode == 2 and "known:" in done.stderr
    assert cli("status", "--redirect-uri", "not-a-url", env=env).returncode == 2
    runner = CliRunner()
    for args in (
        ["status", "--base-url", "ftp://example"],
        ["token", "x" * 201],
        ["token", "a\x1bb"],
        ["keepalive", "--once", "--max-age", "soon"],
        ["keepalive", "--once", "--jitter", "1.5"],
        ["demo", "-t", "0"],
    ):
        result = runner.invoke(main, args, env=env)
        assert result.exit_code == 2, (args, result.output)
        assert CLIENT_SECRET not in result.output


def test_a_store_password_is_never_echoed(env: dict[str, str]) -> None:
    done = cli("status", "--store", "nosuch://user:hunter2-pass@host/0", env=env)
    assert done.returncode == 2 and "hunter2-pass" not in done.stdout + done.stderr


def test_unknown_tenant_exits_3(env: dict[str, str]) -> None:
    for command in ("token", "refresh", "whoami", "revoke"):
        done = cli(command, "nobody", env=env)
        assert done.returncode == 3, (command, done.stderr)
        assert "nobody" in done.stderr and done.stdout == ""


# --------------------------------------------------------------------------- the tenant tools


def test_token_status_whoami_refresh_revoke(env: dict[str, str], sim: FakeFactorial, store: str) -> None:
    first = seed(sim, store, "acme", 42)
    done = cli("token", "acme", env=env, token_out=True)
    assert done.returncode == 0 and done.stdout == first + "\n"

    rows = status_json(env)
    assert [(r["tenant"], r["status"], r["needs_reauthorization"]) for r in rows] == [
        ("acme", "active", False)
    ]
    assert rows[0]["expires_at"] and rows[0]["refreshed_at"]
    table = cli("status", env=env)
    assert table.returncode == 0 and "acme" in table.stdout and "active" in table.stdout

    who = cli("whoami", "acme", "--json", env=env)
    assert who.returncode == 0 and json.loads(who.stdout)["company_id"] == "42"
    assert "company_id:" in cli("whoami", "acme", env=env).stdout

    done = cli("refresh", "acme", env=env)
    assert done.returncode == 0 and "sha256:" in done.stdout
    assert sim.stats.refreshes == 1 and sim.stats.invalid_grant == 0
    second = cli("token", "acme", env=env, token_out=True).stdout.strip()
    assert second != first and sim.is_active(second) and not sim.is_active(first)

    done = cli("revoke", "acme", env=env)
    assert done.returncode == 0 and sim.stats.revocations == 1
    assert not sim.is_active(second)
    assert cli("token", "acme", env=env).returncode == 3
    assert status_json(env) == []


def test_connect_url_points_at_factorial_with_a_signed_state(env: dict[str, str], sim: FakeFactorial) -> None:
    done = cli("connect-url", "acme", "--company", env=env)
    assert done.returncode == 0
    url = done.stdout.strip()
    assert url.startswith(sim.base_url + "/oauth/authorize?")
    query = parse_qs(urlsplit(url).query)
    assert query["resource_owner_type"] == ["company"] and query["client_id"] == [CLIENT_ID]
    assert StateSigner(app_for(sim)).verify(query["state"][0])[0] == "acme"
    callback = urlsplit(sim.authorize_sync(url))
    assert f"http://{callback.netloc}{callback.path}" == REDIRECT_URI and "code=" in callback.query


def test_dead_grant_exits_4_without_hammering_factorial(
    env: dict[str, str], sim: FakeFactorial, store: str
) -> None:
    seed(sim, store, "acme", 7)
    sim.revoke_company(7)  # an admin disconnected the app in Factorial
    done = cli("refresh", "acme", env=env)
    assert done.returncode == 4 and "connect again" in done.stderr and done.stdout == ""
    assert sim.stats.refresh_attempts == 1
    assert status_json(env)[0]["needs_reauthorization"] is True
    assert "yes" in cli("status", env=env).stdout
    done = cli("token", "acme", env=env)
    assert done.returncode == 4 and done.stdout == ""
    assert cli("refresh", "acme", env=env).returncode == 4
    assert sim.stats.refresh_attempts == 1  # a dead grant is not presented again


def test_provider_refusal_exits_5(env: dict[str, str], sim: FakeFactorial, store: str) -> None:
    seed(sim, store, "acme", 1)
    env["FACTORIAL_CLIENT_SECRET"] = "a-wrong-secret-for-this-app"
    done = cli("refresh", "acme", env=env)
    assert done.returncode == 5 and "invalid_client" in done.stderr
    assert "a-wrong-secret-for-this-app" not in done.stdout + done.stderr
    assert sim.stats.invalid_client == 1 and sim.stats.refreshes == 0


def test_store_unavailable_exits_6(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "a-directory.db").mkdir()
    env["FACTORIAL_TOKENS_KEYS"] = "k1:" + "A" * 43 + "="
    done = cli("status", "--store", "sqlite:///" + str(tmp_path / "a-directory.db"), env=env)
    assert done.returncode == 6, done.stderr
    assert "A" * 43 not in done.stderr


# --------------------------------------------------------------------------- keepalive


def test_keepalive_once_refreshes_only_aged_expiring_tenants(
    env: dict[str, str], sim: FakeFactorial, store: str
) -> None:
    old = seed(sim, store, "aged", 1)
    seed(sim, store, "company", 2, company_token=True)
    age(store, "company", 30 * 86400)
    fresh = seed(sim, store, "fresh", 3)
    age(store, "fresh", 3 * 86400)
    age(store, "aged", 5 * 86400 + 60)
    done = cli("keepalive", "--once", "--jitter", "0", env=env)
    assert done.returncode == 0, done.stderr
    assert "refreshed 1" in done.stdout and "non-expiring 1" in done.stdout and "not due 1" in done.stdout
    assert sim.stats.refreshes == 1 and sim.stats.refreshes_by_company == {1: 1}
    assert not sim.is_active(old) and sim.is_active(fresh)

    seed(sim, store, "dead", 4)
    sim.revoke_company(4)
    assert cli("refresh", "dead", env=env).returncode == 4
    age(store, "dead", 6 * 86400)
    done = cli("keepalive", "--once", "--max-age", "4d", env=env)
    assert done.returncode == 4 and "'dead'" in done.stdout and "refreshed 0" in done.stdout
    assert sim.stats.refreshes == 1


def test_keepalive_thresholds_are_spread_and_stable() -> None:
    values = [threshold("app", f"tenant-{i}", 100.0, 0.2) for i in range(200)]
    assert all(80.0 < v <= 100.0 for v in values)
    assert max(values) - min(values) > 15.0  # spread over most of the window
    assert values == [threshold("app", f"tenant-{i}", 100.0, 0.2) for i in range(200)]
    assert {threshold("app", f"t{i}", 100.0, 0.0) for i in range(20)} == {100.0}


async def test_keep_alive_in_process(make_sim: SimFactory) -> None:
    async with make_sim(access_token_ttl=3600) as fake:
        shared = MemoryStore()
        async with (
            TokenManager(app_for(fake), shared, lease_ttl=6, provider_timeout=2) as tm,
            TokenManager(app_for(fake), shared, lease_ttl=6, provider_timeout=2) as other,
        ):
            for i, tenant in enumerate(("a", "b", "c")):
                await tm.exchange_code(tenant, fake.issue_code(company_id=i + 1))
            fake.revoke_company(3)
            with pytest.raises(ReauthorizationRequired):
                await tm.refresh("c")
            report = await tm.keep_alive(max_age=3600, once=True)
            assert report.not_due == ("a", "b") and report.needs_reauth == ("c",) and report.ok is False
            assert fake.stats.refreshes == 0 and fake.stats.refresh_attempts == 1

            # Two keepalive passes at once (two processes): each due tenant renewed once.
            later = time.time() + 3 * 3600
            first, second = await asyncio.gather(
                keep_alive_pass(tm, max_age=3600, jitter=0.2, now=later),
                keep_alive_pass(other, max_age=3600, jitter=0.2, now=later),
            )
            assert first.refreshed == second.refreshed == ("a", "b")
            assert fake.stats.refreshes == 2 and fake.stats.refresh_attempts == 3
            assert fake.stats.invalid_grant == 1  # only the dead grant, earlier

            # The loop runs passes until cancelled.
            loop = asyncio.ensure_future(tm.keep_alive(max_age=3600, interval=0.05, jitter=0.1))
            await asyncio.sleep(0.3)
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            assert fake.stats.refreshes == 2


# --------------------------------------------------------------------------- serve


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def browser() -> urllib.request.OpenerDirector:
    """A client that keeps cookies and never follows redirects: one admin's browser."""
    return urllib.request.build_opener(_NoRedirect, urllib.request.HTTPCookieProcessor(CookieJar()))


def _get(url: str, opener: urllib.request.OpenerDirector | None = None) -> tuple[int, str, str | None]:
    opener = opener or urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=20) as resp:
            return resp.status, resp.read().decode(), resp.headers.get("Location")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers.get("Location")


def test_serve_connects_a_company(env: dict[str, str], sim: FakeFactorial) -> None:
    port = _free_port()
    redirect = f"http://127.0.0.1:{port}/oauth/callback"
    sim.add_client("serve-client", CLIENT_SECRET, redirect)
    env.update(FACTORIAL_CLIENT_ID="serve-client", FACTORIAL_REDIRECT_URI=redirect)
    proc = subprocess.Popen(
        [str(SCRIPT), "-v", "serve", "--port", str(port), "--tenant", "acme", "--tenant", "café ☕"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"listening on http://127.0.0.1:{port}"), line
        base = f"http://127.0.0.1:{port}"
        link = cli("connect-link", "café ☕", "--ttl", "10m", env=env).stdout.strip()
        assert link.startswith(f"{base}/connect/caf%C3%A9%20%E2%98%95?link=")
        assert _get(f"{base}/connect/caf%C3%A9%20%E2%98%95")[0] == 403  # no link: closed
        admin = browser()
        status, _, location = _get(link, admin)
        assert status == 302 and location and location.startswith(sim.base_url)
        callback = sim.authorize_sync(location)
        assert callback.startswith(redirect + "?")
        assert _get(callback)[0] == 400  # another browser (no cookie): refused, nothing sent
        assert sim.stats.token_requests == 0
        status, page, location = _get(callback, admin)
        assert status == 200 and "café ☕" in page and location is None
        assert _get(callback, admin)[0] == 200  # a retried callback: same answer
        assert sim.stats.exchanges == 1 and sim.stats.exchange_attempts == 1
        mallory = cli("connect-link", "mallory", env=env).stdout.strip()
        assert _get(mallory, browser())[0] == 404  # not in --tenant
        status, page, _ = _get(f"{base}/oauth/callback?code=x&state=forged", admin)
        assert status == 400 and "state" in page
        assert _get(f"{base}/connect/a%0d%0aFORGED%20GET%20%2Fadmin%20200")[0] == 400
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "code=" not in err and "state=" not in err and "link=" not in err  # no query logged
    assert "/oauth/callback" in err
    assert not any(line.startswith("FORGED") for line in err.splitlines())  # no forged log line
    assert "/connect/a\\x0d\\x0aFORGED" in err
    assert CLIENT_SECRET not in out + err and not TOKEN_RE.search(out + err)
    assert [r["tenant"] for r in status_json(env)] == ["café ☕"]


def test_serve_on_a_busy_port_exits_2(env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = cli("serve", "--port", str(port), env=env)
        opened = cli("serve", "--open", "--port", str(port), env=env)
    assert done.returncode == 2 and "cannot listen" in done.stderr
    assert "WARNING" not in done.stderr
    assert opened.returncode == 2 and "WARNING: --open" in opened.stderr


# --------------------------------------------------------------------------- demo


def test_demo_holds_every_guarantee(env: dict[str, str], tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = cli(
        "demo", "-t", "2", "-p", "2", "-c", "10", "-d", "4", "--report", str(report), env=env, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All guarantees held." in done.stdout
    rows = {
        cells[0]: cells[1:]
        for line in done.stdout.splitlines()
        if (cells := [c.strip() for c in re.split(r"[│┃|]", line)[1:-1]]) and len(cells) == 4
    }
    assert rows["invalid_grant"][:2] == ["0", "0"]
    assert rows["refreshes"][0] == rows["refreshes"][1] and int(rows["refreshes"][0]) > 0
    assert rows["refresh requests"][0] == rows["refreshes"][0]
    assert rows["exchanges"][:2] == ["2", "2"]
    result = json.loads(report.read_text())
    assert result["ok"] is True and result["broken"] == []
    assert result["invalid_grant"] == 0 and result["families_revoked"] == 0
    assert result["refreshes"] == result["refresh_attempts"] == result["ideal_refreshes"] > 0
    assert result["ideal_refreshes"] == result["generations"] - 2
    assert result["refreshes_by_workers"] == result["refreshes"]
    assert result["exchanges"] == 2 and result["callbacks"] == result["callbacks_ok"] == 4
    assert result["api_401_seen_by_callers"] == 0 and result["tenants_needing_reauth"] == 0
    assert result["workers_crashed"] == 0 and result["api_calls"] > 0


def test_demo_refuses_a_store_workers_cannot_share(env: dict[str, str]) -> None:
    done = cli("demo", "--store", "memory://", "-d", "1", env=env)
    assert done.returncode == 2 and "memory://" in done.stderr


@pytest.mark.parametrize("blocked", [("click",), ("rich",), ("click", "rich")])
def test_without_the_cli_extra_the_command_says_what_to_install(blocked: tuple[str, ...]) -> None:
    # A missing dependency, simulated: a None entry in sys.modules makes its import fail.
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "from factorial_tokens.cli import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code, "status"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "pip install 'factorial-tokens[cli]'" in done.stderr
    assert all(name in done.stderr for name in blocked)
    assert "Traceback" not in done.stderr


def test_the_demo_verdict_can_fail() -> None:
    """The judge flags each broken guarantee (so a green demo means something)."""
    from factorial_tokens.cli.demo import DemoConfig, judge
    from factorial_tokens.testing import SimulatorStats

    config = DemoConfig(tenants=2, workers=1, tasks=1, duration=4)
    fps = {"acme": ["f1", "f2", "f3"], "globex": ["g1", "g2"]}
    worker = {
        "counts": {"calls": 10, "ok": 9, "unauthorized": 1, "refreshes": 3},
        "errors": {},
        "seen": fps,
        "refreshed": {},
        "token_latency": [0.001],
        "api_latency": [0.002],
    }
    healthy = SimulatorStats(exchanges=2, exchange_attempts=2, refresh_attempts=3, refreshes=3)
    infos: list[Any] = []
    result = judge(
        config, ["acme", "globex"], 4, 4, {}, {"done": {0: worker}, "crashed": {}}, infos, healthy, "x"
    )
    assert set(result.broken) == {"zero 401 seen by callers", "zero tenants needing re-authorization"}
    racy = SimulatorStats(
        exchanges=2, exchange_attempts=2, refresh_attempts=5, refreshes=4, invalid_grant=1, families_revoked=1
    )
    result = judge(
        config, ["acme", "globex"], 4, 3, {}, {"done": {}, "crashed": {0: "killed"}}, infos, racy, "x"
    )
    assert {
        "every callback answered 200",
        "refresh requests == ideal",
        "refreshes == ideal",
        "zero invalid_grant",
        "zero families revoked",
        "no worker crashed",
    } <= set(result.broken)
    assert not result.ok


# --------------------------------------------------------------------------- newcomer friction
# Commands ask only for what they need, create nothing they were not asked to, and name
# what they cannot reach.


def run_in(folder: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_status_needs_only_the_client_id(env: dict[str, str], sim: FakeFactorial, store: str) -> None:
    seed(sim, store, "acme", 1)
    del env["FACTORIAL_CLIENT_SECRET"], env["FACTORIAL_REDIRECT_URI"]
    done = cli("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert '"tenant": "acme"' in done.stdout


def test_read_only_commands_create_no_file(env: dict[str, str], tmp_path: Path) -> None:
    folder, data = tmp_path / "cwd", tmp_path / "data"
    folder.mkdir()
    env.pop("FACTORIAL_TOKENS_STORE")  # the default store, in the user's data folder
    env["XDG_DATA_HOME"] = str(data)
    done = run_in(folder, "status", env=env)
    assert done.returncode == 0, done.stderr
    assert f"{data}/factorial-tokens/tokens.db does not exist yet" in done.stdout
    assert run_in(folder, "status", "--json", env=env).stdout.strip() == "[]"
    done = run_in(folder, "connect-url", "acme", env=env)
    assert done.returncode == 0 and "/oauth/authorize?" in done.stdout
    for command in ("token", "whoami", "refresh"):
        assert run_in(folder, command, "acme", env=env).returncode == 3  # not connected
    assert not data.exists() and list(folder.iterdir()) == []  # no database, no key file
    # A command that writes creates the default store in the data folder, not here.
    done = run_in(folder, "keepalive", "--once", env=env)
    assert done.returncode == 0, done.stderr
    assert (data / "factorial-tokens" / "tokens.db").exists() and list(folder.iterdir()) == []


def test_an_unreachable_store_is_named(env: dict[str, str]) -> None:
    done = cli("status", "--store", "redis://:hunter2-password@127.0.0.1:1/3", env=env)
    assert done.returncode == 6
    assert "127.0.0.1:1/3" in done.stderr and "hunter2" not in done.stderr
    done = cli("status", "--store", "postgresql://me:hunter2-password@127.0.0.1:1/tokensdb", env=env)
    assert done.returncode == 6
    assert "127.0.0.1:1/tokensdb" in done.stderr and "hunter2" not in done.stderr


def test_an_unreachable_provider_is_named(env: dict[str, str], sim: FakeFactorial, store: str) -> None:
    seed(sim, store, "acme", 1)
    env["FACTORIAL_BASE_URL"] = "http://127.0.0.1:9"
    done = cli("whoami", "acme", env=env)
    assert done.returncode == 5
    assert "cannot connect to 127.0.0.1:9" in done.stderr


def test_token_needs_the_secret_only_to_refresh(env: dict[str, str], sim: FakeFactorial, store: str) -> None:
    issued = seed(sim, store, "acme", 1)
    del env["FACTORIAL_CLIENT_SECRET"], env["FACTORIAL_REDIRECT_URI"]
    done = cli("token", "acme", env=env, token_out=True)
    assert done.returncode == 0 and done.stdout.strip() == issued
    expire(store, "acme")
    done = cli("token", "acme", env=env)
    assert done.returncode == 2 and "FACTORIAL_CLIENT_SECRET" in done.stderr
    assert sim.stats.token_requests == 1  # only the seeding exchange: nothing sent without the secret


def expire(store: str, tenant: str) -> None:
    """Make ``tenant``'s stored tokens expired (re-sealed with the CLI's key file)."""
    import attrs

    from factorial_tokens.sealing import JsonCodec, Keyring, PayloadCodec, SealedCodec

    async def run() -> None:
        keys = urlsplit(store).path[1:] + ".keys"
        codec: PayloadCodec = SealedCodec(Keyring.from_file(keys)) if os.path.exists(keys) else JsonCodec()
        backend = store_from_url(store)
        try:
            key = TenantKey(CLIENT_ID, tenant)
            record = await backend.read(key)
            assert record is not None
            tokens = attrs.evolve(codec.decode(key, record.payload), expires_at=time.time() - 1)
            update = Update(codec.encode(key, tokens), record.status, tokens.expires_at, record.updated_at)
            await backend.replace(key, update)
        finally:
            await backend.aclose()

    asyncio.run(run())


def test_tenants_lists_ids_and_statuses_with_only_the_client_id(
    env: dict[str, str], sim: FakeFactorial, store: str
) -> None:
    seed(sim, store, "acme", 1)
    seed(sim, store, "café ☕", 2)
    del env["FACTORIAL_CLIENT_SECRET"], env["FACTORIAL_REDIRECT_URI"]
    done = cli("tenants", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["acme\tactive", "café ☕\tactive"]
    done = cli("tenants", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        {"tenant": "acme", "status": "active"},
        {"tenant": "café ☕", "status": "active"},
    ]


def test_tenants_on_a_missing_sqlite_file_creates_nothing(env: dict[str, str], tmp_path: Path) -> None:
    folder, data = tmp_path / "cwd", tmp_path / "data"
    folder.mkdir()
    env.pop("FACTORIAL_TOKENS_STORE")
    env.pop("FACTORIAL_CLIENT_SECRET")
    env["XDG_DATA_HOME"] = str(data)
    done = run_in(folder, "tenants", env=env)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    assert run_in(folder, "tenants", "--json", env=env).stdout.strip() == "[]"
    assert not data.exists() and list(folder.iterdir()) == []


def test_read_only_commands_do_not_create_a_postgres_schema(env: dict[str, str]) -> None:
    import asyncpg  # type: ignore[import-untyped]

    from .postgres_server import server_url, store_url

    url = store_url()
    schema = parse_qs(urlsplit(url).query)["schema"][0]

    async def exists() -> bool:
        con = await asyncpg.connect(server_url(), timeout=5)
        try:
            found = await con.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema)
            return bool(found)
        finally:
            await con.close()

    env["FACTORIAL_TOKENS_STORE"] = url
    done = cli("status", "--json", env=env)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    done = cli("tenants", env=env)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    for command in ("token", "whoami", "refresh", "revoke"):
        assert cli(command, "acme", env=env).returncode == 3  # not connected
    assert (
        cli("token", "acme", env={k: v for k, v in env.items() if k != "FACTORIAL_CLIENT_SECRET"}).returncode
        == 3
    )
    assert not asyncio.run(exists())
    # A command that writes creates it.
    done = cli("keepalive", "--once", env=env)
    assert done.returncode == 0, done.stderr
    assert asyncio.run(exists())


def test_connect_link_with_an_overflowing_ttl_is_a_usage_error(env: dict[str, str]) -> None:
    """``1e400`` seconds read as infinity, and signing the link raised a traceback (exit 1)."""
    done = cli("connect-link", "acme", "--ttl", "1" + "0" * 400, env=env)
    assert "Traceback" not in done.stderr, done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2


def test_connect_link_with_a_script_link_base_is_refused(env: dict[str, str]) -> None:
    """``--link-base javascript:alert(1)//`` printed a link that runs script when opened."""
    done = cli("connect-link", "acme", "--link-base", "javascript:alert(1)//", env=env)
    assert done.returncode == 2 and "javascript" not in done.stdout, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "link" in done.stderr


def test_connect_link_with_an_unparsable_link_base_is_a_usage_error(env: dict[str, str]) -> None:
    """``--link-base 'http://[::1'`` (a missing bracket) raised ValueError from
    ``urlsplit`` inside ``_check_link_base``: a traceback and exit 1 ("a guarantee was
    broken") instead of a usage error (exit 2)."""
    done = cli("connect-link", "acme", "--link-base", "http://[::1", env=env)
    assert "Traceback" not in done.stderr, done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2


def test_serve_refuses_an_invalid_tenant_filter(env: dict[str, str]) -> None:
    """``serve --tenant`` values were taken as given: an id no tenant can have (empty,
    a control character) started a server that answers 404 to everyone, and a decomposed
    ``café`` never matched the composed id the routes compare it with."""
    for bad in ("", "acme\u200b"):
        try:
            done = cli("serve", "--port", "0", "--tenant", bad, env=env, timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve started with --tenant {bad!r}")
        assert done.returncode == 2 and "tenant" in done.stderr, done.stderr


def test_status_watch_needs_only_the_client_id(env: dict[str, str], sim: FakeFactorial, store: str) -> None:
    """``status --watch`` builds its manager with ``cfg.manager(read_only=True)``
    (cli/_commands.py, status), not ``listing=True``: unlike ``status`` it demands the
    client secret and the redirect URI and exits 2, though the README says ``status``
    needs only the client id."""
    seed(sim, store, "acme", 1)
    del env["FACTORIAL_CLIENT_SECRET"], env["FACTORIAL_REDIRECT_URI"]
    done = cli("status", "--watch", "--count", "1", "--interval", "0.1", env=env, timeout=20)
    assert done.returncode == 0, done.stderr
    assert "acme" in done.stdout


def test_status_watch_creates_no_file(env: dict[str, str], tmp_path: Path) -> None:
    """``status --watch`` on a store file that does not exist makes its folder and an
    empty SQLite database (``Config.manager`` only refuses a missing file for a command
    about one tenant; ``read_only`` does not stop ``os.makedirs`` nor the store opening):
    the README says read-only commands create no file."""
    data = tmp_path / "data"
    env["FACTORIAL_TOKENS_STORE"] = "sqlite:///" + str(data / "tokens.db")
    done = cli("status", "--watch", "--count", "1", "--interval", "0.1", env=env, timeout=20)
    assert done.returncode == 0, done.stderr
    assert not data.exists(), sorted(str(p) for p in data.rglob("*"))


def test_an_sqlite_store_in_an_impossible_folder_is_not_a_traceback(env: dict[str, str]) -> None:
    """``keepalive`` on ``sqlite:////proc/nope/tokens.db``: ``Config.manager`` calls
    ``os.makedirs`` outside any handler (``_run`` maps only FactorialTokensError), so the
    FileNotFoundError ends in a traceback and exit 1 ("a guarantee was broken") instead of
    a configuration error (2) or an unavailable store (6)."""
    done = cli("keepalive", "--once", "--store", "sqlite:////proc/nope/tokens.db", env=env, timeout=20)
    assert "Traceback" not in done.stderr, done.stderr.strip().splitlines()[-1]
    assert done.returncode in (2, 6)


def test_an_unparsable_store_url_is_a_usage_error(env: dict[str, str]) -> None:
    """``status``/``tenants`` with a store URL urllib cannot split (``redis://...@[::1/0``,
    a missing bracket): ``Config.sqlite_missing`` calls ``urlsplit`` and its ValueError
    escapes ``_listing`` (which catches only FactorialTokensError): a traceback and exit 1
    instead of the documented 2 for a bad store URL."""
    for command in ("status", "tenants"):
        done = cli(command, "--store", "redis://:hunter2-pass@[::1/0", env=env, timeout=20)
        assert "Traceback" not in done.stderr, (command, done.stderr.strip().splitlines()[-1])
        assert done.returncode == 2, command
        assert "hunter2" not in done.stderr


def test_a_non_utf8_client_secret_or_id_is_a_usage_error(env: dict[str, str]) -> None:
    """A client secret or id that is not UTF-8 in the environment (Python hands it over
    with a lone surrogate) reaches ``_secret.py``'s ``.encode()`` in ``TokenManager``:
    UnicodeEncodeError, a traceback and exit 1 instead of a configuration error (2)."""
    for name in ("FACTORIAL_CLIENT_SECRET", "FACTORIAL_CLIENT_ID"):
        bad = dict(env)
        bad[name] = "\udcff" + bad[name]  # the byte 0xff, as os.environ decodes it
        done = cli("connect-url", "acme", env=bad, timeout=20)
        assert "Traceback" not in done.stderr, (name, done.stderr.strip().splitlines()[-1])
        assert done.returncode == 2, name


def test_keepalive_with_an_infinite_refresh_rate_is_a_usage_error(env: dict[str, str]) -> None:
    """``--refresh-rate`` is ``click.FloatRange(0, min_open=True)``, which takes ``inf``;
    ``TokenManager`` checks only ``refresh_rate > 0`` and then computes
    ``int(refresh_rate // 60)`` (_manager.py, the burst): ValueError, a traceback and exit 1
    instead of a usage error (2)."""
    done = cli("keepalive", "--once", "--refresh-rate", "inf", env=env, timeout=20)
    assert "Traceback" not in done.stderr, done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2


def test_demo_with_a_long_think_time_still_ends(env: dict[str, str]) -> None:
    """``demo --think`` is a bare float (no upper bound, ``inf`` accepted) and each demo
    task sleeps the whole think time after checking the deadline (demo/_worker.py, task):
    ``-d 1 --think inf`` never ends (nor does a think time of a day), instead of ending at
    its duration or being refused as a usage error."""
    command = [str(SCRIPT), "demo", "-t", "1", "-p", "1", "-c", "1", "-d", "1", "--think", "inf"]
    proc = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("demo -d 1 --think inf still running after 30 s")
    assert "Traceback" not in err
    assert proc.returncode in (0, 2), out + err


def test_a_base_url_with_an_impossible_port_is_a_configuration_error(
    env: dict[str, str], sim: FakeFactorial, store: str
) -> None:
    """``FACTORIAL_BASE_URL=http://127.0.0.1:99999`` passes ``FactorialApp``'s URL check
    (_models.py ``_check_base`` -> ``_check_url`` never reads the port), so the bad setting
    only surfaces when aiohttp refuses the URL at the first request: ``refresh`` reports
    "connection_lost (the request was sent but no answer came)", a refresh *in doubt*, and
    exits 5 (provider error) for what is bad configuration (2), and nothing was sent."""
    seed(sim, store, "acme", 1)
    env["FACTORIAL_BASE_URL"] = "http://127.0.0.1:99999"
    done = cli("refresh", "acme", env=env, timeout=30)
    assert "was sent" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr


def test_listings_do_not_write_terminal_escapes_from_the_store(env: dict[str, str], store: str) -> None:
    """A tenant id is validated when the library writes it, but ``tenants`` and ``status``
    print the ids the store lists as they are (cli/_commands.py ``tenants_command`` echoes
    ``info.tenant``; ``status`` only escapes rich markup): a row written into the shared
    store by anyone else, with ESC sequences in its id, retitles or clears the operator's
    terminal. (``--json`` escapes them; the plain outputs should too, or skip the row.)"""

    async def plant() -> None:
        backend = store_from_url(store)
        try:
            key = TenantKey(CLIENT_ID, "evil\x1b]0;pwned\x07\x1b[2J")
            await backend.replace(key, Update(b"{}", expires_at=time.time() + 3600, updated_at=time.time()))
        finally:
            await backend.aclose()

    asyncio.run(plant())
    for command in ("tenants", "status"):
        done = cli(command, env=env)
        assert done.returncode == 0, done.stderr
        assert "\x1b" not in done.stdout and "\x07" not in done.stdout, (command, done.stdout)


def test_serve_with_an_unparsable_success_url_is_a_usage_error(env: dict[str, str], tmp_path: Path) -> None:
    """``serve --success-url 'http://[::1'`` (a missing bracket): ``check_success_url``
    (_connect.py) lets urllib's ValueError out, and ``serve`` validates the URL only in
    ``connect_app``, after the manager has opened (and created) the store: a traceback and
    exit 1 instead of a usage error (2), and a store file left behind."""
    data = tmp_path / "data"
    env["FACTORIAL_TOKENS_STORE"] = "sqlite:///" + str(data / "tokens.db")
    try:
        done = cli("serve", "--port", "0", "--success-url", "http://[::1", env=env, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("serve started with an unparsable --success-url")
    assert "Traceback" not in done.stderr, done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2


def test_demo_report_into_a_missing_folder_is_not_a_broken_guarantee(
    env: dict[str, str], tmp_path: Path
) -> None:
    """``demo --report PATH`` is a ``click.Path(writable=True)``, which checks nothing for a
    file that does not exist yet; the report is opened only after the whole run
    (cli/_commands.py ``demo``, ``open(report, "w")``, no handler): a folder that does not
    exist ends a run whose guarantees all held in a FileNotFoundError traceback and exit 1,
    the code that says a guarantee was broken, instead of a usage error (2, best before
    the run)."""
    report = tmp_path / "no-such-folder" / "report.json"
    done = cli(
        "demo", "-t", "1", "-p", "1", "-c", "1", "-d", "1", "--report", str(report), env=env, timeout=60
    )
    assert "Traceback" not in done.stderr, done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2


def test_status_json_survives_a_record_dated_past_year_9999(env: dict[str, str], store: str) -> None:
    """``status --json`` turns each record's ``expires_at`` into ISO 8601 with
    ``datetime.fromtimestamp`` (cli/_commands.py ``_iso``), unguarded: one record in the
    store with an expiry beyond year 9999 (written by another tool or version; the plain
    ``status`` table shows it) makes the whole listing a ValueError traceback, exit 1."""

    async def plant() -> None:
        backend = store_from_url(store)
        try:
            await backend.replace(
                TenantKey(CLIENT_ID, "far"), Update(b"{}", expires_at=1e15, updated_at=time.time())
            )
        finally:
            await backend.aclose()

    asyncio.run(plant())
    assert cli("status", env=env).returncode == 0
    done = cli("status", "--json", env=env)
    assert "Traceback" not in done.stderr, done.stderr.strip().splitlines()[-1]
    assert done.returncode == 0
    assert [row["tenant"] for row in json.loads(done.stdout)] == ["far"]


def test_status_watch_refuses_an_interval_of_zero(
    env: dict[str, str], sim: FakeFactorial, store: str
) -> None:
    """``status --watch --interval 0`` is taken (``Duration`` accepts 0 and ``watch`` sleeps
    ``interval`` between listings, _watch.py ``watch``): the watch lists the store and
    redraws in a tight loop, a store query per iteration on every host an operator runs it
    on, where ``keepalive --interval 0`` is refused as a usage error (2)."""
    seed(sim, store, "acme", 1)
    try:
        done = cli("status", "--watch", "--interval", "0", env=env, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("status --watch --interval 0 ran, listing the store without pause")
    assert done.returncode == 2, done.stderr

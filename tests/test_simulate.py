"""``factorial-tokens simulate``: a local Factorial to develop against, driven as the README
says (simulate in one terminal, serve in another, a browser, then an API call)."""

from __future__ import annotations

import html
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import httpx

from .test_cli import SCRIPT, _free_port


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(SCRIPT), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out, err


def test_simulate_then_serve_connects_a_company_and_an_api_call_works(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FACTORIAL_")}
    sim_port, serve_port = _free_port(), _free_port()
    redirect = f"http://127.0.0.1:{serve_port}/oauth/callback"
    sim = _start(
        ["simulate", "--port", str(sim_port), "--redirect-uri", redirect, "--fault", "rate_limited:1:token"],
        clean,
    )
    serve: subprocess.Popen[str] | None = None
    try:
        assert sim.stdout is not None
        lines = [sim.stdout.readline() for _ in range(5)]
        assert lines[0].strip() == f"simulated Factorial listening on http://127.0.0.1:{sim_port}", lines
        # The lines it prints for the other terminal are what the other terminal uses.
        env = dict(clean, FACTORIAL_TOKENS_STORE=f"sqlite:///{tmp_path / 'dev.db'}")
        for line in lines:
            words = shlex.split(line)
            if words[:1] == ["export"]:
                env.update(word.split("=", 1) for word in words[1:])
        assert env["FACTORIAL_BASE_URL"] == f"http://127.0.0.1:{sim_port}"
        assert env["FACTORIAL_CLIENT_SECRET"] == "dev-secret"
        serve = _start(["serve", "--port", str(serve_port)], env)
        assert serve.stdout is not None
        assert serve.stdout.readline().startswith(f"listening on http://127.0.0.1:{serve_port}")

        link = subprocess.run(
            [str(SCRIPT), "connect-link", "acme"], env=env, capture_output=True, text=True, timeout=60
        )
        assert link.returncode == 0, link.stderr
        assert link.stdout.startswith(f"http://127.0.0.1:{serve_port}/connect/acme?link=")
        with httpx.Client(timeout=20) as browser:
            assert browser.get(f"http://127.0.0.1:{serve_port}/connect/acme").status_code == 403
            to_factorial = browser.get(link.stdout.strip())
            assert to_factorial.status_code == 302
            page = browser.get(to_factorial.headers["Location"])
            assert page.status_code == 200 and "Approve" in page.text
            form = {
                html.unescape(name): html.unescape(value)
                for name, value in re.findall(r'type="hidden" name="([^"]*)" value="([^"]*)"', page.text)
            }
            assert form["client_id"] == "dev-client" and "state" in form
            approved = browser.get(
                f"http://127.0.0.1:{sim_port}/oauth/authorize",
                params={**form, "company_id": "42", "approve": "1"},
            )
            assert approved.status_code == 302 and approved.headers["Location"].startswith(redirect + "?")
            done = browser.get(approved.headers["Location"])
            assert done.status_code == 200 and "acme" in done.text

        whoami = subprocess.run(
            [str(SCRIPT), "whoami", "acme", "--json"], env=env, capture_output=True, text=True, timeout=60
        )
        assert whoami.returncode == 0, whoami.stderr
        assert '"company_id": "42"' in whoami.stdout
    finally:
        if serve is not None:
            _stop(serve)
        out, _err = _stop(sim)
    assert "exchanges 1, refreshes 0, invalid_grant 0, families revoked 0, API calls " in out
    assert out.rstrip().endswith("faults served 1")


def test_simulate_refuses_a_bad_fault() -> None:
    done = subprocess.run(
        [str(SCRIPT), "simulate", "--fault", "meteor:1"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "KIND[:TIMES[:ENDPOINT]]" in done.stderr


def test_simulate_refuses_a_fault_count_it_cannot_use() -> None:
    """``--fault KIND:TIMES`` checks TIMES with ``str.isdigit()`` and then calls
    ``int(times)`` and ``sim.inject(times=...)`` outside any handler (cli/_commands.py
    ``_fault`` and ``simulate``): ``0`` (inject raises ``times must be >= 1``), ``²`` (a
    digit to ``isdigit``, not to ``int``) and a 5000-digit count (over Python's
    int-conversion limit) each end in a ValueError traceback and exit 1 instead of a usage
    error (2) before anything listens."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FACTORIAL_")}
    for times in ("0", "\u00b2", "9" * 5000):
        done = subprocess.run(
            [str(SCRIPT), "simulate", "--port", "0", "--fault", f"http_503:{times}"],
            env=clean,
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
        assert "Traceback" not in done.stderr, (times[:8], done.stderr.strip().splitlines()[-1][:120])
        assert done.returncode == 2, times[:8]

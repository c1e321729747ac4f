"""Token material sealed at rest: AES-GCM bound to the tenant, key files, rotation, rekey.

The codec and keyring are tested directly; the manager paths (cross-tenant copy, wrong or
missing key, rotation while workers run) against the strict simulator and real stores.
Per-store raw dumps (SQLite file bytes, Redis keys, Postgres rows) live at the bottom.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pickle
import stat
from pathlib import Path

import pytest

from factorial_tokens import (
    ConfigurationError,
    EventKind,
    FactorialApp,
    JsonCodec,
    Keyring,
    MemoryStore,
    SealedCodec,
    TenantKey,
    TenantNotConnected,
    TokenEvent,
    TokenManager,
    TokenSealError,
    TokenSet,
    Update,
    ensure_key_file,
    rekey,
)
from factorial_tokens._sealing import sealed_with
from factorial_tokens.testing import FakeFactorial

from .conftest import CLIENT_ID, app_for

BUDGETS = {"lease_ttl": 6.0, "provider_timeout": 2.0}
KEY = TenantKey(CLIENT_ID, "acme")
TOKENS = TokenSet(
    access_token="a" * 20 + "ACCESS-secret-0123456789",
    refresh_token="r" * 20 + "REFRESH-secret-0123456789",
    scope="read write",
    expires_at=2_000_000_000.0,
    obtained_at=1_900_000_000.0,
)


def secret_forms(*secrets: str | None) -> list[bytes]:
    """Every way a secret could sit in a dump: raw, base64 (both alphabets), hex, JSON-escaped."""
    forms: list[bytes] = []
    for secret in secrets:
        if not secret:
            continue
        raw = secret.encode()
        forms += [
            raw,
            base64.b64encode(raw).rstrip(b"="),
            base64.urlsafe_b64encode(raw).rstrip(b"="),
            raw.hex().encode(),
            raw.hex().upper().encode(),
            secret.encode("utf-16-le"),
        ]
    return forms


def leaked(blob: bytes, *secrets: str | None) -> list[bytes]:
    """The forms of ``secrets`` found in ``blob`` (empty when nothing leaked)."""
    return [form for form in secret_forms(*secrets) if form in blob]


# -- the codec ---------------------------------------------------------------------------


def test_sealed_payload_round_trips_and_holds_no_token() -> None:
    ring = Keyring.generate("k1")
    codec = SealedCodec(ring)
    one, two = codec.encode(KEY, TOKENS), codec.encode(KEY, TOKENS)
    assert one.startswith(b"s1:k1:") and two.startswith(b"s1:k1:")
    assert one != two  # a fresh nonce per write
    assert one.isascii()
    assert codec.decode(KEY, one) == TOKENS == codec.decode(KEY, two)
    assert sealed_with(one) == "k1"
    assert leaked(one, TOKENS.access_token, TOKENS.refresh_token, TOKENS.scope) == []
    # The control: the plain codec does hold the tokens, so the search above can fail.
    plain = JsonCodec().encode(KEY, TOKENS)
    assert leaked(plain, TOKENS.access_token, TOKENS.refresh_token)


@pytest.mark.parametrize(
    "other",
    [
        TenantKey(CLIENT_ID, "evil"),  # another tenant of the same app
        TenantKey("another-app", "acme"),  # the same tenant id in another app
        TenantKey(CLIENT_ID, "acme "),  # a near-miss tenant id
        TenantKey(CLIENT_ID + "\x00", "acme"),  # length-prefixed AAD: no boundary tricks
    ],
)
def test_a_payload_opens_only_for_its_tenant(other: TenantKey) -> None:
    codec = SealedCodec(Keyring.generate("k1"))
    payload = codec.encode(KEY, TOKENS)
    with pytest.raises(TokenSealError, match="another tenant") as info:
        codec.decode(other, payload)
    assert TOKENS.access_token not in str(info.value)


def test_tampering_and_relabelling_are_refused() -> None:
    key = os.urandom(32)
    ring = Keyring([("k1", key), ("k2", key)])  # one key under two ids: the id is authenticated
    codec = SealedCodec(ring)
    payload = codec.encode(KEY, TOKENS)
    assert payload.startswith(b"s1:k2:")
    with pytest.raises(TokenSealError, match="failed authentication"):
        codec.decode(KEY, payload.replace(b"s1:k2:", b"s1:k1:"))
    body = bytearray(payload)
    body[-5] = ord("A") if body[-5] != ord("A") else ord("B")
    with pytest.raises(TokenSealError):
        codec.decode(KEY, bytes(body))
    for broken in (payload[:20], b"s1:k2:", b"s1:", b"s1:k2:!!!!", b"x9:whatever", b"s1:bad id:AAAA"):
        with pytest.raises(TokenSealError):
            codec.decode(KEY, broken)


def test_plain_records_stay_readable_unless_sealing_is_required() -> None:
    plain = JsonCodec().encode(KEY, TOKENS)
    ring = Keyring.generate("k1")
    assert SealedCodec(ring).decode(KEY, plain) == TOKENS
    with pytest.raises(TokenSealError, match="not sealed"):
        SealedCodec(ring, require_sealed=True).decode(KEY, plain)
    sealed = SealedCodec(ring).encode(KEY, TOKENS)
    assert SealedCodec(ring, require_sealed=True).decode(KEY, sealed) == TOKENS
    with pytest.raises(TokenSealError, match="configure the keyring"):
        JsonCodec().decode(KEY, sealed)


def test_unknown_key_id_is_named_and_key_material_never_shown() -> None:
    old, new = Keyring.generate("old"), Keyring.generate("new")
    payload = SealedCodec(old).encode(KEY, TOKENS)
    with pytest.raises(TokenSealError) as info:
        SealedCodec(new).decode(KEY, payload)
    message = str(info.value)
    assert "'old'" in message and "known: new" in message
    for ring in (old, new):
        for material in _material(ring):
            assert material not in message


def _material(ring: Keyring) -> list[str]:
    """Every key of ``ring`` in base64, urlsafe base64 and hex, for leak searches."""
    out = []
    for line in ring.export().splitlines():
        encoded = line.partition(":")[2]
        raw = base64.b64decode(encoded)
        out += [encoded, base64.urlsafe_b64encode(raw).decode(), raw.hex()]
    return out


# -- the keyring -------------------------------------------------------------------------


def test_keyring_text_format_newest_last() -> None:
    k1, k2, k3 = (base64.b64encode(os.urandom(32)).decode() for _ in range(3))
    ring = Keyring.parse(f" k1:{k1} , k2:{k2}\n# a comment\n\nk3:{k3}\n")
    assert ring.kids == ("k1", "k2", "k3") and ring.newest == "k3"
    assert Keyring.parse(ring.export()).export() == ring.export()
    assert "k2" in ring and "k4" not in ring and len(ring) == 3
    assert ring.without("k3").newest == "k2"
    rotated = ring.rotated("k4")
    assert rotated.kids == ("k1", "k2", "k3", "k4")
    assert Keyring.generate().newest != Keyring.generate().newest


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "no key found"),
        ("just-a-key-without-id", "entry 1 is not"),
        ("k1:" + base64.b64encode(b"S" * 31).decode(), "31 bytes"),
        ("k1:not*base64*SECRETSECRET", "not valid base64"),
        ("bad id:" + base64.b64encode(b"S" * 32).decode(), "entry 1 is not"),
    ],
)
def test_malformed_keyrings_give_a_clear_error_without_the_key(text: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        Keyring.parse(text, source="FACTORIAL_TOKENS_KEYS")
    message = str(info.value)
    assert "SECRET" not in message and "UydT" not in message  # UydT...: base64 of b"S"*n
    assert text.partition(":")[2] not in message or not text.partition(":")[2]


def test_keyring_constructor_validates() -> None:
    with pytest.raises(ConfigurationError, match="at least one"):
        Keyring([])
    with pytest.raises(ConfigurationError, match="twice"):
        Keyring([("k", os.urandom(32)), ("k", os.urandom(32))])
    with pytest.raises(ConfigurationError, match="32 bytes"):
        Keyring({"k": b"short"})
    with pytest.raises(ConfigurationError, match="key id"):
        Keyring({"k:1": os.urandom(32)})
    with pytest.raises(ConfigurationError, match="no key 'zz'"):
        Keyring.generate("k").without("zz")
    with pytest.raises(ConfigurationError):
        Keyring.generate("k").without("k")  # nothing would remain


def test_keyring_repr_and_pickle_hide_the_keys() -> None:
    ring = Keyring.generate("k1").rotated("k2")
    assert repr(ring) == "Keyring(kids=('k1', 'k2'), newest='k2')"
    assert (
        repr(SealedCodec(ring))
        == "SealedCodec(Keyring(kids=('k1', 'k2'), newest='k2'), require_sealed=False)"
    )
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(ring)


def test_keyring_from_env() -> None:
    ring = Keyring.generate("k1").rotated("k2")
    text = ring.export().replace("\n", ",")
    assert Keyring.from_env(environ={}) is None
    assert Keyring.from_env(environ={"FACTORIAL_TOKENS_KEYS": "  "}) is None
    loaded = Keyring.from_env(environ={"FACTORIAL_TOKENS_KEYS": text})
    assert loaded is not None and loaded.kids == ("k1", "k2") and loaded.export() == ring.export()
    with pytest.raises(ConfigurationError, match="FACTORIAL_TOKENS_KEYS: entry 1"):
        Keyring.from_env(environ={"FACTORIAL_TOKENS_KEYS": "garbage"})


# -- key files ---------------------------------------------------------------------------


def test_key_file_is_created_0600_once_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db.keys"
    first = ensure_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) == 1
    again = ensure_key_file(path)
    assert again.export() == first.export()
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.db.keys"]  # no temp files left


async def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    rings = await asyncio.gather(*(asyncio.to_thread(ensure_key_file, path) for _ in range(16)))
    assert len({ring.export() for ring in rings}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o666, 0o700 | 0o004])
def test_a_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keys"
    ensure_key_file(path)
    path.chmod(mode)
    with pytest.raises(ConfigurationError, match="chmod 600") as info:
        Keyring.from_file(path)
    with pytest.raises(ConfigurationError, match="group or others"):
        ensure_key_file(path)
    for material in _material(Keyring.parse(path.read_text())):
        assert material not in str(info.value)


def test_key_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        Keyring.from_file(tmp_path / "missing")
    with pytest.raises(ConfigurationError, match="cannot be created"):
        ensure_key_file(tmp_path / "no-such-dir" / "keys")
    bad = tmp_path / "bad"
    bad.write_bytes(b"k1:\xff\xfe")
    bad.chmod(0o600)
    with pytest.raises(ConfigurationError, match="not a text key file"):
        Keyring.from_file(bad)


def test_save_writes_0600_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    ring = Keyring.generate("k1")
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rotated = Keyring.from_file(path).rotated("k2")
    rotated.save(path)
    assert Keyring.from_file(path).kids == ("k1", "k2")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- the manager -------------------------------------------------------------------------


def test_keyring_and_codec_together_are_refused(sim: FakeFactorial) -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        TokenManager(app_for(sim), keyring=Keyring.generate(), codec=JsonCodec())


async def test_the_environment_keyring_seals(sim: FakeFactorial, monkeypatch: pytest.MonkeyPatch) -> None:
    ring = Keyring.generate("envkey")
    monkeypatch.setenv("FACTORIAL_TOKENS_KEYS", ring.export().strip())
    store = MemoryStore()
    async with TokenManager(app_for(sim), store, **BUDGETS) as tm:
        tokens = await tm.exchange_code("acme", sim.issue_code(company_id=1))
    record = await store.read(KEY)
    assert record is not None and sealed_with(record.payload) == "envkey"
    assert leaked(record.payload, tokens.access_token, tokens.refresh_token) == []
    monkeypatch.delenv("FACTORIAL_TOKENS_KEYS")
    async with TokenManager(app_for(sim), store, **BUDGETS) as without:
        with pytest.raises(TokenSealError, match="configure the keyring"):
            await without.access_token("acme")
    async with TokenManager(app_for(sim), store, keyring=ring, **BUDGETS) as tm:
        assert await tm.access_token("acme") == tokens.access_token

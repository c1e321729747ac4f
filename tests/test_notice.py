"""Notices: the record a commit's announcement carries, sealed under the app's secret."""

from __future__ import annotations

import attrs

from factorial_tokens import FactorialApp
from factorial_tokens._notice import Notices
from factorial_tokens._secret import AppSecret
from factorial_tokens.store import TenantKey, TenantStatus, Update


def _app(secret: str = "s3cret") -> FactorialApp:
    return FactorialApp(client_id="app", client_secret=secret, redirect_uri="http://localhost/cb")


def test_a_notice_opens_to_the_record_it_sealed() -> None:
    notices = Notices(AppSecret(_app()))
    key = TenantKey("app", "acme")
    for update in (
        Update(b"j1:{}\x00\xff", TenantStatus.ACTIVE, 1234.5, 1000.25),
        Update(b"x", TenantStatus.NEEDS_REAUTH, None, 0.0),
    ):
        record = notices.open(key, notices.seal(key, 7, update))
        assert record is not None
        assert (record.key, record.payload, record.status) == (key, update.payload, update.status)
        assert record.version == 7
        assert (record.expires_at, record.updated_at) == (update.expires_at, update.updated_at)


def test_a_notice_hides_the_payload_and_is_refused_elsewhere() -> None:
    """Listeners without the client secret learn nothing; a notice for another tenant, of
    another app, or altered in any byte opens to nothing (its reader reads the record)."""
    notices = Notices(AppSecret(_app()))
    key = TenantKey("app", "acme")
    update = Update(b"j1:the-access-token", TenantStatus.ACTIVE, 1234.5, 1000.25)
    notice = notices.seal(key, 3, update)
    assert b"the-access-token" not in notice
    assert notices.open(TenantKey("app", "other"), notice) is None
    assert Notices(AppSecret(_app("another-secret"))).open(key, notice) is None
    for index in range(len(notice)):
        altered = bytearray(notice)
        altered[index] ^= 1
        assert notices.open(key, bytes(altered)) is None
    assert notices.open(key, b"") is None and notices.open(key, notice[:20]) is None
    assert notices.open(key, notices.seal(key, 3, attrs.evolve(update, notice=b"n"))) is not None

"""What the simulator writes on the wire: JSON answers and OAuth errors, token answers in
each :class:`Dialect`, the API resources' bodies, the approval page, a dropped connection."""

from __future__ import annotations

import datetime
import enum
import html
import json
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from ._rules import GrantError, Pair

__all__ = [
    "NO_STORE",
    "Dialect",
    "approval_page",
    "drop",
    "error_response",
    "format_seconds",
    "json_response",
    "render_credentials",
    "render_employees",
    "token_body",
]

NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class Dialect(enum.Enum):
    """How token answers are shaped. Every dialect is valid JSON that a real OAuth server
    (or a proxy in front of it) may send; a client must read all of them alike."""

    #: Doorkeeper's own: integer ``expires_in`` and ``created_at``, ``"Bearer"``, scope string.
    STANDARD = "standard"
    #: Numbers as strings: ``expires_in`` ``"7200"``, ``created_at`` as an ISO 8601 string,
    #: ``token_type`` ``"bearer"``.
    STRINGS = "strings"
    #: ``expires_in`` a float, ``scope`` a list, ``token_type`` ``"BEARER"``, no
    #: ``created_at``, and extra fields (``id_token``, ``resource_owner_id``, an object).
    LOOSE = "loose"


def token_body(
    pair: Pair, dialect: Dialect, access_token_ttl: float, *, with_refresh: bool = True
) -> dict[str, Any]:
    """The token endpoint's answer for ``pair``, shaped by ``dialect``."""
    expires_in = max(1, round(access_token_ttl)) if pair.expires_at is not None else None
    body: dict[str, Any] = {
        "access_token": pair.access,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "refresh_token": pair.refresh if with_refresh else None,
        "scope": pair.family.scope,
        "created_at": int(pair.created_at),
    }
    if dialect is Dialect.STRINGS:
        body.update(
            token_type="bearer",
            expires_in=None if expires_in is None else str(expires_in),
            created_at=datetime.datetime.fromtimestamp(int(pair.created_at), datetime.UTC).isoformat(),
        )
    elif dialect is Dialect.LOOSE:
        body.update(
            token_type="BEARER",
            expires_in=None if expires_in is None else float(expires_in),
            scope=pair.family.scope.split() if pair.family.scope else None,
            created_at=None,
            id_token="eyJhbGciOiJub25lIn0.e30.",
            resource_owner_id=pair.family.owner.company_id,
            info={"nested": [1, 2, {"deep": True}]},
        )
    return {k: v for k, v in body.items() if v not in (None, "")}


def format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def _ident(value: int, string_ids: bool) -> int | str:
    return str(value) if string_ids else value


def _meta(total: int) -> dict[str, Any]:
    return {
        "limit": 100,
        "total": total,
        "has_next_page": False,
        "has_previous_page": False,
        "start_cursor": None,
        "end_cursor": None,
    }


def render_credentials(pair: Pair, string_ids: bool) -> dict[str, Any]:
    owner = pair.family.owner
    item: dict[str, Any] = {
        "id": _ident(pair.family.id, string_ids),
        "company_id": _ident(owner.company_id, string_ids),
    }
    if not pair.family.company_token and owner.employee_id is not None:
        eid = owner.employee_id
        item.update(
            employee_id=_ident(eid, string_ids),
            email=f"employee{eid}@company{owner.company_id}.example",
            first_name="Employee",
            last_name=str(eid),
            role="admin",
        )
    return {"data": [item], "meta": _meta(1)}


def render_employees(pair: Pair, string_ids: bool) -> dict[str, Any]:
    cid = pair.family.owner.company_id
    names = [("Ada", "Lovelace"), ("Grace", "Hopper"), ("Alan", "Turing")]
    data = [
        {
            "id": _ident(cid * 1000 + i, string_ids),
            "company_id": _ident(cid, string_ids),
            "first_name": first,
            "last_name": last,
            "full_name": f"{first} {last}",
            "email": f"{first.lower()}@company{cid}.example",
        }
        for i, (first, last) in enumerate(names, start=1)
    ]
    return {"data": data, "meta": _meta(len(data))}


def json_response(
    status: int, body: Mapping[str, Any], *, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/json",
        headers=dict(headers or {}),
    )


def error_response(err: GrantError) -> web.Response:
    headers = dict(NO_STORE)
    headers.update(err.headers)
    body = {"error": err.error}
    if err.description:
        body["error_description"] = err.description
    return json_response(err.status, body, headers=headers)


_APPROVAL: Final = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>FakeFactorial: authorize</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:4em auto;line-height:1.5}}</style>
</head><body><h1>Simulated Factorial</h1>
<p>The application <b>{client}</b> asks for access ({scope}).</p>
<form method="get" action="/oauth/authorize">{hidden}
<p><label>Company id <input name="company_id" type="number" min="1" value="1"></label></p>
<p><button name="approve" value="1">Approve</button></p></form></body></html>
"""


def approval_page(query: Mapping[str, str]) -> web.Response:
    """The page a person approves on: the request's parameters ride along, escaped."""
    hidden = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
        for k, v in query.items()
        if k not in ("approve", "company_id")
    )
    body = _APPROVAL.format(
        client=html.escape(query.get("client_id", "?")),
        scope=html.escape(query.get("scope", "default scopes")),
        hidden=hidden,
    )
    return web.Response(
        text=body,
        content_type="text/html",
        headers={
            **NO_STORE,
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
        },
    )


def drop(request: web.Request) -> web.Response:
    """Close the connection without answering; the client sees a disconnect."""
    transport = request.transport
    if transport is not None:
        transport.close()
    # aiohttp discards this answer: the transport is already closing.
    return web.Response(status=500)

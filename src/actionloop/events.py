"""Connection events for the action (OW_WEBSOCKET_EVENTS; contract part D), no I/O.

On connect, before the handshake is answered, the action is invoked with
`{"__ow_event": "connect", "__ow_connection_id", "__ow_headers", "__ow_query"}`;
a result whose `statusCode` is 400 or more refuses the upgrade with that
status and its `body` (an authorizer, as API Gateway has). After a connection
ends: `{"__ow_event": "disconnect", "__ow_connection_id", "code"}`, whose
result goes nowhere.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, NamedTuple

from . import protocol
from .errors import ActionLoopError


class Refused(NamedTuple):
    status: int
    body: bytes
    content_type: str


def head_fields(head: bytes) -> tuple[dict[str, str], dict[str, str]]:
    """The headers (names in lower case, as OpenWhisk web actions see them) and the query of a request head."""
    lines = head.decode("latin-1").split("\r\n")
    target = lines[0].split(" ")[1] if lines[0].count(" ") >= 2 else ""
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(target).query, keep_blank_values=True))
    return headers, query


def connect(connection: str, head: bytes) -> dict[str, Any]:
    headers, query = head_fields(head)
    return {"__ow_event": "connect", "__ow_connection_id": connection, "__ow_headers": headers, "__ow_query": query}


def disconnect(connection: str, code: int | None) -> dict[str, Any]:
    return {"__ow_event": "disconnect", "__ow_connection_id": connection, "code": code}


def refusal(outcome: bytes | ActionLoopError) -> Refused | None:
    """What the connect event's result says: None to accept, else the refusal.

    An action that fails to answer refuses too (502): an authorizer that
    cannot decide must not let anyone in.
    """
    if isinstance(outcome, ActionLoopError):
        return Refused(502, protocol.error(f"The connect event failed: {outcome.message}"), "application/json")
    result = protocol.loads(outcome)
    status = result.get("statusCode") if isinstance(result, dict) else None
    if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
        return None
    body = result.get("body", "")
    if isinstance(body, str):
        return Refused(status, body.encode(), "text/plain; charset=utf-8")
    return Refused(status, protocol.dumps(body), "application/json")

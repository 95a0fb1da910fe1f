"""The handshake rules (handshake.py), with plain calls: no server."""

from __future__ import annotations

import pytest

from actionloop.config import Config
from actionloop.handshake import origin_allowed, presented_token, refusal, request_refusal

GOOD = {
    "Host": "example.com",
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def status(
    headers: dict[str, str], config: Config, query: str = "", open_connections: int = 0, draining: bool = False
) -> int:
    parsed = {"token": [query]} if query else {}
    why = refusal(headers, parsed, config, open_connections, draining)
    return 101 if why is None else why.status


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        (None, ("a.example",), True),  # not a browser
        ("https://a.example", (), True),  # no list: anyone
        ("https://a.example", ("a.example",), True),
        ("http://a.example:8080", ("a.example",), True),  # a bare host: any scheme and port
        ("https://A.example", ("a.example",), True),
        ("https://evil.example", ("a.example",), False),
        ("https://a.example.evil.example", ("a.example",), False),
        ("https://a.example", ("https://a.example",), True),
        ("https://a.example:443", ("https://a.example",), True),  # default port
        ("http://a.example", ("https://a.example",), False),  # scheme differs
        ("https://a.example:8443", ("https://a.example",), False),  # port differs
        ("null", ("a.example",), False),  # sandboxed frames, file: pages
        ("https://a.example:99999", ("a.example",), False),  # unparsable port
        ("https://b.example", ("a.example", "b.example"), True),
    ],
)
def test_origin(origin: str | None, allowed: tuple[str, ...], ok: bool) -> None:
    """The Origin header, never Host, is compared with the allow-list."""
    assert origin_allowed(origin, allowed) is ok


def test_token_from_each_place() -> None:
    """Bearer header first, then ?token=, then a bearer. subprotocol."""
    assert presented_token({"Authorization": "Bearer abc"}, {}) == "abc"
    assert presented_token({"Authorization": "bearer  abc "}, {}) == "abc"
    assert presented_token({}, {"token": ["q"]}) == "q"
    assert presented_token({"Sec-WebSocket-Protocol": "actionloop, bearer.s3"}, {}) == "s3"
    assert presented_token({"Authorization": "Basic x"}, {}) is None


def test_statuses_in_order() -> None:
    """400 not a handshake, 403 origin, 401/403 token, 503 draining or full; else accepted."""
    config = Config(origins=("a.example",), token="t0k", max_connections=2)
    assert status({}, config) == 400
    assert status({**GOOD, "Sec-WebSocket-Version": "8"}, config) == 400
    assert status({**GOOD, "Origin": "https://evil.example"}, config, "t0k") == 403
    assert status(GOOD, config) == 401
    assert status(GOOD, config, "wrong") == 403
    assert status(GOOD, config, "t0k") == 101
    assert status({**GOOD, "Origin": "https://a.example"}, config, "t0k") == 101
    assert status(GOOD, config, "t0k", draining=True) == 503
    assert status(GOOD, config, "t0k", open_connections=2) == 503
    assert status(GOOD, Config()) == 101


@pytest.mark.parametrize(
    ("connection", "upgrade", "ok"),
    [
        ("Upgrade", "websocket", True),
        ("keep-alive, Upgrade", "websocket", True),  # older Firefox, some proxies
        ("upgrade", "WebSocket", True),
        ("Upgrade,keep-alive", "websocket", True),
        ("keep-alive", "websocket", False),
        ("upgrades", "websocket", False),
        ("Upgrade", "websocket2", False),
    ],
)
def test_token_lists(connection: str, upgrade: str, ok: bool) -> None:
    """Connection and Upgrade are token lists (RFC 9110 7.6.1, RFC 6455 4.2.1), in any case."""
    assert status({**GOOD, "Connection": connection, "Upgrade": upgrade}, Config()) == (101 if ok else 400)
    assert status({k: v for k, v in GOOD.items() if k != "Connection"}, Config()) == 400


@pytest.mark.parametrize(
    "key", ["", "abc", "dGhlIHNhbXBsZSBub25j", "dGhlIHNhbXBsZSBub25jZQ", "dGhlIHNhbXBsZSBub25jZQ==x", "é"]
)
def test_bad_keys(key: str) -> None:
    """A Sec-WebSocket-Key that is not 16 bytes in base64 is refused by us (400), before any reservation."""
    assert status({**GOOD, "Sec-WebSocket-Key": key}, Config()) == 400


def test_request_rules() -> None:
    """/init and /run take the origin and token rules, with no handshake headers."""
    config = Config(origins=("a.example",), token="t0k")
    assert request_refusal({}, {}, Config()) is None
    assert request_refusal({"Authorization": "Bearer t0k"}, {}, config) is None
    assert request_refusal({}, {"token": ["t0k"]}, config) is None
    assert getattr(request_refusal({}, {}, config), "status", None) == 401
    assert getattr(request_refusal({"Authorization": "Bearer x"}, {}, config), "status", None) == 403
    refused = request_refusal({"Origin": "https://evil.example"}, {"token": ["t0k"]}, config)
    assert refused is not None and (refused.status, refused.kind) == (403, "origin_refused")

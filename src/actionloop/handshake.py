"""Whether a WebSocket handshake is accepted, with no I/O (contract parts B and C).

/init and /run take the origin and token rules (`request_refusal`).
A handshake is refused before the upgrade, in this order:
  400 not a WebSocket handshake (RFC 6455, 4.2.1: version 13, a valid key);
  403 another site's Origin;
  401 no token / 403 wrong token (when one is set);
  503 draining, or too many connections.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import urllib.parse
from collections.abc import Mapping
from typing import NamedTuple

from .config import Config

SUBPROTOCOL = "actionloop"
TOKEN_SUBPROTOCOL = "bearer."
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class Refusal(NamedTuple):
    status: int
    message: str
    kind: str  # counted in actionloop_errors_total
    headers: tuple[tuple[str, str], ...] = ()


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """Compare the browser's Origin (not Host) with the allow-list (contract part B).

    An entry with a scheme must match scheme, host and port; a bare host name
    matches that host on any scheme and port. No Origin: not a browser, allowed.
    """
    if not allowed or origin is None:
        return True
    try:
        url = urllib.parse.urlsplit(origin)
        port = url.port or DEFAULT_PORTS.get(url.scheme)
    except ValueError:
        return False
    if not url.hostname:
        return False
    for entry in allowed:
        if "://" in entry:
            wanted = urllib.parse.urlsplit(entry)
            wanted_port = wanted.port or DEFAULT_PORTS.get(wanted.scheme)
            if (wanted.scheme, wanted.hostname, wanted_port) == (url.scheme, url.hostname, port):
                return True
        elif entry.lower() == url.hostname:
            return True
    return False


def tokens(value: str) -> set[str]:
    """The elements of a comma-separated header value (RFC 9110, 5.6.1), lower-cased:
    `Connection: keep-alive, Upgrade` asks for an upgrade too (RFC 6455, 4.2.1)."""
    return {part.strip().lower() for part in value.split(",")}


def key_valid(key: str) -> bool:
    """RFC 6455 (4.2.1): Sec-WebSocket-Key is 16 random bytes in base64."""
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (UnicodeEncodeError, binascii.Error):
        return False


def offered_subprotocols(headers: Mapping[str, str]) -> list[str]:
    return [p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]


def presented_token(headers: Mapping[str, str], query: Mapping[str, list[str]]) -> str | None:
    """The token from `Authorization: Bearer`, `?token=`, or a `bearer.` subprotocol.

    Browsers cannot set headers on a WebSocket, hence the other two ways.
    """
    authorization = headers.get("Authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    if "token" in query:
        return query["token"][0]
    for offered in offered_subprotocols(headers):
        if offered.startswith(TOKEN_SUBPROTOCOL):
            return offered[len(TOKEN_SUBPROTOCOL) :]
    return None


def token_refusal(headers: Mapping[str, str], query: Mapping[str, list[str]], token: str) -> Refusal | None:
    """401 without the token, 403 with a wrong one; None when none is set or it matches."""
    if not token:
        return None
    presented = presented_token(headers, query)
    if presented is None:
        return Refusal(
            401, "A token is required: Authorization: Bearer, ?token= or a bearer. subprotocol.", "unauthorized"
        )
    if not hmac.compare_digest(presented.encode(), token.encode()):
        return Refusal(403, "The token is not valid.", "unauthorized")
    return None


def request_refusal(headers: Mapping[str, str], query: Mapping[str, list[str]], config: Config) -> Refusal | None:
    """What a handshake, /init and /run all need: not another site's Origin
    (403), and the token when one is set (401, 403). A cross-site POST of
    text/plain needs no CORS preflight, so /init and /run check too."""
    if not origin_allowed(headers.get("Origin"), config.origins):
        return Refusal(403, "This origin may not use this server.", "origin_refused")
    return token_refusal(headers, query, config.token)


def refusal(
    headers: Mapping[str, str], query: Mapping[str, list[str]], config: Config, open_connections: int, draining: bool
) -> Refusal | None:
    """Why this handshake is refused, or None to accept it."""
    if "websocket" not in tokens(headers.get("Upgrade", "")) or "upgrade" not in tokens(headers.get("Connection", "")):
        return Refusal(400, "This path takes WebSocket connections only.", "bad_handshake")
    if not headers.get("Host"):
        return Refusal(400, "A handshake must name its Host (RFC 6455 4.1).", "bad_handshake")
    if headers.get("Sec-WebSocket-Version") != "13":
        # RFC 6455 4.2.2: the refusal names the versions spoken.
        version = (("Sec-WebSocket-Version", "13"),)
        return Refusal(400, "Only WebSocket version 13 is spoken here.", "bad_handshake", version)
    if not key_valid(headers.get("Sec-WebSocket-Key", "")):
        return Refusal(400, "Sec-WebSocket-Key must be 16 bytes in base64.", "bad_handshake")
    refused = request_refusal(headers, query, config)
    if refused is not None:
        return refused
    if draining:
        return Refusal(503, "The server is shutting down.", "draining")
    if open_connections >= config.max_connections:
        return Refusal(503, "Too many connections; try again later.", "too_many_connections")
    return None

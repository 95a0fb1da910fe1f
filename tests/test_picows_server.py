"""The picows work-around (picows_server.py) leaves picows whole."""

from __future__ import annotations

import subprocess
import sys

from actionloop.picows_server import head_for_picows

CHECK = """
import sys
import actionloop.picows_server as server
assert "picows.api" not in sys.modules, "the client side was loaded"
from picows import ws_connect, WSFrame
assert WSFrame is server.WSFrame
print("ok")
"""


def test_picows_stays_importable_in_full() -> None:
    """After our server-side import, `from picows import ws_connect` works and shares the same classes."""
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == "ok", done.stderr


def test_head_for_picows_keeps_what_is_read() -> None:
    """picows gets the lines it and the handshake rules read, Connection and Upgrade as it wants them."""
    head = (
        b"GET /ws?token=t HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * 20_000 + b"\r\nConnection: keep-alive\r\n"
        b"connection: UPGRADE\r\nUpgrade: WebSocket, h2c\r\nOrigin: https://a\r\nSec-WebSocket-Key: k\r\n\r\n"
    )
    assert head_for_picows(head) == (
        b"GET /ws?token=t HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nHost: a\r\n"
        b"Origin: https://a\r\nSec-WebSocket-Key: k\r\n\r\n"
    )


def test_head_for_picows_leaves_refusals_to_picows() -> None:
    """Malformed lines, a Connection without upgrade and a body stay, for picows to refuse as before."""
    head = b"GET / HTTP/1.1\r\nNo colon\r\n folded: x\r\nBad name: y\r\nConnection: close\r\nContent-Length: 5\r\n\r\n"
    assert head_for_picows(head) == head

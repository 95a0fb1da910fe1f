"""picows' server side, loaded without its client side: a work-around.

What it works around: picows 2.3.x's package `__init__` also imports its
client (`picows.api`: proxies through python_socks, aiofastnet, TLS helpers),
about 50 ms of every cold start, for code a server never calls.

How: a bare entry for the package (its `__init__` not run) stands in
`sys.modules` while the two modules the server needs are imported, and is
removed again at once. They stay loaded as `picows.common` and
`picows.picows`; a later `import picows` anywhere in the process runs the
real `__init__`, which finds them there, so picows stays whole for everyone
else (a test pins that `from picows import ws_connect` still works).

To remove it: once picows imports its client lazily, import these names
from `picows` directly (pyproject.toml pins picows to 2.3.x for this).

Two more, for the request head picows is given (`head_for_picows`, `feed`):
picows 2.3.x drops a connection whose head is 16 KiB or more without a
reply, and its first read buffer takes 1,792 bytes; and it wants
`Connection: Upgrade` exactly, where RFC 6455 (4.2.1) and RFC 9110 (7.6.1)
allow a token list (`keep-alive, Upgrade`, sent by older Firefox and some
proxies). So it gets only the lines it and handshake.py read, those two
headers normalised, and the bytes fed as its buffer grows. To remove them:
once picows takes a head limit and checks tokens, give it the head as is.
"""

from __future__ import annotations

import importlib.util
import re
import sys

_spec = importlib.util.find_spec("picows")
_bare = _spec is not None and "picows" not in sys.modules
if _bare:
    assert _spec is not None
    sys.modules["picows"] = importlib.util.module_from_spec(_spec)
try:
    from picows.common import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener
    from picows.picows import (  # type: ignore[attr-defined]  # WSProtocol is not in picows' stubs
        WSAutoPingStrategy,
        WSCloseCode,
        WSFrame,
        WSListener,
        WSMsgType,
        WSProtocol,
        WSTransport,
    )
finally:
    if _bare:
        del sys.modules["picows"]

# picows closes, without a word, a connection whose request head is this long.
PICOWS_HEAD_LIMIT = 16 * 1024
# The header lines picows or handshake.py read; the rest (cookies, user agents) stay behind.
NEEDED = {
    b"host",
    b"upgrade",
    b"connection",
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-protocol",
    b"origin",
    b"authorization",
    b"content-length",  # picows refuses a body; let it see one
    b"transfer-encoding",
}
# Where the header's list holds the token, picows is given this line instead.
NORMALISED = {b"connection": (b"upgrade", b"Connection: Upgrade"), b"upgrade": (b"websocket", b"Upgrade: websocket")}
TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110, 5.1)


def head_for_picows(head: bytes) -> bytes:
    """The request head (up to its blank line) as picows can take it (see above)."""
    request_line, *lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    fields = [line.partition(b":") for line in lines]
    named = [(name.lower(), value) for name, colon, value in fields if colon]
    replaced = {
        key: line
        for key, (token, line) in NORMALISED.items()
        if any(name == key and token in tokens(value) for name, value in named)
    }
    kept = [request_line, *replaced.values()]
    for line, (name, colon, _) in zip(lines, fields, strict=True):
        if not colon or not TOKEN.fullmatch(name):
            kept.append(line)  # malformed: picows refuses it (400), as it would have
        elif name.lower() in NEEDED and name.lower() not in replaced:
            kept.append(line)
    return b"\r\n".join(kept) + b"\r\n\r\n"


def tokens(value: bytes) -> set[bytes]:
    """The elements of a comma-separated header value, lower-cased."""
    return {part.strip().lower() for part in value.split(b",")}


# picows hands the transport the header of a frame over this size as a view
# of a buffer it reuses for the next frame; when the socket is backed up and
# the transport must queue it, the next frame's header overwrites it and the
# stream is corrupt. Such frames are framed here, with a header of their own.
PICOWS_VIEW_SIZE = 8192


def send(transport: WSTransport, kind: WSMsgType, data: bytes) -> None:
    """transport.send, safe for frames over PICOWS_VIEW_SIZE (server side: no mask)."""
    size = len(data)
    if size <= PICOWS_VIEW_SIZE:
        transport.send(kind, data)
        return
    if transport.is_close_frame_sent or transport.is_disconnected:
        return  # as picows does
    first = 0x80 | kind.value  # FIN, and the opcode
    length = bytes((126,)) + size.to_bytes(2, "big") if size < 1 << 16 else bytes((127,)) + size.to_bytes(8, "big")
    transport.underlying_transport.writelines([bytes((first,)) + length, data])


def feed(ws: WSProtocol, data: bytes) -> None:
    """Give picows bytes read before it had the connection, however many: its
    buffer grows as it fills. Stops once picows is closing the connection
    (it would take the rest for a second handshake)."""
    view = memoryview(data)
    while view and not ws.transport.underlying_transport.is_closing():
        buffer = ws.get_buffer(-1)
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        ws.buffer_updated(size)
        view = view[size:]


__all__ = [
    "PICOWS_HEAD_LIMIT",
    "WSAutoPingStrategy",
    "WSCloseCode",
    "WSFrame",
    "WSListener",
    "WSMsgType",
    "WSProtocol",
    "WSTransport",
    "WSUpgradeRequest",
    "WSUpgradeResponse",
    "WSUpgradeResponseWithListener",
    "feed",
    "head_for_picows",
    "send",
]

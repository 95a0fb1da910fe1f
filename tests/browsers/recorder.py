"""A raw-socket stand-in for the server that keeps every WebSocket handshake head, byte for byte.

It serves the demo page it is given at `/` and accepts the WebSocket upgrade
at the page's path (101 with the right Sec-WebSocket-Accept, RFC 6455 4.2.2,
and the `actionloop` subprotocol when offered, as the server does), so the
page shows "connected" and the test knows the head it recorded is complete.
It sends no frames: it is there to see what browsers send, not to answer.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import threading
from typing import NamedTuple

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
MAX_HEAD = 64 * 1024


class Head(NamedTuple):
    raw: bytes

    @property
    def request_line(self) -> str:
        return self.raw.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def headers(self) -> list[tuple[str, str]]:
        """(name, value) in the order sent, names as the browser spelled them."""
        lines = self.raw.decode("latin-1").split("\r\n")[1:]
        return [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines if line)]

    def get(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key.lower() == name.lower()]
        return ", ".join(values) if values else None


def accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


class Recorder:
    """Listens on a free loopback port until stop(); `upgrades` holds the handshake heads in order."""

    def __init__(self, page: bytes, ws_path: str) -> None:
        self.page = page
        self.ws_path = ws_path
        self.upgrades: list[Head] = []
        self.stopping = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.2)
            head = self._read_head(conn)
            if head is None:
                return
            target = head.request_line.split(" ")[1] if " " in head.request_line else ""
            path = target.split("?", 1)[0]
            if path == self.ws_path and head.get("Sec-WebSocket-Key"):
                self.upgrades.append(head)
                self._upgrade(conn, head)
            elif path == "/":
                conn.sendall(self._response("200 OK", "text/html; charset=utf-8", self.page))
            else:
                conn.sendall(self._response("404 Not Found", "text/plain", b"not here\n"))

    def _read_head(self, conn: socket.socket) -> Head | None:
        data = b""
        while b"\r\n\r\n" not in data and len(data) < MAX_HEAD and not self.stopping.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return None
            data += chunk
        end = data.find(b"\r\n\r\n")
        return Head(data[:end]) if end >= 0 else None

    def _upgrade(self, conn: socket.socket, head: Head) -> None:
        offered = [p.strip() for p in (head.get("Sec-WebSocket-Protocol") or "").split(",")]
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept(head.get('Sec-WebSocket-Key') or '')}",
            *(["Sec-WebSocket-Protocol: actionloop"] if "actionloop" in offered else []),
        ]
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while not self.stopping.is_set():  # hold it open until the page goes away
            try:
                if not conn.recv(65536):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    @staticmethod
    def _response(status: str, kind: str, body: bytes) -> bytes:
        head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        return head.encode() + body

    def stop(self) -> None:
        self.stopping.set()
        self.threads[0].join(5)  # no new connection threads after this
        for thread in self.threads[1:]:
            thread.join(5)
        self.listener.close()

"""Push from inside an action: the management API in a few calls.

This file runs INSIDE the action process, like the launcher: standard
library only. A copy sits in every prepared Python action folder as
`actionloop_api.py`, so an action can write:

    import actionloop_api
    actionloop_api.send(os.environ["__OW_CONNECTION_ID"], {"hello": "you"})
    actionloop_api.publish("news", {"headline": "..."})

It reads `__OW_API_URL` and `__OW_API_TOKEN`, which the runtime gives every
action when OW_API_TOKEN is set. Any thread may call it at any time (a
background thread of a long-lived action, for instance); each call is one
HTTP request to this pod's runtime, which forwards to other replicas.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class APIError(Exception):
    """The management API refused or failed (its status and message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def call(method: str, path: str, value: Any = None, timeout: float = 10.0) -> Any:
    """One request; the JSON answer, None for 410 (gone); APIError otherwise (status 0: no answer)."""
    url = os.environ.get("__OW_API_URL")
    token = os.environ.get("__OW_API_TOKEN", "")
    if not url:
        raise APIError(0, "no management API: the runtime runs without OW_API_TOKEN")
    data = None if value is None and method != "POST" else json.dumps(value).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + token)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 410:
            return None
        try:
            message = json.loads(exc.read()).get("error", "")
        except ValueError:
            message = exc.reason
        raise APIError(exc.code, message) from exc
    except OSError as exc:  # refused, reset, timed out: no answer at all (a pod shutting down)
        raise APIError(0, f"the management API at {url} cannot be reached: {exc}") from exc


def _part(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def send(connection: str, value: Any) -> bool:
    """Send `value` (JSON) to a connection, on whichever replica it is; False if it is gone."""
    return call("POST", "/connections/" + _part(connection), value) is not None


def describe(connection: str) -> dict[str, Any] | None:
    """The connection's replica, times and channels; None if it is gone."""
    found: dict[str, Any] | None = call("GET", "/connections/" + _part(connection))
    return found


def close(connection: str) -> bool:
    return call("DELETE", "/connections/" + _part(connection)) is not None


def subscribe(connection: str, channel: str) -> bool:
    return call("PUT", f"/connections/{_part(connection)}/channels/{_part(channel)}") is not None


def unsubscribe(connection: str, channel: str) -> bool:
    return call("DELETE", f"/connections/{_part(connection)}/channels/{_part(channel)}") is not None


def publish(channel: str, value: Any) -> None:
    """Send `value` to every subscriber of `channel` on every replica, once each."""
    call("POST", "/channels/" + _part(channel), value)


def broadcast(value: Any) -> None:
    """Send `value` to every connection on every replica."""
    call("POST", "/broadcast", value)

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
"""

from __future__ import annotations

import importlib.util
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

__all__ = [
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
]

"""The picows work-around (picows_server.py) leaves picows whole."""

from __future__ import annotations

import subprocess
import sys

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

"""Run a Python OpenWhisk action in the ActionLoop protocol.

This file runs INSIDE the action process, in the user's Python environment
(perhaps a virtualenv from the action's zip), so it imports nothing beyond the
standard library and nothing from the actionloop package. A copy of it sits in
every prepared action folder beside `__main__.py`.

The loop (contract part A, "The ActionLoop program side"): import the action,
write `{"ok": true}` on fd 3, then for each JSON line on stdin call the entry
point with its `value` and write the result as one JSON line on fd 3. Every
other key of the line reaches the action as `__OW_<KEY>` in its environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import site
import sys

# Every import here delays the action's start-up (the ack), so types are for
# checkers only, and glob and traceback are imported where they are needed.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, BinaryIO

    Entry = Callable[[Any], Any]

# Keys whose value is new for (nearly) every activation. glibc's setenv keeps
# every distinct string it is ever given, so handing these to the C
# environment would grow a long-lived process by about 100 bytes a message.
# They go into os.environ's mapping only: os.environ and os.getenv see them,
# a subprocess started without env= does not. Other keys (api host, key,
# namespace...) reach the C environment too, and only when they change.
PER_ACTIVATION = frozenset(("__OW_ACTIVATION_ID", "__OW_DEADLINE", "__OW_TRANSACTION_ID", "__OW_CONNECTION_ID"))


def activate_virtualenv(folder: str) -> None:
    """Put a bundled `virtualenv/` first on the import path, if there is one."""
    venv = os.path.join(folder, "virtualenv")
    if not os.path.isdir(venv):
        return
    script = os.path.join(venv, "bin", "activate_this.py")
    if os.path.isfile(script):
        with open(script) as file:
            # The virtualenv's own activation script, shipped in the action's zip.
            exec(compile(file.read(), script, "exec"), {"__file__": script})
        return
    import glob

    before = list(sys.path)
    for packages in sorted(glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))):
        site.addsitedir(packages)
    added = [path for path in sys.path if path not in before]
    sys.path[:] = added + before


def load(folder: str, name: str) -> Entry:
    """Import `__main__.py` as module `main__` and return its entry point."""
    path = os.path.join(folder, "__main__.py")
    spec = importlib.util.spec_from_file_location("main__", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["main__"] = module
    spec.loader.exec_module(module)
    entry: Entry | None = getattr(module, name, None)
    if not callable(entry):
        raise AttributeError(f"the action has no function named {name!r} in __main__.py")
    return entry


# Made once: json.dumps with options builds a new encoder on every call.
ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False)


def env_text(value: Any) -> str:
    """Activation keys become environment strings (non-strings as JSON)."""
    return value if isinstance(value, str) else json.dumps(value)


def encode(result: Any) -> bytes:
    """The result line; a value JSON cannot hold becomes an error result."""
    try:
        text = ENCODER.encode(result)
    except (TypeError, ValueError) as exc:
        text = json.dumps({"error": f"The action returned a value that is not JSON: {exc}"})
    return text.encode("utf-8", errors="surrogateescape") + b"\n"


def set_env(key: str, value: str, environ: Any = os.environ) -> None:
    """os.environ[key] = value, without feeding setenv a new string every activation."""
    if key in PER_ACTIVATION:
        environ._data[environ.encodekey(key)] = environ.encodevalue(value)  # private, see PER_ACTIVATION
    elif environ.get(key) != value:
        environ[key] = value


def unset_env(key: str, environ: Any = os.environ) -> None:
    """Back to what the process started with: the server's own __OW_ value, or nothing."""
    if key in STARTED_WITH:
        set_env(key, STARTED_WITH[key], environ)
    elif key in PER_ACTIVATION:
        environ._data.pop(environ.encodekey(key), None)  # private, see PER_ACTIVATION
    else:
        environ.pop(key, None)


# The __OW_ variables the server gave the process itself (contract part A).
STARTED_WITH = {key: value for key, value in os.environ.items() if key.startswith("__OW_")}


def set_keys(request: dict[str, Any], previous: dict[str, Any]) -> None:
    """Every key of the activation as `__OW_<KEY>`; the keys of the one before
    that this one lacks are taken away, so none outlives its activation (an
    `api_key` given to /run must not reach later WebSocket activations)."""
    for key, value in request.items():
        set_env("__OW_" + key.upper(), value if isinstance(value, str) else env_text(value))
    for key in previous:
        if key not in request:
            unset_env("__OW_" + key.upper())


def activate(entry: Entry, line: bytes, previous: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """Run one activation line through the entry point: the result line, and
    the activation's keys (the `previous` of the next)."""
    request = json.loads(line.decode("utf-8", errors="surrogateescape"))
    args = request.pop("value", {})
    set_keys(request, previous)
    try:
        result = entry(args)
    except Exception as exc:  # noqa: BLE001 - any action error becomes a result
        import traceback

        traceback.print_exc()
        result = {"error": str(exc)}
    return encode(result), request


def serve(entry: Entry, requests: BinaryIO, results: int, key: bytes = b"") -> None:
    """Answer every stdin line with one result line (fd `results`), until stdin closes.

    With a `key` (from the server, see actionloop's core.py) each line starts
    with its number, `17 {...}`, and the result goes back as `KEY 17 {...}`:
    the server delivers no line it cannot pair with the activation it sent.
    """
    stdout, stderr, write = sys.stdout, sys.stderr, os.write
    tag, tag_start = b"", key + b" "
    keys: dict[str, Any] = {}
    for received in requests:
        line = received
        if key:
            number = received.find(b" ") + 1
            tag, line = tag_start + received[:number], received[number:]
        answer, keys = activate(entry, line, keys)
        result = tag + answer
        # Logs first, then the result: the server writes the end-of-activation
        # sentinel as soon as it reads the result.
        stdout.flush()
        stderr.flush()
        while result:
            result = result[write(results, result) :]


def main(name: str = "main") -> None:
    """Entry of the `exec` stub that prepare writes into the action folder."""
    # The key is this process's alone: the action and its children never see it.
    key = os.environ.pop("ACTIONLOOP_RESULT_KEY", "").encode()
    folder = os.path.dirname(os.path.abspath(sys.argv[0]))
    activate_virtualenv(folder)
    entry = load(folder, name)
    # Acknowledge only after the import, so import errors fail /init.
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(3, b'{"ok": true}\n')
    serve(entry, sys.stdin.buffer, 3, key)

"""The ActionLoop line protocol, with no I/O.

An action process reads one JSON line per activation on stdin and writes one
JSON line per activation on fd 3 (contract part A, "The ActionLoop program
side"). This module builds the stdin lines and checks the fd 3 lines; the
process layer moves the bytes.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

# OpenWhisk's log collector splits activations on this line (contract part A).
SENTINEL = b"XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX\n"

JSON_ERRORS = (ValueError, TypeError, RecursionError)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# 19 digits in a row may be an integer past 64 bits, which orjson would turn
# into a float (or refuse); the standard parser keeps it exact.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_LONG_DIGITS_TEXT = re.compile(r"[0-9]{19}")


def loads(data: bytes | str) -> Any:
    """Parse strict JSON; integers beyond 64 bits stay exact integers."""
    # WebSocket text arrives as str: scan it as it is, no copy on the hot path.
    long_digits = _LONG_DIGITS_TEXT if isinstance(data, str) else _LONG_DIGITS
    if not long_digits.search(data):  # type: ignore[arg-type]
        return orjson.loads(data)
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def dumps(value: Any) -> bytes:
    """Encode compact JSON with raw UTF-8; never emits a newline."""
    try:
        return orjson.dumps(value)
    except TypeError:
        # Integers past 64 bits again: only the standard encoder writes them.
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return text.encode()


def error(message: str) -> bytes:
    """The `{"error": ...}` body every failure reply uses."""
    return orjson.dumps({"error": message})


OK = b'{"ok":true}'


def run_line(body: dict[str, Any]) -> bytes:
    """The stdin line for one activation: the parsed body, encoded anew.

    Encoding the parsed value (rather than splicing request text into a
    template, as the reference does) means no input can add or override keys.
    """
    return dumps(body) + b"\n"


def message_body(value: Any, meta: dict[str, str]) -> dict[str, Any]:
    """The activation body for one WebSocket message (contract part B and C)."""
    body: dict[str, Any] = dict(meta)
    body["value"] = value
    return body


def check_result(line: bytes) -> bytes:
    """Return the result without its newline, if it is a JSON object or array."""
    result = line.strip()
    if result[:1] not in (b"{", b"["):
        raise ValueError("not a JSON object or array")
    loads(result)
    return result


def is_ack(line: bytes) -> bool:
    """True when the first fd 3 line is the `{"ok": true}` acknowledgement."""
    try:
        value = loads(line)
    except JSON_ERRORS:
        return False
    return isinstance(value, dict) and value.get("ok") is True


def env_value(value: Any) -> str:
    """Export rule for init `env` values (OpenWhisk's testEnvPartition)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return dumps(value).decode()


def init_env(env: dict[str, Any]) -> dict[str, str]:
    """All init `env` entries as strings for the action's environment."""
    return {str(key): env_value(value) for key, value in env.items()}

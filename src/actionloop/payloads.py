"""/init and /run bodies to typed values, with the reference's statuses.

Statuses and messages follow contract part A (the table under POST /init).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from . import protocol
from .errors import Forbidden, RequestError

NO_CODE = "Missing main/no code to execute."
ALREADY_INITIALISED = "Cannot initialize the action more than once."


@dataclass(frozen=True)
class InitRequest:
    """What /init asks for: the code as bytes, its entry point, its env."""

    code: bytes
    binary: bool = False
    main: str = "main"
    env: dict[str, str] = field(default_factory=dict)


def _parse_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = protocol.loads(body)
    except protocol.JSON_ERRORS as exc:
        raise RequestError(f"The {what} request could not be parsed as JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise RequestError(f"The {what} request is not a JSON object.")
    return value


def parse_init(body: bytes) -> InitRequest:
    """Parse an /init body; raise RequestError with the reference's status."""
    value = _parse_object(body, "init").get("value") or {}
    if not isinstance(value, dict):
        raise RequestError("The init request's value is not a JSON object.")
    code = value.get("code") or ""
    if not isinstance(code, str) or not code:
        raise Forbidden(NO_CODE)
    binary = value.get("binary") is True
    env = value.get("env") or {}
    if not isinstance(env, dict):
        raise RequestError("The init request's env is not a JSON object.")
    main = value.get("main") or "main"
    if not isinstance(main, str):
        raise RequestError("The init request's main is not a string.")
    return InitRequest(decode_code(code, binary), binary, main, protocol.init_env(env))


def decode_code(code: str, binary: bool) -> bytes:
    """The code's bytes: base64-decoded when `binary` is set."""
    if not binary:
        return code.encode()
    try:
        # Line breaks are allowed, as Go's decoder (the reference) allows them.
        return base64.b64decode("".join(code.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"cannot decode the request: {exc}") from exc


def parse_run(body: bytes) -> dict[str, Any]:
    """Parse a /run body: a JSON object whose `value` is the argument."""
    return _parse_object(body, "run")

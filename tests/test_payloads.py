"""/init and /run bodies: statuses and messages of the reference."""

from __future__ import annotations

import base64
import json

import pytest

from actionloop.errors import RequestError
from actionloop.payloads import parse_init, parse_run


def body(value: object) -> bytes:
    return json.dumps({"value": value}).encode()


def test_defaults() -> None:
    """main defaults to main; code arrives as bytes; env as strings."""
    request = parse_init(body({"code": "def main(a): return a", "env": {"N": 3}}))
    assert request.main == "main" and request.code == b"def main(a): return a"
    assert request.binary is False and request.env == {"N": "3"}


def test_binary_is_decoded_even_with_line_breaks() -> None:
    """base64 wrapped at 76 columns decodes, as Go's decoder allows."""
    raw = bytes(range(256)) * 4
    wrapped = base64.encodebytes(raw).decode()
    assert "\n" in wrapped
    assert parse_init(body({"code": wrapped, "binary": True})).code == raw


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"not json", 400, "could not be parsed"),
        (b"[1]", 400, "not a JSON object"),
        (body({}), 403, "Missing main/no code to execute."),
        (body({"code": ""}), 403, "Missing main/no code to execute."),
        (body({"code": "!!!", "binary": True}), 400, "cannot decode"),
        (body({"code": "x", "env": [1]}), 400, "env"),
    ],
)
def test_refusals(data: bytes, status: int, words: str) -> None:
    """Each bad /init body gets the reference's status and a clear message."""
    with pytest.raises(RequestError) as caught:
        parse_init(data)
    assert caught.value.status == status and words in caught.value.message


def test_run_body_must_be_an_object() -> None:
    """A /run body is a JSON object."""
    assert parse_run(b'{"value": [1]}') == {"value": [1]}
    with pytest.raises(RequestError):
        parse_run(b"[]")

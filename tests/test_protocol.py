"""The ActionLoop line protocol, with no process at all."""

from __future__ import annotations

import json

import pytest

from actionloop import protocol


def test_run_line_is_one_line_of_the_parsed_body() -> None:
    """Newlines inside values are escaped: the line has exactly one, at the end."""
    body = {"value": {"text": "a\nb", "snow": "❄"}, "activation_id": "x"}
    line = protocol.run_line(body)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == body
    assert "❄".encode() in line


def test_message_body_keeps_metadata_out_of_reach() -> None:
    """A message's value cannot override the metadata keys around it."""
    value = {"activation_id": "forged", "x": '"}, "action_name": "evil'}
    body = json.loads(protocol.run_line(protocol.message_body(value, {"activation_id": "real"})))
    assert body == {"activation_id": "real", "value": value}


def test_big_integers_survive() -> None:
    """Integers past 64 bits are parsed and encoded, not refused."""
    value = protocol.loads(b'{"n": 123456789012345678901234567890}')
    assert value == {"n": 123456789012345678901234567890}
    assert protocol.dumps(value) == b'{"n":123456789012345678901234567890}'


@pytest.mark.parametrize("text", [b"{", b"NaN", b'{"a": Infinity}', b"", b"\xff", b"[" * 100000])
def test_loads_rejects_invalid_json(text: bytes) -> None:
    """Invalid JSON, non-standard constants and absurd nesting are ValueErrors."""
    with pytest.raises(ValueError):
        protocol.loads(text)


@pytest.mark.parametrize("line", [b'{"a": 1}\n', b"[1, 2]\n", b'  {"a": "\xe2\x9d\x84"}\r\n'])
def test_check_result_accepts_objects_and_arrays(line: bytes) -> None:
    """Objects and arrays pass, stripped of their line ending."""
    assert protocol.check_result(line) == line.strip()


@pytest.mark.parametrize("line", [b'"text"\n', b"42\n", b"null\n", b"{broken\n", b"\n"])
def test_check_result_refuses_the_rest(line: bytes) -> None:
    """Strings, numbers, null and broken JSON are not results."""
    with pytest.raises(ValueError):
        protocol.check_result(line)


def test_ack() -> None:
    """Only {"ok": true} acknowledges."""
    assert protocol.is_ack(b'{"ok": true}\n')
    assert not protocol.is_ack(b'{"ok": false}\n')
    assert not protocol.is_ack(b"ok\n")


def test_init_env_rules() -> None:
    """Strings as-is, numbers and booleans as JSON text, null empty, rest JSON."""
    env = {"S": "xyz", "N": 3, "F": 1.5, "B": True, "Z": None, "A": ["a", "b"], "O": {"a": "A"}}
    assert protocol.init_env(env) == {
        "S": "xyz",
        "N": "3",
        "F": "1.5",
        "B": "true",
        "Z": "",
        "A": '["a","b"]',
        "O": '{"a":"A"}',
    }


def test_error_body() -> None:
    """Every failure reply is {"error": message}."""
    assert json.loads(protocol.error("bad ❄")) == {"error": "bad ❄"}

"""The line protocol core, driven with plain calls: no process, no event loop."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actionloop.core import DEPTH, NOT_STARTED, LineProtocol, Phase
from actionloop.errors import ActionExited, ActionTimeout, BadResult, Desync, ResultTooLarge

KEY = b"k3y"


def running(key: bytes = KEY, max_result: int = 1000, ack: bool = True) -> LineProtocol[str]:
    core: LineProtocol[str] = LineProtocol(max_result, ack, key)
    if ack:
        assert core.receive_data(b'{"ok": true}\n') == []
    else:
        core.running()
    assert core.phase is Phase.RUNNING
    return core


def answer(core: LineProtocol[str], sent: tuple[bytes, ...], result: bytes) -> bytes:
    """What our launcher writes for the line `sent`: KEY, its number, the result."""
    number = sent[0].partition(b" ")[0] + b" " if core.key else b""
    return (core.key + b" " + number if core.key else b"") + result + b"\n"


def test_ack_then_results_pair_in_order() -> None:
    """After the ack, each tagged result goes to the activation it was sent for, in order."""
    core = running()
    sent = [core.send(b'{"value":%d}\n' % n, f"caller{n}") for n in range(3)]
    assert sent[0] == (b'1 {"value":0}\n',)
    data = b"".join(answer(core, s, b'{"n":%d}' % n) for n, s in enumerate(sent))
    assert core.receive_data(data) == [(f"caller{n}", b'{"n":%d}' % n) for n in range(3)]
    assert not core.in_flight


def test_lines_split_anywhere_are_joined() -> None:
    """A result line may arrive in pieces of any size."""
    core = running()
    sent = core.send(b"{}\n", "a")
    line = answer(core, sent, b'{"long":"' + b"x" * 50 + b'"}')
    outcomes = []
    for i in range(len(line)):
        outcomes += core.receive_data(line[i : i + 1])
    assert outcomes == [("a", line.split(b" ", 2)[2].rstrip(b"\n"))]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_any_chunking_gives_the_same_pairing(cuts: list[int]) -> None:
    """However the pipe cuts the bytes, every caller gets its own result."""
    core = running()
    sent = [core.send(b"{}\n", f"c{n}") for n in range(DEPTH)]
    data = b"".join(answer(core, s, b'{"n":%d}' % n) for n, s in enumerate(sent))
    outcomes, at = [], 0
    for cut in cuts * 20:
        outcomes += core.receive_data(data[at : at + cut])
        at += cut
        if at >= len(data):
            break
    outcomes += core.receive_data(data[at:])
    assert outcomes == [(f"c{n}", b'{"n":%d}' % n) for n in range(DEPTH)]


def test_depth_is_bounded() -> None:
    """At most DEPTH lines are in flight; the next send is refused until a result comes."""
    core = running()
    sent = [core.send(b"{}\n", str(n)) for n in range(DEPTH)]
    assert not core.room
    with pytest.raises(RuntimeError):
        core.send(b"{}\n", "one too many")
    core.receive_data(answer(core, sent[0], b"{}"))
    assert core.room


def test_stray_line_in_flight_fails_everyone_in_flight() -> None:
    """An untagged line while tagged results are awaited is stray: all in flight get Desync, none a result."""
    core = running()
    sent = [core.send(b"{}\n", f"c{n}") for n in range(4)]
    first = answer(core, sent[0], b'{"n":0}')
    outcomes = core.receive_data(first + b'{"debug": "oops"}\n' + answer(core, sent[1], b'{"n":1}'))
    assert outcomes[0] == ("c0", b'{"n":0}')
    assert [c for c, _ in outcomes[1:]] == ["c1", "c2", "c3"]
    assert all(isinstance(o, Desync) for _, o in outcomes[1:])
    assert core.phase is Phase.BROKEN and core.fault is not None and "oops" in core.fault
    assert core.receive_data(answer(core, sent[2], b"{}")) == []  # nothing it says counts any more
    assert not core.room


def test_result_with_the_wrong_number_is_stray() -> None:
    """A correctly keyed line for another activation (a forked child, a repeat) is never delivered."""
    core = running()
    sent = [core.send(b"{}\n", f"c{n}") for n in range(2)]
    outcomes = core.receive_data(answer(core, sent[1], b'{"n":1}'))
    assert [(c, type(o)) for c, o in outcomes] == [("c0", Desync), ("c1", Desync)]


def test_forged_key_is_stray() -> None:
    """A line that guesses the number but not this process's key is stray."""
    core = running()
    core.send(b"{}\n", "c0")
    outcomes = core.receive_data(b'other 1 {"n":0}\n')
    assert [(c, type(o)) for c, o in outcomes] == [("c0", Desync)]


def test_line_with_nothing_in_flight_is_stray_untagged_too() -> None:
    """A generic program's line with no activation in flight breaks the protocol."""
    core = running(key=b"")
    assert core.receive_data(b'{"hello": 1}\n') == []
    assert core.phase is Phase.BROKEN and "hello" in (core.fault or "")


def test_untagged_pairs_by_position_one_at_a_time() -> None:
    """Without a key, one line is in flight at a time and its result is the next line (the generic contract)."""
    core = running(key=b"", ack=False)
    assert core.send(b"{}\n", "a") == (b"{}\n",)
    assert not core.room
    assert core.receive_data(b'{"r":1}\n') == [("a", b'{"r":1}')]
    core.send(b"{}\n", "b")
    assert core.receive_data(b'{"r":2}\n') == [("b", b'{"r":2}')]


def test_untagged_line_after_its_result_is_caught() -> None:
    """A generic program's extra line written with its result finds nothing in flight: stray, not the next reply."""
    core = running(key=b"", ack=False)
    core.send(b"{}\n", "a")
    outcomes = core.receive_data(b'{"r":1}\n{"debug":"extra"}\n')
    assert outcomes == [("a", b'{"r":1}')]
    assert core.phase is Phase.BROKEN and "extra" in (core.fault or "")


def test_bad_result_keeps_pairing() -> None:
    """A result that is not a JSON object or array fails its activation only."""
    core = running()
    sent = [core.send(b"{}\n", f"c{n}") for n in range(2)]
    outcomes = core.receive_data(answer(core, sent[0], b"not json") + answer(core, sent[1], b"[1]"))
    assert type(outcomes[0][1]) is BadResult
    assert outcomes[1] == ("c1", b"[1]")


def test_result_over_the_limit_fails_and_is_skipped() -> None:
    """A complete line over OW_MAX_RESULT fails its activation; the next result still pairs."""
    core = running(max_result=100)
    sent = [core.send(b"{}\n", f"c{n}") for n in range(2)]
    big = answer(core, sent[0], json.dumps({"x": "y" * 5000}).encode())
    outcomes = core.receive_data(big + answer(core, sent[1], b'{"ok":1}'))
    assert type(outcomes[0][1]) is ResultTooLarge and "100 bytes" in outcomes[0][1].message
    assert outcomes[1] == ("c1", b'{"ok":1}')


def test_result_over_the_limit_in_pieces_is_not_held() -> None:
    """An over-long line arriving in pieces fails at once and is dropped up to its newline."""
    core = running(max_result=100)
    sent = [core.send(b"{}\n", f"c{n}") for n in range(2)]
    outcomes = core.receive_data(answer(core, sent[0], b"")[:-1] + b'{"x":"')
    for _ in range(100):
        outcomes += core.receive_data(b"y" * 1000)
    assert [(c, type(o)) for c, o in outcomes] == [("c0", ResultTooLarge)]
    assert len(core._buffer) == 0
    outcomes = core.receive_data(b'"}\n' + answer(core, sent[1], b"[2]"))
    assert outcomes == [("c1", b"[2]")]


def test_result_exactly_at_the_limit_passes() -> None:
    """OW_MAX_RESULT bytes of result are allowed; one more is not."""
    core = running(max_result=10)
    sent = [core.send(b"{}\n", f"c{n}") for n in range(2)]
    outcomes = core.receive_data(answer(core, sent[0], b'["123456"]') + answer(core, sent[1], b'["1234567"]'))
    assert outcomes[0] == ("c0", b'["123456"]')
    assert type(outcomes[1][1]) is ResultTooLarge


def test_eof_fails_the_one_begun_and_hands_back_the_rest() -> None:
    """The process ended: the activation begun gets the error; the waiting ones NOT_STARTED, last first."""
    core = running()
    for n in range(4):
        core.send(b"{}\n", f"c{n}")
    error = ActionExited()
    assert core.receive_eof(error) == [("c0", error), ("c3", NOT_STARTED), ("c2", NOT_STARTED), ("c1", NOT_STARTED)]
    assert core.receive_eof(ActionTimeout("late")) == []
    assert core.phase is Phase.ENDED and not core.room


def test_start_up_rules() -> None:
    """The first line must be the ack; without ack mode, any line before an activation is stray."""
    core: LineProtocol[str] = LineProtocol(1000, True)
    core.receive_data(b'{"hello": 1}\n')
    assert core.phase is Phase.BROKEN and "not an ack" in (core.fault or "")
    core = LineProtocol(1000, False)
    core.receive_data(b"banner\n")
    assert core.phase is Phase.BROKEN and "before any activation" in (core.fault or "")
    core = LineProtocol(10, True)
    core.receive_data(b"x" * 200)
    assert core.phase is Phase.BROKEN and "over-long" in (core.fault or "")
    core = LineProtocol(1000, True)
    assert core.receive_eof(ActionExited()) == [] and core.phase is Phase.ENDED

"""The conversation with one action process, with no I/O.

Bytes the action writes on fd 3 go in (`receive_data`, `receive_eof`); the
bytes to write to its stdin and the outcome of each activation come out. No
OS call, no event loop, no clock: process.py spawns, writes, reaps and
times, and drives this class; a test drives it with plain calls.

Life of the conversation, one table (the only transitions there are):

    STARTING -> RUNNING   the ack arrived (or, without ack, `running()`)
    STARTING -> BROKEN    the first line is not an ack, or too long
    RUNNING  -> BROKEN    a line that is not the result it would be paired with
    any      -> ENDED     fd 3 closed (the process is gone)

Which result belongs to whom (contract part C: replies never cross). The
action takes its stdin lines one at a time and answers each with one line on
fd 3, so results come back in the order the lines went out; up to DEPTH
lines may be in flight. What makes a line the result of the activation it
is paired with depends on the program:

- Our launcher (`tagged`): each line sent starts with its number, `17 {...}`,
  and the launcher writes its result as `KEY 17 {...}`, KEY being a secret
  that this one process got at spawn. A line without the right key and
  number is stray, wherever it comes from: a debug write on fd 3, a forked
  child, an action echoing its input.
- A generic ActionLoop program: results are paired by position only. A line
  that arrives with nothing in flight is stray; a stray line while
  activations are in flight cannot be told from a result.

A stray line is never delivered: every activation in flight fails with
Desync (the action may have begun any of them, so none is sent again), the
conversation is BROKEN, and `fault` tells the process layer to kill the
process and log why. A result longer than the limit fails its activation with
ResultTooLarge and is skipped up to its newline; pairing goes on.

When fd 3 closes, the activation the action worked on gets the error the
process layer names (it exited, or was killed for a timeout); those still
waiting in its stdin were never begun and come out as NOT_STARTED, for the
caller to send again.
"""

from __future__ import annotations

import collections
import enum
from typing import Generic, TypeVar

from . import protocol
from .errors import ActionLoopError, BadResult, Desync, ResultTooLarge

# Lines in flight at once: the one the action works on and those already
# waiting in its stdin, so it goes on without sleeping (see process.py).
DEPTH = 8
# Bytes a tag may add to a result line: a 16-digit key, a number, two spaces.
TAG_ROOM = 64

Caller = TypeVar("Caller")


class NotStarted:
    """The outcome of an activation the action never began: send it again."""

    def __repr__(self) -> str:
        return "NOT_STARTED"


NOT_STARTED = NotStarted()
Outcome = bytes | ActionLoopError | NotStarted


def _outcome(result: bytes) -> bytes | BadResult:
    try:
        return protocol.check_result(result)
    except protocol.JSON_ERRORS:
        return BadResult()


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BROKEN = "broken"
    ENDED = "ended"


TRANSITIONS = {
    Phase.STARTING: {Phase.RUNNING, Phase.BROKEN, Phase.ENDED},
    Phase.RUNNING: {Phase.BROKEN, Phase.ENDED},
    Phase.BROKEN: {Phase.ENDED},
    Phase.ENDED: set(),
}


class LineProtocol(Generic[Caller]):
    """Pairs the lines an action writes on fd 3 with the activations sent to it.

    `key` (ASCII, no spaces) turns tagging on: give it to our launcher
    only, as ACTIONLOOP_RESULT_KEY in its environment.
    """

    def __init__(self, max_result: int, ack: bool, key: bytes = b"", depth: int = DEPTH) -> None:
        self.max_result = max_result
        self.ack = ack
        self.key = key
        self._tag_start = key + b" "
        # Untagged, one line at a time: a stray line written with a result then
        # arrives with nothing in flight and is caught, instead of shifting
        # every reply pipelined behind it onto the next caller.
        self.depth = depth if key else 1
        self.phase = Phase.STARTING
        self.fault: str | None = None  # why the process must be killed, once BROKEN
        self.in_flight: collections.deque[tuple[Caller, bytes]] = collections.deque()  # (caller, tag)
        self._sent = 0
        self._buffer = b""
        self._skipping = False  # inside an over-long line, up to its newline

    def _become(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"conversation cannot go from {self.phase} to {phase}")
        self.phase = phase

    @property
    def room(self) -> bool:
        """Whether another activation line may be sent now."""
        return self.phase is Phase.RUNNING and len(self.in_flight) < self.depth

    def running(self) -> None:
        """No ack is expected and the process is up (it survived its first moments)."""
        if self.phase is Phase.STARTING:
            self._become(Phase.RUNNING)

    def send(self, line: bytes, caller: Caller) -> tuple[bytes, ...]:
        """Pair `caller` with the activation `line`; return the bytes to write to stdin.

        Only while `room` says so (the process layer asks first).
        """
        if len(self.in_flight) >= self.depth or self.phase is not Phase.RUNNING:
            raise RuntimeError("no room for another activation line")
        if not self.key:
            self.in_flight.append((caller, b""))
            return (line,)
        self._sent += 1
        number = b"%d " % self._sent
        self.in_flight.append((caller, self._tag_start + number))
        # One buffer, not two: a pipe write of two pieces costs the waking
        # reader more than copying a line (measured: pool mode, C=1).
        return (number + line,)

    def receive_data(self, data: bytes) -> list[tuple[Caller, Outcome]]:
        """The action wrote `data` on fd 3: the activations this completes."""
        if self.phase is Phase.BROKEN or self.phase is Phase.ENDED:
            return []  # the process is being killed; nothing it says counts
        if not self._buffer and not self._skipping and data.endswith(b"\n") and data.count(b"\n") == 1:
            if self.in_flight and self.phase is Phase.RUNNING:  # the usual case: one result, awaited
                caller, tag = self.in_flight[0]
                if data.startswith(tag) and len(data) - len(tag) <= self.max_result + 1:
                    self.in_flight.popleft()
                    try:
                        return [(caller, protocol.check_result(data[len(tag) :] if tag else data))]
                    except protocol.JSON_ERRORS:
                        return [(caller, BadResult())]
            lines = [data]
        else:
            lines = self._split(data)
        outcomes: list[tuple[Caller, Outcome]] = []
        for line in lines:
            self._line(line, outcomes)
            if self.fault is not None:
                return outcomes
        if len(self._buffer) > self.max_result + TAG_ROOM:
            self._buffer = b""
            self._skipping = True
            self._too_large(outcomes)
        return outcomes

    def _split(self, data: bytes) -> list[bytes]:
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                return []
            self._skipping = False
            data = data[end + 1 :]
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        return [line + b"\n" for line in lines]

    def _line(self, line: bytes, outcomes: list[tuple[Caller, Outcome]]) -> None:
        if self.phase is Phase.STARTING:
            self._first_line(line)
            return
        if not self.in_flight:
            self._stray(line, outcomes)
            return
        caller, tag = self.in_flight[0]
        if not line.startswith(tag):
            self._stray(line, outcomes)
            return
        self.in_flight.popleft()
        result = line[len(tag) :]
        too_large = len(result) > self.max_result + 1
        outcomes.append((caller, ResultTooLarge(self.max_result) if too_large else _outcome(result)))

    def _first_line(self, line: bytes) -> None:
        if not self.ack:
            self._break(f"the action wrote on fd 3 before any activation: {line[:200]!r}")
        elif not protocol.is_ack(line):
            self._break(f"the action's first line on fd 3 is not an ack: {line[:200]!r}")
        else:
            self._become(Phase.RUNNING)

    def _too_large(self, outcomes: list[tuple[Caller, Outcome]]) -> None:
        """The line being read is over the limit: its activation fails now."""
        if self.phase is Phase.STARTING:
            self._break("the action wrote an over-long line on fd 3 at start-up")
        elif not self.in_flight:
            self._stray(b"(an over-long line)", outcomes)
        else:
            outcomes.append((self.in_flight.popleft()[0], ResultTooLarge(self.max_result)))

    def _stray(self, line: bytes, outcomes: list[tuple[Caller, Outcome]]) -> None:
        self._break(
            f"the action wrote a line on fd 3 that is not the result of an activation sent to it: {line[:200]!r}"
        )
        error = Desync()
        outcomes.extend((caller, error) for caller, _ in self.in_flight)
        self.in_flight.clear()

    def _break(self, fault: str) -> None:
        self.fault = fault
        self._buffer = b""
        self._become(Phase.BROKEN)

    def receive_eof(self, error: ActionLoopError) -> list[tuple[Caller, Outcome]]:
        """fd 3 closed: the activation begun gets `error`; those waiting, NOT_STARTED.

        The waiting ones come last first, so a caller putting each back at
        the front of its queue keeps their order.
        """
        if self.phase is Phase.ENDED:
            return []
        self._become(Phase.ENDED)
        if not self.in_flight:
            return []
        outcomes: list[tuple[Caller, Outcome]] = [(self.in_flight.popleft()[0], error)]
        outcomes.extend((caller, NOT_STARTED) for caller, _ in reversed(self.in_flight))
        self.in_flight.clear()
        return outcomes

"""One action process: spawn with fd 3, acknowledge, activate, stop.

This module owns every OS handle of an action process: its stdin pipe, its
result pipe (fd 3 in the child), its pidfd and its process group. The child's
stdout and stderr are the server's own, as OpenWhisk collects them as the
action's logs (SPEC.md part A).

Life of a process, one table (the only transitions there are):

    STARTING -> READY     the ack arrived (or, without ack, it did not die)
    READY    -> BUSY      an activation line was written
    BUSY     -> READY     the result line of the last one in flight was read
    any      -> DEAD      the process exited, or was killed for a timeout
    any      -> STOPPED   stop() was called; nothing follows
"""

from __future__ import annotations

import asyncio
import collections
import enum
import fcntl
import functools
import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from . import protocol
from .errors import ActionExited, ActionLoopError, ActionTimeout, BadResult, StartError, Unstarted

# Told the outcome of one activation: the result line, or why there is none.
Done = Callable[[bytes | ActionLoopError], None]

# Activation lines in flight at once: the one the action works on and those
# already waiting in its stdin, so the action goes on without sleeping. The
# action still takes them one at a time, in order (ActionLoop protocol). Lines
# submitted in one turn of the event loop go into the pipe in one write, so a
# busy action wakes once for several messages instead of once for each.
DEPTH = 8

ABRUPT_EXIT = "Command exited abruptly during initialization."
# Without an ack, a process still alive after this long counts as started.
NO_ACK_PROBE = 0.05
# After the process exits, how long results it wrote may still be in flight
# (a grandchild can hold fd 3 open, so EOF alone is not enough).
EOF_GRACE = 0.2


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DEAD = "dead"
    STOPPED = "stopped"


TRANSITIONS = {
    State.STARTING: {State.READY, State.DEAD, State.STOPPED},
    State.READY: {State.BUSY, State.DEAD, State.STOPPED},
    State.BUSY: {State.READY, State.DEAD, State.STOPPED},
    State.DEAD: {State.DEAD, State.STOPPED},
    State.STOPPED: {State.STOPPED},
}


def _above_stdio(fd: int) -> int:
    """Move a pipe end to 10 or above, so dup2 onto 0 or 3 never targets itself."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


def spawn(exec_path: Path, env: Mapping[str, str]) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start `exec_path` in its folder with a stdin pipe and fd 3 as result pipe.

    Returns the process, our end of its stdin and our end of its fd 3.
    subprocess cannot map a descriptor to a chosen number, so the child dup2s
    the result pipe onto 3 itself before exec; every other descriptor of ours
    is close-on-exec (PEP 446), so close_fds can stay off.
    """
    stdin_r, stdin_w = os.pipe()
    results_r, results_w = os.pipe()
    results_w = _above_stdio(results_w)
    try:
        child = subprocess.Popen(
            [str(exec_path)],
            cwd=exec_path.parent,
            env=dict(env),
            stdin=stdin_r,
            close_fds=False,
            start_new_session=True,
            # A single C call (no Python code) in the child; see the docstring.
            preexec_fn=functools.partial(os.dup2, results_w, 3),  # noqa: PLW1509
        )
    except BaseException:
        for fd in (stdin_w, results_r):
            os.close(fd)
        raise
    finally:
        os.close(stdin_r)
        os.close(results_w)
    return child, stdin_w, results_r


class LineReader(asyncio.Protocol):
    """Lines from the result pipe (fd 3), with no stream layers in between.

    Until `listen` is called lines queue up for `readline` (the start-up ack);
    after it each line goes straight to a callback, and so does the end of
    the pipe or a line over the limit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines: collections.deque[bytes] = collections.deque()
        self.buffer = bytearray()
        self.eof = False
        self.overflow = False
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.on_line: Callable[[bytes], None] | None = None
        self.on_end: Callable[[], None] | None = None

    def listen(self, on_line: Callable[[bytes], None], on_end: Callable[[], None]) -> None:
        """From now on, lines go to `on_line`; the end or an overflow to `on_end`."""
        self.lines.clear()  # nobody asked for them: they belong to no activation
        self.on_line, self.on_end = on_line, on_end
        if self.eof or self.overflow:
            on_end()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.buffer and data.endswith(b"\n") and data.count(b"\n") == 1:
            lines = [data]  # the usual case: exactly one whole line
        elif b"\n" in data:
            self.buffer += data
            *parts, rest = self.buffer.split(b"\n")
            lines = [bytes(part) + b"\n" for part in parts]
            self.buffer = bytearray(rest)
        else:
            lines = []
            self.buffer += data
        if self.on_line is None:
            self.lines.extend(lines)
        else:
            for line in lines:
                self.on_line(line)
        if len(self.buffer) > self.limit and not self.overflow:
            self.overflow = True
            self._end()
        elif self.on_line is None:
            self._wake()

    def eof_received(self) -> bool:
        self.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.feed_eof()

    def feed_eof(self) -> None:
        if not self.eof:
            self.eof = True
            self._end()

    def _end(self) -> None:
        if self.on_end is not None:
            self.on_end()
        else:
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def readline(self) -> bytes:
        """The next line with its newline; b"" once the pipe is closed; ValueError if over the limit."""
        while not self.lines:
            if self.overflow:
                raise ValueError("result line over the limit")
            if self.eof:
                return b""
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.lines.popleft()


class ActionProcess:
    """A running action program that answers one activation at a time."""

    def __init__(self, exec_path: Path, env: Mapping[str, str], max_result: int) -> None:
        self.exec_path = exec_path
        self.env = env
        self.max_result = max_result
        self.state = State.STARTING
        self.returncode: int | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._exited: asyncio.Future[None] | None = None
        self._results = LineReader(max_result)
        self._stdin = -1
        self._timed_out = False
        self._timeout: float | None = None  # of the activation the action works on
        self._deadline: float | None = None  # loop time that activation must end by
        self._timer: asyncio.TimerHandle | None = None
        self._inflight: collections.deque[tuple[float | None, Done]] = collections.deque()
        self._outbox: collections.deque[memoryview] = collections.deque()  # not yet in the pipe
        self._flushing = False  # a write of the outbox is due in this turn of the loop
        self._loop: asyncio.AbstractEventLoop  # the one start() ran in
        self._writing = False  # waiting for the stdin pipe to take more

    def _become(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"action process cannot go from {self.state} to {state}")
        self.state = state

    @property
    def alive(self) -> bool:
        return self.state in (State.STARTING, State.READY, State.BUSY)

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    async def start(self, ack: bool, timeout: float) -> None:
        """Spawn and wait until ready; raise StartError with the reason."""
        self._loop = loop = asyncio.get_running_loop()
        try:
            self._child, stdin_w, results_r = spawn(self.exec_path, self.env)
        except OSError as exc:
            self._become(State.DEAD)
            raise StartError(str(exc)) from exc
        self._exited = loop.create_future()
        self._watch_exit(loop)
        await loop.connect_read_pipe(lambda: self._results, os.fdopen(results_r, "rb", 0))
        os.set_blocking(stdin_w, False)
        self._stdin = stdin_w
        try:
            await (self._await_ack(timeout) if ack else self._await_survival())
        except StartError:
            await self.stop(0)
            raise
        self._become(State.READY)
        self._results.listen(self._on_line, self._on_end)

    def _watch_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._child is not None
        pidfd = os.pidfd_open(self._child.pid)

        def reap() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            assert self._child is not None and self._exited is not None
            self.returncode = self._child.wait()
            if self.state is not State.STOPPED:
                self._become(State.DEAD)
            self._exited.set_result(None)
            loop.call_later(EOF_GRACE, self._results.feed_eof)

        loop.add_reader(pidfd, reap)

    async def _await_ack(self, timeout: float) -> None:
        try:
            line = await asyncio.wait_for(self._results.readline(), timeout)
        except TimeoutError as exc:
            raise StartError(f"the action did not acknowledge start-up within {timeout:g}s") from exc
        except ValueError as exc:
            raise StartError("the action wrote an over-long line on fd 3 at start-up") from exc
        if not line.endswith(b"\n"):
            raise StartError(ABRUPT_EXIT)
        if not protocol.is_ack(line):
            raise StartError(f"the action's first line on fd 3 is not an ack: {line[:200]!r}")

    async def _await_survival(self) -> None:
        assert self._exited is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), NO_ACK_PROBE)
        except TimeoutError:
            return
        raise StartError(ABRUPT_EXIT)

    @property
    def room(self) -> bool:
        """Whether another activation line can be sent now."""
        return self.state in (State.READY, State.BUSY) and len(self._inflight) < DEPTH

    def submit(self, line: bytes, timeout: float | None, done: Done) -> None:
        """Send one activation line; `done` gets its result (JSON object or
        array) or the ActionLoopError that ended it, exactly once.

        Up to DEPTH lines may be in flight. Each timeout runs from the moment
        the action gets to that line. If the process dies, the activation it
        worked on gets the error, and those still waiting get Unstarted, last
        first (so a caller putting them back at the front of a queue keeps
        their order).

        The end-of-activation sentinel goes to stdout and stderr after every
        activation, answered or not (SPEC.md part A; the reference does too).
        Nothing here waits: the result arrives through the fd 3 reader.
        """
        if not self.room:
            done(ActionExited())
            return
        if self.state is State.READY:
            self._become(State.BUSY)
        self._inflight.append((timeout, done))
        if len(self._inflight) == 1:
            self._start_clock(timeout)
        self._outbox.append(memoryview(line))
        if not (self._flushing or self._writing):
            self._flushing = True
            self._loop.call_soon(self._flush)

    async def invoke(self, line: bytes, timeout: float | None = None) -> bytes:
        """`submit`, awaited: the result, or the error raised."""
        return await settled(functools.partial(self.submit, line, timeout))

    def _start_clock(self, timeout: float | None) -> None:
        """The action starts on an activation: its timeout runs from now.

        One timer serves activation after activation: it is armed only when
        none is, and re-arms itself if it fires early (see _expire).
        """
        loop = self._loop
        self._timeout = timeout
        self._deadline = loop.time() + timeout if timeout else None
        if self._deadline is not None and self._timer is None:
            self._timer = loop.call_at(self._deadline, self._expire)

    def _flush(self) -> None:
        """Write the lines submitted in this turn of the loop, together (see DEPTH)."""
        self._flushing = False
        if self._outbox and self._stdin >= 0 and not self._writing:
            self._write()

    def _write(self) -> None:
        """As much of the waiting lines as the stdin pipe takes now, in one call."""
        outbox = self._outbox
        try:
            written = os.writev(self._stdin, outbox)
        except BlockingIOError:
            written = 0
        except OSError:  # EPIPE and friends: the process is gone
            self._on_end()
            return
        while written:
            if written < len(outbox[0]):
                outbox[0] = outbox[0][written:]
                break
            written -= len(outbox.popleft())
        if outbox and not self._writing:
            self._loop.add_writer(self._stdin, self._write)
            self._writing = True
        elif not outbox:
            self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writing and self._stdin >= 0:
            self._loop.remove_writer(self._stdin)
        self._writing = False

    def _on_line(self, line: bytes) -> None:
        if not self._inflight:
            return  # a line no activation asked for: nobody must read it as theirs
        _, done = self._inflight.popleft()
        if self._inflight:
            self._start_clock(self._inflight[0][0])
        else:
            self._deadline = None
            if self.state is State.BUSY:  # it may have exited just after answering
                self._become(State.READY)
        try:
            outcome: bytes | ActionLoopError = protocol.check_result(line)
        except protocol.JSON_ERRORS:
            outcome = BadResult()
        write_sentinels()
        done(outcome)

    def _on_end(self) -> None:
        """fd 3 closed (the process is gone, even if not yet reaped), overflowed, or stdin broke."""
        if self._results.overflow and not self._results.eof:
            # An over-long result leaves the pipe mid-line: this process is done.
            self._signal(signal.SIGKILL)
            error: ActionLoopError = BadResult()
        elif self._timed_out:
            error = ActionTimeout(f"the action did not answer within {self._timeout:g}s")
        else:
            error = ActionExited()
        if self.alive:
            self._become(State.DEAD)
        self._stop_writing()
        self._outbox.clear()
        self._deadline = None
        if not self._inflight:
            return
        _, done = self._inflight.popleft()
        waiting = [done for _, done in self._inflight]
        self._inflight.clear()
        write_sentinels()
        done(error)
        for done in reversed(waiting):
            done(Unstarted())

    def _expire(self) -> None:
        """Kill the process if the activation it works on is past its deadline; its pipe closing ends the wait."""
        self._timer = None
        if self._deadline is None:
            return  # nothing in flight: the next activation arms a timer anew
        loop = self._loop
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._expire)
            return
        self._timed_out = True
        self._signal(signal.SIGKILL)
        self._results.feed_eof()

    async def kill(self) -> None:
        """Kill the process group now and wait for the process to be reaped."""
        self._signal(signal.SIGKILL)
        if self._exited is not None:
            await self._exited

    def _signal(self, signum: int) -> None:
        if self._child is None:
            return
        try:
            os.killpg(self._child.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    async def stop(self, grace: float) -> None:
        """SIGTERM the process group, SIGKILL after `grace` seconds, reap."""
        was_alive = self.alive
        self._become(State.STOPPED)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._exited is not None:
            if was_alive:
                self._signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(self._exited), grace)
                except TimeoutError:
                    pass
            # Also reaches grandchildren left behind by a process that exited.
            self._signal(signal.SIGKILL)
            await self._exited
        self._stop_writing()
        if self._stdin >= 0:
            os.close(self._stdin)
            self._stdin = -1
        if self._results.transport is not None:
            self._results.transport.close()
        self._results.feed_eof()


def write_sentinels() -> None:
    """The end-of-activation line on stdout and stderr, for log collectors."""
    for fd in (1, 2):
        try:
            os.write(fd, protocol.SENTINEL)
        except OSError:
            pass


async def settled(submit: Callable[[Done], None]) -> bytes:
    """Await an activation handed to a `submit(done)`: the result, or raise its error.

    If the waiter is cancelled the activation still runs to its end; its
    outcome goes nowhere.
    """
    future: asyncio.Future[bytes | ActionLoopError] = asyncio.get_running_loop().create_future()

    def done(outcome: bytes | ActionLoopError) -> None:
        if not future.done():
            future.set_result(outcome)

    submit(done)
    outcome = await future
    if isinstance(outcome, ActionLoopError):
        raise outcome
    return outcome

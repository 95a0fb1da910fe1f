"""One action process: spawn with fd 3, move its bytes, time it, stop it.

This module owns every OS handle of an action process: its stdin pipe, its
result pipe (fd 3 in the child), its pidfd and its process group. The child's
stdout and stderr are the server's own, as OpenWhisk collects them as the
action's logs (contract part A). Which result belongs to which activation is
the protocol's business, not this module's: see core.py.

Life of a process, one table (the only transitions there are):

    STARTING -> READY     the ack arrived (or, without ack, it did not die)
    any      -> DEAD      it exited, broke the protocol, or was killed for a timeout
    any      -> STOPPED   stop() was called; nothing follows
"""

from __future__ import annotations

import asyncio
import collections
import enum
import fcntl
import functools
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TypeVar

from . import protocol, reaper
from .core import DEPTH, NOT_STARTED, LineProtocol, Outcome, Phase
from .errors import ActionExited, ActionLoopError, ActionTimeout, StartError

__all__ = ["DEPTH", "NOT_STARTED", "ActionProcess", "Done", "Outcome", "complete", "settled"]

# Told the outcome of one activation: the result line, why there is none, or
# NOT_STARTED (the process died before the action began it: send it again).
Done = Callable[[Outcome], None]
Job = tuple["float | None", Done]  # an activation in flight: its timeout, its completion
T = TypeVar("T")

# Our launcher finds the key it tags its results with here (core.py).
RESULT_KEY = "ACTIONLOOP_RESULT_KEY"
ABRUPT_EXIT = "Command exited abruptly during initialization."
# Without an ack, a process still alive after this long counts as started.
NO_ACK_PROBE = 0.05
# After the process exits, how long results it wrote may still be in flight
# (a grandchild can hold fd 3 open, so EOF alone is not enough).
EOF_GRACE = 0.2


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"
    STOPPED = "stopped"


TRANSITIONS = {
    State.STARTING: {State.READY, State.DEAD, State.STOPPED},
    State.READY: {State.DEAD, State.STOPPED},
    State.DEAD: {State.DEAD, State.STOPPED},
    State.STOPPED: {State.STOPPED},
}


def _nothing() -> None:
    return None


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


def pipe_file(fd: int, loop: asyncio.AbstractEventLoop) -> IO[bytes]:
    """A file object for connect_read_pipe, so that `fd` is closed exactly once.

    uvloop (0.23, handles/handle.pyx `_close`) closes the descriptor itself,
    through libuv, then closes the file object it was given, ignoring EBADF.
    In between, another thread (pip or a compiler preparing an action, in
    asyncio.to_thread) may have been given that very number, and loses it:
    seen as "[Errno 9] Bad file descriptor" from a concurrent /init. So under
    uvloop the file object does not own the descriptor; asyncio's own loop
    closes it only through the file object, which then must.
    """
    return os.fdopen(fd, "rb", 0, closefd=not type(loop).__module__.startswith("uvloop"))


class ResultPipe(asyncio.Protocol):
    """Our end of the action's fd 3: every byte goes to the process's conversation."""

    def __init__(self, process: ActionProcess) -> None:
        self.process = process
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.process._received(data)

    def eof_received(self) -> bool:
        self.process._pipe_closed()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.process._pipe_closed()


class ActionProcess:
    """A running action program that answers its activations one at a time.

    Which result belongs to which activation is decided by its LineProtocol
    (core.py); this class only moves the bytes, keeps the time and reaps.
    `tagged`: the program is our launcher, which tags its results.
    """

    def __init__(
        self,
        exec_path: Path,
        env: Mapping[str, str],
        max_result: int,
        *,
        ack: bool = False,
        tagged: bool = False,
    ) -> None:
        key = secrets.token_hex(8) if tagged else ""
        self.exec_path = exec_path
        self.env = {**env, RESULT_KEY: key} if tagged else env
        self.state = State.STARTING
        self.returncode: int | None = None
        self._core: LineProtocol[Job] = LineProtocol(max_result, ack, key.encode())
        self.on_exit: Callable[[], None] = _nothing  # told once the process has been reaped
        self._child: subprocess.Popen[bytes] | None = None
        self._exited: asyncio.Future[None] | None = None
        self._ready: asyncio.Future[None] | None = None  # the conversation left STARTING
        self._results = ResultPipe(self)
        self._stdin = -1
        self._timed_out = False
        self._timeout: float | None = None  # of the activation the action works on
        self._deadline: float | None = None  # loop time that activation must end by
        self._timer: asyncio.TimerHandle | None = None
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
        return self.state in (State.STARTING, State.READY)

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    async def start(self, timeout: float) -> None:
        """Spawn and wait until ready; raise StartError with the reason."""
        self._loop = loop = asyncio.get_running_loop()
        try:
            self._child, stdin_w, results_r = spawn(self.exec_path, self.env)
        except OSError as exc:
            self._become(State.DEAD)
            raise StartError(str(exc)) from exc
        reaper.running.add(self._child.pid)
        self._exited = loop.create_future()
        self._ready = loop.create_future()
        self._watch_exit(loop)
        await loop.connect_read_pipe(lambda: self._results, pipe_file(results_r, loop))
        os.set_blocking(stdin_w, False)
        self._stdin = stdin_w
        try:
            await (self._await_ack(timeout) if self._core.ack else self._await_survival())
        except StartError:
            await self.stop(0)
            raise
        self._become(State.READY)

    def _watch_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._child is not None
        pidfd = os.pidfd_open(self._child.pid)

        def reap() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            assert self._child is not None and self._exited is not None
            self.returncode = self._child.wait()
            reaper.running.discard(self._child.pid)
            reaper.sweep_soon(loop)  # what it left behind outside its process group
            if self.state is not State.STOPPED:
                self._become(State.DEAD)
            self._exited.set_result(None)
            loop.call_later(EOF_GRACE, self._pipe_closed)
            complete(lambda _: self.on_exit(), None)

        loop.add_reader(pidfd, reap)

    async def _await_ack(self, timeout: float) -> None:
        assert self._ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError as exc:
            raise StartError(f"the action did not acknowledge start-up within {timeout:g}s") from exc
        self._check_started()

    async def _await_survival(self) -> None:
        assert self._exited is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), NO_ACK_PROBE)
        except TimeoutError:
            self._check_started()
            self._core.running()
            return
        raise StartError(ABRUPT_EXIT)

    def _check_started(self) -> None:
        if self._core.phase is Phase.ENDED:
            raise StartError(ABRUPT_EXIT)
        if self._core.fault is not None:
            raise StartError(self._core.fault)

    @property
    def room(self) -> bool:
        """Whether another activation line can be sent now (up to DEPTH in flight)."""
        core = self._core  # core.room, inlined: asked twice per message
        return self.state is State.READY and core.phase is Phase.RUNNING and len(core.in_flight) < core.depth

    def submit(self, line: bytes, timeout: float | None, done: Done) -> None:
        """Send one activation line; `done` gets its result (JSON object or
        array), the ActionLoopError that ended it, or NOT_STARTED, exactly once.

        Up to DEPTH lines may be in flight. Each timeout runs from the moment
        the action gets to that line. If the process dies, the activation it
        worked on gets the error, and those still waiting get NOT_STARTED,
        last first (so a caller putting them back at the front of a queue
        keeps their order).

        The end-of-activation sentinel goes to stdout and stderr after every
        activation, answered or not (contract part A; the reference does too).
        Nothing here waits: the result arrives through the fd 3 pipe.
        """
        if not self.room:
            complete(done, ActionExited())
            return
        first = not self._core.in_flight
        self._outbox.extend(map(memoryview, self._core.send(line, (timeout, done))))
        if first:
            self._start_clock(timeout)
        if not (self._flushing or self._writing):
            self._flushing = True
            self._loop.call_soon(self._flush)

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
            self._pipe_closed()
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

    def _received(self, data: bytes) -> None:
        """Bytes from fd 3: the conversation says which activations they end."""
        core = self._core
        outcomes = core.receive_data(data)
        if core.fault is not None and self.state is not State.STOPPED:
            self._broken(core.fault)
        if self._ready is not None and not self._ready.done() and core.phase is not Phase.STARTING:
            self._ready.set_result(None)
        if outcomes:
            self._deliver(outcomes)

    def _broken(self, fault: str) -> None:
        """The action broke the protocol: say so, and kill it (contract part C)."""
        if self.state is State.READY:
            sys.stderr.write(f"actionloop: action process {self.pid}: {fault}; it is restarted\n")
            sys.stderr.flush()
            self._become(State.DEAD)
        self._signal(signal.SIGKILL)
        self._deadline = None

    def _deliver(self, outcomes: list[tuple[Job, Outcome]]) -> None:
        in_flight = self._core.in_flight
        if in_flight:
            self._start_clock(in_flight[0][0][0])
        else:
            self._deadline = None
        for (_, done), outcome in outcomes:
            if outcome is not NOT_STARTED:
                write_sentinels()
            try:  # complete(), inlined on the hot path
                done(outcome)
            except Exception as exc:  # noqa: BLE001 - reported, not swallowed
                report(exc)

    def _pipe_closed(self) -> None:
        """fd 3 closed (the process is gone, even if not yet reaped), or stdin broke."""
        if self._core.phase is Phase.ENDED:
            return
        if self._timed_out:
            error: ActionLoopError = ActionTimeout(f"the action did not answer within {self._timeout:g}s")
        else:
            error = ActionExited()
        if self.alive and self.state is not State.STARTING:
            self._become(State.DEAD)
        self._stop_writing()
        self._outbox.clear()
        self._deadline = None
        outcomes = self._core.receive_eof(error)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        self._deliver(outcomes)

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
        self._pipe_closed()

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
            # Also reaches grandchildren left behind by a process that exited,
            # and those that left its process group (setsid) while it lives.
            if self.returncode is None:
                reaper.kill(reaper.descendants(self._child.pid, reaper.children()) if self._child else [])
            self._signal(signal.SIGKILL)
            await self._exited
        self._stop_writing()
        if self._stdin >= 0:
            os.close(self._stdin)
            self._stdin = -1
        if self._results.transport is not None:
            self._results.transport.close()
        self._pipe_closed()


def write_sentinels() -> None:
    """The end-of-activation line on stdout and stderr, for log collectors."""
    for fd in (1, 2):
        try:
            os.write(fd, protocol.SENTINEL)
        except OSError:
            pass


def complete(done: Callable[[T], None], outcome: T) -> None:
    """Hand `outcome` to a completion this module does not own.

    If it raises, the error is reported through the event loop's exception
    handler (or the log) and goes no further: the caller whose completion it
    was is the only one affected, and whoever hands out outcomes goes on.
    """
    try:
        done(outcome)
    except Exception as exc:  # noqa: BLE001 - reported, not swallowed
        report(exc)


def report(exc: Exception) -> None:
    """A completion raised: say so through the loop's exception handler (or the log)."""
    context = {"message": f"an activation's completion raised: {exc!r}", "exception": exc}
    try:
        asyncio.get_running_loop().call_exception_handler(context)
    except RuntimeError:
        logging.getLogger("actionloop").exception(context["message"])


async def settled(submit: Callable[[Done], None]) -> bytes:
    """Await an activation handed to a `submit(done)`: the result, or raise its error.

    If the waiter is cancelled the activation still runs to its end; its
    outcome goes nowhere.
    """
    future: asyncio.Future[bytes | ActionLoopError] = asyncio.get_running_loop().create_future()

    def done(outcome: Outcome) -> None:
        if not future.done():
            future.set_result(ActionExited() if outcome is NOT_STARTED else outcome)  # type: ignore[arg-type]

    submit(done)
    outcome = await future
    if isinstance(outcome, ActionLoopError):
        raise outcome
    return outcome

"""Which action process serves which activation.

- `Single` is one action process and its callers, served in arrival order
  (a FIFO queue), one activation at a time: the reference's model made safe,
  replies never cross (contract part C). The `shared` mode is one `Single`
  for every caller; the `connection` mode, one `Single` per connection (the
  runtime creates and closes them).
- `Pool` is several `Single`s; each activation takes the one idle the
  longest, so activations from different callers run in parallel.

A process that died is replaced from the same prepared code at once.

Activations are handed on with `submit(line, timeout, done)`: `done` hears
the result or the error, once. No task or lock stands between a message and
its process; `process.settled` awaits the same for callers that want a
coroutine. Every completion is called through `process.complete`, so one
that raises is reported and affects its own caller only.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Awaitable, Callable
from typing import Protocol

from .core import NotStarted
from .errors import ActionExited, ActionLoopError, Unavailable
from .process import ActionProcess, Outcome, complete

Starter = Callable[[], Awaitable[ActionProcess]]
# Told the outcome of one activation handed to a Runner: never NOT_STARTED.
Finished = Callable[[bytes | ActionLoopError], None]
Job = tuple[bytes, "float | None", Finished]

MODES = ("shared", "pool", "connection")


def _nothing() -> None:
    return None


class Runner(Protocol):
    @property
    def failure(self) -> str | None: ...

    async def open(self) -> None: ...
    def submit(self, line: bytes, timeout: float | None, done: Finished) -> None: ...
    async def close(self, wait: float | None = None) -> None: ...


class Single:
    """One action process and its callers, activations one after another.

    Activations wait in a FIFO queue. Up to process.DEPTH of them are in the
    process's hands at once (the one the action works on, the next ones
    waiting in its stdin), with no task or lock in between. The action still
    takes them one at a time, in order, so replies cannot cross.
    """

    def __init__(self, start: Starter, stop_grace: float, on_restart: Callable[[], None] = _nothing) -> None:
        self._start = start
        self._stop_grace = stop_grace
        self._on_restart = on_restart
        self._process: ActionProcess | None = None
        self._queue: collections.deque[Job] = collections.deque()
        self._in_flight = 0  # activations in the process's hands
        self._pumping = False
        self._closed = False
        self._restart: asyncio.Task[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self.failure: str | None = None

    async def open(self) -> None:
        """Start the first process; StartError says why it could not."""
        self._process = await self._started()

    async def _started(self) -> ActionProcess:
        process = await self._start()
        process.on_exit = self._exited  # an idle process that dies is replaced at once
        return process

    def _exited(self) -> None:
        self._pump(eager=not self._closed)

    def submit(self, line: bytes, timeout: float | None, done: Finished) -> None:
        """Queue one activation; `done` hears its outcome once it has run."""
        if self._closed:
            complete(done, ActionExited())
            return
        self._queue.append((line, timeout, done))
        self._pump()

    def _pump(self, eager: bool = False) -> None:
        """Hand queued activations to the process, or replace a dead one first."""
        if self._pumping or self._restart is not None:
            return
        process = self._process
        if process is None or not process.alive:
            if self._in_flight:
                return  # the dead process is still handing its activations back
            if self._closed:
                self._fail_queued(ActionExited())
            elif self._queue or eager:
                self._restart = asyncio.ensure_future(self._replace())
            return
        self._pumping = True
        try:
            while self._queue and process.room:
                job = self._queue.popleft()
                self._in_flight += 1
                process.submit(job[0], job[1], functools.partial(self._answered, job))
        finally:
            self._pumping = False
        if not process.alive:
            self._pump(eager=True)  # it died as a line was written
        elif not self._queue and not self._in_flight and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _answered(self, job: Job, outcome: Outcome) -> None:
        self._in_flight -= 1
        if isinstance(outcome, NotStarted):
            if not self._closed:
                # The action never began it: the next process gets it first.
                self._queue.appendleft(job)
                self._pump(eager=True)
                return
            outcome = ActionExited()
        # Queued activations move up before this reply goes out; a process
        # that died is replaced now, not when the next caller arrives.
        self._pump(eager=True)
        complete(job[2], outcome)

    async def _replace(self) -> None:
        old, self._process = self._process, None
        try:
            if old is not None:
                await old.stop(0)
                self._on_restart()
            self._process = await self._started()
            self.failure = None
        except ActionLoopError as exc:
            self.failure = exc.message
            self._fail_queued(exc)
        finally:
            self._restart = None
        self._pump()

    def _fail_queued(self, error: ActionLoopError) -> None:
        queued, self._queue = self._queue, collections.deque()
        for _, _, done in queued:
            complete(done, error)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def close(self, wait: float | None = None) -> None:
        """Stop the process once queued and running activations have finished,
        or `wait` seconds have passed: then the queued ones fail and the one
        running gets the stop (OW_STOP_GRACE, then SIGKILL)."""
        self._closed = True
        try:
            await asyncio.wait_for(self._settled(), wait)
        except TimeoutError:
            self._fail_queued(Unavailable("The server is shutting down."))
        if self._restart is not None:
            await asyncio.shield(self._restart)
        if self._process is not None:
            await self._process.stop(self._stop_grace)

    async def _settled(self) -> None:
        while self._in_flight or self._queue or self._restart is not None:
            if self._restart is not None:
                await asyncio.shield(self._restart)
                continue
            self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)


class Pool:
    """Several action processes; an activation runs on the one idle the longest."""

    def __init__(self, start: Starter, size: int, stop_grace: float, on_restart: Callable[[], None] = _nothing) -> None:
        self._members = [Single(start, stop_grace, on_restart) for _ in range(max(1, size))]
        self._idle: collections.deque[Single] = collections.deque()
        self._queue: collections.deque[Job] = collections.deque()
        self._emptied: asyncio.Future[None] | None = None  # while closing: every process idle, nothing queued

    @property
    def failure(self) -> str | None:
        return next((m.failure for m in self._members if m.failure is not None), None)

    async def open(self) -> None:
        """Start every process at once; if one cannot start, stop them all."""
        results = await asyncio.gather(*(m.open() for m in self._members), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(m.close(0) for m in self._members))
            raise failed[0]
        self._idle.extend(self._members)

    def submit(self, line: bytes, timeout: float | None, done: Finished) -> None:
        """Hand the activation to an idle process, or queue it (FIFO between callers)."""
        if self._idle:
            member = self._idle.popleft()
            member.submit(line, timeout, functools.partial(self._answered, member, done))
        else:
            self._queue.append((line, timeout, done))

    def _answered(self, member: Single, done: Finished, outcome: bytes | ActionLoopError) -> None:
        if self._queue:
            line, timeout, waiting = self._queue.popleft()
            member.submit(line, timeout, functools.partial(self._answered, member, waiting))
        else:
            self._idle.append(member)
            if self._emptied is not None and len(self._idle) == len(self._members) and not self._emptied.done():
                self._emptied.set_result(None)
        complete(done, outcome)

    async def close(self, wait: float | None = None) -> None:
        """Close every process once all activations have run, or `wait` seconds
        have passed: then those still queued fail (see Single.close)."""
        if self._queue or len(self._idle) < len(self._members):
            self._emptied = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._emptied), wait)
            except TimeoutError:
                queued, self._queue = self._queue, collections.deque()
                for _, _, done in queued:
                    complete(done, Unavailable("The server is shutting down."))
        await asyncio.gather(*(m.close(0) for m in self._members))

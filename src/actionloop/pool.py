"""Which action process serves which activation.

- `Shared` is the reference's model made safe: one action process for every
  caller, one activation at a time, callers served in arrival order (asyncio's
  lock is FIFO), so replies never cross between connections (SPEC.md part C).
- `Pool` is several `Shared` runners; each activation takes the one idle the
  longest, so activations from different callers run in parallel.
- Per-connection processes (the `connection` mode) are a `Shared` runner per
  connection; the runtime creates and closes them.

A process that died is replaced from the same prepared code on next use.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

from .errors import ActionLoopError
from .process import ActionProcess

Starter = Callable[[], Awaitable[ActionProcess]]

MODES = ("shared", "pool", "connection")


def _nothing() -> None:
    return None


class Runner(Protocol):
    failure: str | None

    async def open(self) -> None: ...
    async def invoke(self, line: bytes, timeout: float | None = None) -> bytes: ...
    async def close(self) -> None: ...


class Shared:
    """One action process shared by all callers, one activation at a time."""

    def __init__(self, start: Starter, stop_grace: float, on_restart: Callable[[], None] = _nothing) -> None:
        self._start = start
        self._stop_grace = stop_grace
        self._on_restart = on_restart
        self._process: ActionProcess | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._restart: asyncio.Task[None] | None = None
        self.failure: str | None = None

    async def open(self) -> None:
        """Start the first process; StartError says why it could not."""
        self._process = await self._start()

    async def invoke(self, line: bytes, timeout: float | None = None) -> bytes:
        """One activation on the shared process, after those queued before it."""
        async with self._lock:
            process = await self._ready()
            try:
                return await process.invoke(line, timeout)
            finally:
                if not process.alive and not self._closed:
                    # Replace it now, not when the next caller arrives.
                    self._restart = asyncio.create_task(self._replace())

    async def _replace(self) -> None:
        async with self._lock:
            if not self._closed:
                with contextlib.suppress(ActionLoopError):
                    await self._ready()

    async def _ready(self) -> ActionProcess:
        if self._process is not None and self._process.alive:
            return self._process
        if self._process is not None:
            await self._process.stop(0)
            self._on_restart()
        self._process = None
        try:
            self._process = await self._start()
        except ActionLoopError as exc:
            self.failure = exc.message
            raise
        self.failure = None
        return self._process

    async def close(self) -> None:
        """Stop the process, letting a running activation finish first."""
        async with self._lock:
            self._closed = True
            if self._process is not None:
                await self._process.stop(self._stop_grace)


class Pool:
    """Several action processes; an activation runs on any idle one."""

    def __init__(self, start: Starter, size: int, stop_grace: float, on_restart: Callable[[], None] = _nothing) -> None:
        self._members = [Shared(start, stop_grace, on_restart) for _ in range(max(1, size))]
        self._idle: asyncio.Queue[Shared] = asyncio.Queue()

    @property
    def failure(self) -> str | None:
        return next((m.failure for m in self._members if m.failure is not None), None)

    async def open(self) -> None:
        """Start every process at once; if one cannot start, stop them all."""
        results = await asyncio.gather(*(m.open() for m in self._members), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.close()
            raise failed[0]
        for member in self._members:
            self._idle.put_nowait(member)

    async def invoke(self, line: bytes, timeout: float | None = None) -> bytes:
        """One activation on the process idle the longest (FIFO between callers)."""
        member = await self._idle.get()
        try:
            return await member.invoke(line, timeout)
        finally:
            self._idle.put_nowait(member)

    async def close(self) -> None:
        await asyncio.gather(*(m.close() for m in self._members))

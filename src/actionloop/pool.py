"""Which action process serves which activation.

`Shared` is the reference's model made safe: one action process for every
caller, one activation at a time, callers served in arrival order (asyncio's
lock is FIFO), so replies never cross between connections (SPEC.md part C).
A process that died is replaced from the same prepared code on next use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .errors import ActionLoopError
from .process import ActionProcess

Starter = Callable[[], Awaitable[ActionProcess]]


class Shared:
    """One action process shared by all callers, one activation at a time."""

    def __init__(self, start: Starter, stop_grace: float) -> None:
        self._start = start
        self._stop_grace = stop_grace
        self._process: ActionProcess | None = None
        self._lock = asyncio.Lock()
        self.restarts = 0
        self.failure: str | None = None

    async def open(self) -> None:
        """Start the first process; StartError says why it could not."""
        self._process = await self._start()

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.alive

    async def invoke(self, line: bytes, timeout: float | None = None) -> bytes:
        """One activation on the shared process, after those queued before it."""
        async with self._lock:
            process = await self._ready()
            return await process.invoke(line, timeout)

    async def _ready(self) -> ActionProcess:
        if self._process is not None and self._process.alive:
            return self._process
        if self._process is not None:
            await self._process.stop(0)
            self.restarts += 1
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
            if self._process is not None:
                await self._process.stop(self._stop_grace)

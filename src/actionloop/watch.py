"""Live update: watch the auto-init file, switch to each new version (README: Live update).

The kubelet never rewrites a mounted ConfigMap's file in place. The mount
holds `..data -> ..2026_11_26_10_00_00.123` and `hello.py -> ..data/hello.py`;
an update writes a new timestamped folder and renames a new `..data` symlink
over the old one, atomically. So what changes is the file's identity: the
path it resolves to and its inode. Each poll compares a `Stamp` of those,
with the size and mtime for a file edited in place, and reads and hashes the
bytes only when the stamp moved; a new sha256 is a new version. Polling needs
no dependency, and a stat every 2 s is nothing beside the kubelet's own delay.

SIGHUP checks at once and switches even to unchanged bytes: the deliberate
way to retry a version that failed to start, or to restart the action.

A URL is not polled: OW_AUTOINIT_SHA256 pins its content, so a new version
is a new setting, hence a rollout. SIGHUP fetches it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import source
from .errors import ActionLoopError, StartError
from .runtime import Runtime, log


@dataclass(frozen=True)
class Stamp:
    """What identifies one version of a file, at the cost of two system calls."""

    realpath: str
    device: int
    inode: int
    size: int
    mtime_ns: int


def stamp(path: str) -> Stamp | None:
    """The file's stamp, following symlinks; None if it cannot be reached now."""
    try:
        info = os.stat(path)
        # Resolved after the stat: if `..data` is swapped in between, the next
        # poll sees a stamp that moved again and hashes the bytes to decide.
        real = os.path.realpath(path)
    except OSError:
        return None
    return Stamp(real, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def one_line(text: str) -> str:
    """A reason that may span lines (a compiler's output), as one log line."""
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


class Watcher:
    """Polls the auto-init file every `poll` seconds (0, or a URL: only on
    SIGHUP) and hands each new version to `Runtime.update`, one at a time."""

    def __init__(
        self, runtime: Runtime, path: str, main: str, poll: float, wrap: Callable[[bytes], bytes] | None = None
    ) -> None:
        self.runtime = runtime
        self.path = path
        self.main = main
        self.poll = poll if poll > 0 and not source.is_url(path) else None
        self.sha256 = runtime.config.autoinit_sha256
        self._wrap = wrap  # `serve FILE`: the code as the action's __main__ (tracebacks name FILE)
        self._seen: Stamp | None = None
        self._tried = ""  # sha256 of the last version loaded or tried
        self._forced = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._check: asyncio.Future[None] | None = None  # the check under way
        self._closed = False

    def baseline(self) -> None:
        """Before auto-init: what it is about to load (a change during start-up
        is then seen by the first poll), and SIGHUP handled from now on."""
        self._seen = stamp(self.path)
        if source.is_url(self.path):
            self._tried = self.sha256.lower()  # the only version it can load
        with contextlib.suppress(OSError):
            self._tried = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)

    def reload(self) -> None:
        """Check now and switch even if the bytes did not change (SIGHUP)."""
        if self._closed:
            return
        self._forced = True
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """No more checks (shutdown). An update under way completes: a start
        cut short would leave a process no runner knows of. SIGHUP stays
        handled, doing nothing: its default would end the server mid-drain."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._check is not None:
            await self._check

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll)
            self._wake.clear()
            forced, self._forced = self._forced, False
            self._check = asyncio.ensure_future(self._guarded(forced))
            await asyncio.shield(self._check)
            self._check = None

    async def _guarded(self, force: bool) -> None:
        try:
            await self.check(force)
        except Exception as exc:  # noqa: BLE001 - one failed check must not end the watch
            log(f"actionloop: checking {source.shown(self.path)} for a new version failed: {exc!r}")

    async def check(self, force: bool = False) -> None:
        """One poll: cheap when nothing moved; an update when the bytes are new."""
        now = stamp(self.path)
        if now == self._seen and not force:
            return
        self._seen = now
        try:
            code = await source.read(self.path, self.sha256, self.runtime.config.max_archive)
        except ActionLoopError as exc:
            self._failed(exc.message)
            return
        digest = hashlib.sha256(code).hexdigest()
        if digest == self._tried and not force:
            return  # the same bytes under a new stamp (a touch, a rewrite)
        self._tried = digest
        try:
            await self.runtime.update(self._wrap(code) if self._wrap else code, self.main)
        except StartError as exc:
            self._failed("cannot start action: " + exc.message)  # as /init would say
            return
        except ActionLoopError as exc:
            self._failed(exc.message)
            return
        self.runtime.metrics.updated(ok=True)
        log(f"actionloop: action updated from {source.shown(self.path)} (sha256 {digest})")

    def _failed(self, reason: str) -> None:
        self.runtime.metrics.updated(ok=False)
        where = source.shown(self.path)
        log(f"actionloop: update from {where} failed: {one_line(reason)}; the previous version keeps serving")

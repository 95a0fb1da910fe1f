"""The action runtime: initialise an action, run activations, stop.

This is what /init, /run, the WebSocket endpoint and auto-init share; the
server only translates HTTP and WebSocket to these calls. Statuses and
messages follow contract part A.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from . import __version__, archive, protocol, source
from .config import Config
from .errors import ActionLoopError, Forbidden, NoAction, PrepareError, RequestError, StartError, Unavailable
from .hub import Hub
from .metrics import Metrics
from .payloads import ALREADY_INITIALISED, InitRequest
from .pool import Finished, Pool, Runner, Single, Starter
from .prepare import ACK_MARKER, EXEC_ENV, TAG_MARKER, discard, prepare
from .process import ActionProcess, complete, settled, write_sentinels

PREPARE_FAILED_LOGGED = "The action failed to generate or locate a binary. See logs for details."
START_FAILED_LOGGED = "Cannot start action. Check logs for details."
ENV_MISMATCH = "Execution environment version mismatch. See logs for details."


def log(message: str) -> None:
    """One line on stderr, where OpenWhisk and Kubernetes collect logs."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def activation_ids() -> Iterator[str]:
    """Unique 32-hex-digit ids, like OpenWhisk's: a random prefix and a counter."""
    prefix = os.urandom(8).hex()
    return (f"{prefix}{n:016x}" for n in itertools.count(1))


def next_folder(base: Path) -> Path:
    """A new numbered folder under `base`: each init gets its own."""
    base.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name) for p in base.iterdir() if p.name.isdigit()]
    number = max(numbers, default=0) + 1
    while True:
        folder = base / str(number)
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


class Runtime:
    """The state of one runtime: its settings and its initialised action."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.runner: Runner | None = None
        self._start: Starter | None = None
        self._init_lock = asyncio.Lock()
        # /run keeps OpenWhisk's one activation at a time, whatever the mode.
        self._run_lock = asyncio.Lock()
        self.own_processes = 0
        self.hub = Hub()
        self._events_pending = 0
        self._events_idle: asyncio.Future[None] | None = None
        self._own_runners: set[Runner] = set()  # connection mode: one per connection
        self._activation_ids = activation_ids()
        # Live update (README): replaced runners finishing their work; the
        # folder each runner runs from; the folders of versions an update
        # replaced, removed when no runner runs from them (/init keeps them all).
        self._retiring: dict[Runner, asyncio.Task[None]] = {}
        self._folders: dict[Runner, Path] = {}
        self._folder: Path | None = None  # the current version's
        self._replaced: set[Path] = set()

    @property
    def initialized(self) -> bool:
        return self.runner is not None

    @property
    def live(self) -> bool:
        """False only when the action's process died and could not be restarted."""
        return self.runner is None or self.runner.failure is None

    def check_can_init(self) -> None:
        """Refuse a second /init unless debugging (the reference logs it too)."""
        if self.initialized and not self.config.debug:
            log(ALREADY_INITIALISED)
            raise Forbidden(ALREADY_INITIALISED)

    async def init(self, request: InitRequest) -> None:
        """Unpack, prepare and start an action; raise with the reply to give."""
        async with self._init_lock:
            self.check_can_init()
            try:
                previous = await self._install(request)
            except PrepareError as exc:
                raise self._init_failure(exc, PREPARE_FAILED_LOGGED) from exc
            except StartError as exc:
                raise self._init_failure(exc, START_FAILED_LOGGED, "cannot start action: ") from exc
        if previous is not None:
            await previous.close()
            await self._retired(previous)

    async def update(self, code: bytes, main: str) -> None:
        """Live update (README): start the new version beside the running one,
        then switch. New activations go to the new code; the old processes
        finish what they hold, then stop; in connection mode, open
        connections keep their own. Raises ActionLoopError if the new version
        cannot prepare or start: the running one serves on, untouched."""
        async with self._init_lock:
            replaced = self._folder
            previous = await self._install(InitRequest(code, binary=True, main=main), tidy=True)
            if replaced is not None:
                self._replaced.add(replaced)
        if previous is not None:
            self._retiring[previous] = asyncio.ensure_future(self._retire(previous))

    async def _install(self, request: InitRequest, tidy: bool = False) -> Runner | None:
        """Prepare in a new folder, start every process (acked), then take
        over; the runner replaced is returned for the caller to close. The
        folder of a version that could not be prepared goes, and with `tidy`
        (live update) that of one that could not start too."""
        folder = next_folder(self.config.action_dir.absolute())
        try:
            exec_path = await asyncio.to_thread(self._prepare, request, folder)
            start = self._starter(exec_path, request.env)
            runner = self._runner(start)
            await runner.open()
        except ActionLoopError as exc:
            if tidy or isinstance(exc, PrepareError):
                discard(folder)
            raise
        previous, self.runner, self._start, self._folder = self.runner, runner, start, folder
        self._folders[runner] = folder
        return previous

    async def _retire(self, runner: Runner) -> None:
        """A replaced runner answers what it was given, then stops."""
        await runner.close()
        del self._retiring[runner]
        await self._retired(runner)

    async def _retired(self, runner: Runner) -> None:
        """A runner has stopped: a replaced version's folder goes once no runner runs from it."""
        folder = self._folders.pop(runner, None)
        if folder in self._replaced and folder not in self._folders.values():
            self._replaced.discard(folder)
            await asyncio.to_thread(discard, folder)

    def _runner(self, start: Starter) -> Runner:
        """The runner of the configured mode (connection mode: for /run only)."""
        restarted = self.metrics.restarted
        if self.config.mode == "pool":
            return Pool(start, self.config.processes, self.config.stop_grace, restarted)
        return Single(start, self.config.stop_grace, restarted)

    def _prepare(self, request: InitRequest, folder: Path) -> Path:
        src = folder / "src"
        src.mkdir()
        archive.unpack(request.code, request.binary, src, self.config.max_archive)
        return prepare(
            src,
            folder / "bin",
            request.main,
            compiler=self.config.compiler,
            execution_env=self.config.execution_env,
        )

    def _init_failure(self, exc: ActionLoopError, logged: str, prefix: str = "") -> ActionLoopError:
        """With OW_LOG_INIT_ERROR the reason goes to the log, then the sentinels."""
        if not self.config.log_init_error:
            return type(exc)(prefix + exc.message)
        log(exc.message)
        write_sentinels()
        return type(exc)(logged)

    def _starter(self, exec_path: Path, init_env: Mapping[str, str]) -> Starter:
        env = self.action_env(init_env)
        ack = self.config.wait_for_ack or (exec_path.parent / ACK_MARKER).exists()
        tagged = (exec_path.parent / TAG_MARKER).exists()

        async def start() -> ActionProcess:
            self._check_execution_env(exec_path)
            process = ActionProcess(exec_path, env, self.config.max_result, ack=ack, tagged=tagged)
            await process.start(self.config.start_timeout)
            return process

        return start

    def action_env(self, init_env: Mapping[str, str]) -> dict[str, str]:
        """The action's environment (contract part A, the `env` rules)."""
        env = dict(os.environ)
        env.update(init_env)
        env["__OW_PROXY_VERSION"] = __version__
        env["__OW_EXECUTION_ENV"] = self.config.execution_env
        env["__OW_WAIT_FOR_ACK"] = "1" if self.config.wait_for_ack else ""
        if self.config.api_token:  # the management API, for pushes (contract part D)
            env["__OW_API_URL"] = f"http://127.0.0.1:{self.config.api_port}"
            env["__OW_API_TOKEN"] = self.config.api_token
        env.setdefault("PYTHONIOENCODING", "UTF-8")
        return env

    def _check_execution_env(self, exec_path: Path) -> None:
        expected = self.config.execution_env
        if not expected:
            return
        stamp = exec_path.parent / EXEC_ENV
        actual = stamp.read_text().strip() if stamp.exists() else ""
        if actual != expected:
            log(f"Expected execution environment {expected!r}, the action has {actual!r}.")
            raise StartError(ENV_MISMATCH)

    async def run(self, body: dict[str, Any]) -> bytes:
        """One /run activation, awaited: the result, or the error raised.

        /run keeps OpenWhisk's one activation at a time, whatever the mode.
        """
        if self.runner is None:
            raise NoAction()
        async with self._run_lock:
            return await settled(functools.partial(self.activate, body, None))

    def activate(
        self, body: dict[str, Any], timeout: float | None, done: Finished, runner: Runner | None = None
    ) -> None:
        """The one entry for an activation, from any transport.

        The body (`value` and the per-activation keys) is encoded anew as the
        stdin line; `runner` is a connection's own, else the action's. `done`
        hears the result line or the ActionLoopError, once; latency and
        failures are counted here.
        """
        runner = runner or self.runner
        if runner is None:
            self.metrics.error(NoAction.kind)
            complete(done, NoAction())
            return
        try:
            line = protocol.run_line(body)
        except protocol.JSON_ERRORS as exc:
            self.metrics.error("bad_json")
            complete(done, RequestError(f"The message cannot be passed on as JSON: {exc}"))
            return
        started = time.perf_counter()
        metrics = self.metrics

        def answered(outcome: bytes | ActionLoopError) -> None:
            metrics.observe(time.perf_counter() - started)
            if isinstance(outcome, ActionLoopError):
                metrics.error(outcome.kind)
            done(outcome)

        runner.submit(line, timeout, answered)

    def activate_event(self, body: dict[str, Any]) -> None:
        """A disconnect event: its result goes nowhere, but shutdown waits for it (events_settled)."""
        self._events_pending += 1

        def done(outcome: bytes | ActionLoopError) -> None:
            self._events_pending -= 1
            if not self._events_pending and self._events_idle is not None and not self._events_idle.done():
                self._events_idle.set_result(None)

        self.activate(body, self.config.message_timeout or None, done)

    async def events_settled(self, timeout: float) -> None:
        """Wait, up to `timeout`, for the disconnect events of the connections the drain closed."""
        if self._events_pending:
            self._events_idle = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._events_idle), timeout)
            except TimeoutError:
                log(f"actionloop: {self._events_pending} disconnect events were still running at exit")

    def activation_meta(self, connection: str) -> dict[str, str]:
        """The per-activation keys of a WebSocket message (contract part C)."""
        meta = {"activation_id": next(self._activation_ids), "connection_id": connection}
        timeout = self.config.message_timeout
        if timeout:
            # OpenWhisk's deadline: epoch milliseconds, as a string.
            meta["deadline"] = str(int((time.time() + timeout) * 1000))
        return meta

    def session(self, connection: str) -> Session:
        """A WebSocket connection's view of the action (contract part C modes).

        In connection mode the connection gets a process of its own, started
        by `Session.open` and stopped by `Session.close`; past
        OW_MAX_PROCESSES, Unavailable says no at once.
        """
        if self.config.mode != "connection" or self._start is None:
            return Session(self, connection, None)
        self.check_room()
        self.own_processes += 1
        runner = Single(self._start, self.config.stop_grace, self.metrics.restarted)
        self._own_runners.add(runner)
        if self._folder is not None:
            self._folders[runner] = self._folder  # kept while this connection runs from it
        return Session(self, connection, runner)

    def check_room(self) -> None:
        """Unavailable if a new connection could not have a process of its own now."""
        own = self.config.mode == "connection" and self._start is not None
        if own and self.own_processes >= self.config.max_processes:
            raise Unavailable("Too many connections with their own action process; try again later.")

    async def autoinit(self, location: str, main: str, sha256: str = "") -> None:
        """Initialise from a file or URL as if it came to /init (contract part B)."""
        code = await source.read(location, sha256, self.config.max_archive)
        # Binary lets unpack tell zip, tar.gz, executable and source apart.
        await self.init(InitRequest(code, binary=True, main=main))

    async def close(self, wait: float | None = None) -> None:
        """Stop every action process, the connections' own too; past `wait`
        seconds queued activations fail and running ones are stopped."""
        for task in self._retiring.values():
            task.cancel()  # replaced runners are closed here too, with this `wait`
        runners = [*self._own_runners, *self._retiring, *([self.runner] if self.runner is not None else [])]
        await asyncio.gather(*(runner.close(wait) for runner in runners))


class Session:
    """One WebSocket connection: its id and, in connection mode, its own runner."""

    def __init__(self, runtime: Runtime, connection: str, runner: Runner | None) -> None:
        self.runtime = runtime
        self.connection = connection
        self.runner = runner
        self.own = runner is not None  # a process of its own, to start and stop
        self._closed = False

    async def open(self) -> None:
        """Start the connection's own process, if it has one; StartError says why not."""
        if self.runner is not None:
            await self.runner.open()

    async def close(self) -> None:
        """Stop the connection's own process (once), making room for another."""
        if self.runner is not None and not self._closed:
            self._closed = True
            self.runtime._own_runners.discard(self.runner)
            await self.runner.close()
            self.runtime.own_processes -= 1
            await self.runtime._retired(self.runner)

    def activate(self, value: Any, done: Finished) -> None:
        """One message of this connection, with its own keys, to its runner."""
        runtime = self.runtime
        body = protocol.message_body(value, runtime.activation_meta(self.connection))
        runtime.activate(body, runtime.config.message_timeout or None, done, self.runner)

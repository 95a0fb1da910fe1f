"""One action process, with tiny real children (bash scripts)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import TIME_FACTOR

from actionloop.errors import ActionExited, ActionLoopError, ActionTimeout, BadResult, StartError
from actionloop.process import DEPTH, NOT_STARTED, ActionProcess, Outcome, State

ECHO = """#!/bin/bash
[ -n "$ACK" ] && echo '{"ok": true}' >&3
while read -r line; do
  case "$line" in
    *die*) exit 7 ;;
    *hang*) sleep 100 ;;
    *text*) echo 'not json' >&3 ;;
    *) echo "$line" >&3 ;;
  esac
done
"""


def script(tmp_path: Path, body: str = ECHO) -> Path:
    path = tmp_path / "exec"
    path.write_text(body)
    path.chmod(0o755)
    return path


async def started(path: Path, ack: bool = True, tagged: bool = False) -> ActionProcess:
    env = dict(os.environ, ACK="1" if ack else "")
    process = ActionProcess(path, env, max_result=1 << 20, ack=ack, tagged=tagged)
    await process.start(timeout=10 * TIME_FACTOR)
    return process


async def invoke(process: ActionProcess, line: bytes, timeout: float | None = None) -> Any:
    """Submit one line and await its outcome: the result or NOT_STARTED; an error is raised."""
    future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    process.submit(line, timeout, future.set_result)
    outcome = await future
    if isinstance(outcome, ActionLoopError):
        raise outcome
    return outcome


def test_results_come_from_fd_3(tmp_path: Path) -> None:
    """The child's fd 3 is the result pipe; stdin carries the activation lines."""

    async def scenario() -> None:
        process = await started(script(tmp_path))
        assert process.state is State.READY
        assert await invoke(process, b'{"value":{"a":1}}\n') == b'{"value":{"a":1}}'
        assert await invoke(process, b"[1,2]\n") == b"[1,2]"
        await process.stop(1)
        assert process.state.value == "stopped"

    asyncio.run(scenario())


def test_child_runs_in_its_folder(tmp_path: Path) -> None:
    """The action runs with its folder as working directory."""
    body = '#!/bin/bash\nwhile read -r l; do echo "[\\"$PWD\\"]" >&3; done\n'

    async def scenario() -> Any:
        process = await started(script(tmp_path, body), ack=False)
        try:
            return await invoke(process, b"{}\n")
        finally:
            await process.stop(1)

    assert asyncio.run(scenario()) == f'["{tmp_path}"]'.encode()


def test_exit_during_activation(tmp_path: Path) -> None:
    """A child that dies mid-activation raises ActionExited and is dead at once."""

    async def scenario() -> None:
        process = await started(script(tmp_path))
        with pytest.raises(ActionExited):
            await invoke(process, b'{"die":1}\n')
        assert not process.alive
        with pytest.raises(ActionExited):
            await invoke(process, b"{}\n")
        await process.stop(1)
        assert process.returncode == 7

    asyncio.run(scenario())


def test_bad_result(tmp_path: Path) -> None:
    """A result that is not a JSON object or array is BadResult; the process serves on."""

    async def scenario() -> None:
        process = await started(script(tmp_path))
        with pytest.raises(BadResult):
            await invoke(process, b'{"text":1}\n')
        assert await invoke(process, b"{}\n") == b"{}"
        await process.stop(1)

    asyncio.run(scenario())


def test_timeout_kills(tmp_path: Path) -> None:
    """A hung activation times out and the process is killed."""

    async def scenario() -> None:
        process = await started(script(tmp_path))
        with pytest.raises(ActionTimeout):
            await invoke(process, b'{"hang":1}\n', timeout=0.3 * TIME_FACTOR)
        assert process.state is State.DEAD
        await process.stop(1)

    asyncio.run(scenario())


def test_timeout_counts_from_each_activation(tmp_path: Path) -> None:
    """The timeout of an activation runs from its own start, not from an earlier one's."""

    async def scenario() -> None:
        timeout = 1.0 * TIME_FACTOR
        process = await started(script(tmp_path))
        assert await invoke(process, b"{}\n", timeout=timeout) == b"{}"
        await asyncio.sleep(timeout * 0.8)
        began = time.monotonic()
        with pytest.raises(ActionTimeout):
            await invoke(process, b'{"hang":1}\n', timeout=timeout)
        assert time.monotonic() - began >= timeout * 0.9  # a lower bound: slowness only adds
        await process.stop(1)

    asyncio.run(scenario())


def test_start_failures(tmp_path: Path) -> None:
    """No ack before exit, a wrong first line, or no file: StartError, with the reason."""

    async def scenario() -> None:
        with pytest.raises(StartError, match="abruptly"):
            await started(script(tmp_path, "#!/bin/bash\nexit 1\n"))
        with pytest.raises(StartError, match="not an ack"):
            await started(script(tmp_path, "#!/bin/bash\necho '{}' >&3\nsleep 5\n"))
        with pytest.raises(StartError, match="abruptly"):
            await started(script(tmp_path, "#!/bin/bash\nexit 1\n"), ack=False)
        with pytest.raises(StartError):
            await started(tmp_path / "missing")

    asyncio.run(scenario())


def test_stop_reaps_the_whole_group(tmp_path: Path) -> None:
    """stop() ends the action's own children too: no orphans."""
    pidfile = tmp_path / "grandchild.pid"
    body = f"#!/bin/bash\nsleep 100 &\necho $! > {pidfile}\necho '{{\"ok\": true}}' >&3\nwait\n"

    async def scenario() -> None:
        process = await started(script(tmp_path, body))
        await process.stop(1)

    asyncio.run(scenario())
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5 * TIME_FACTOR
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError("the action's child survived stop()")


# Answers each line with how many lines came in the read that brought it.
# Tagged as our launcher does (core.py): only tagged programs are pipelined.
BATCHES = """#!/usr/bin/env python3
import os
key = os.environ["ACTIONLOOP_RESULT_KEY"].encode()
os.write(3, b'{"ok": true}\\n')
while True:
    chunk = os.read(0, 1 << 16)
    if not chunk:
        break
    lines = chunk.splitlines()
    for line in lines:
        number, _, body = line.partition(b" ")
        if body == b'{"die":1}':
            os._exit(5)
        os.write(3, b'%s %s {"line": %s, "read_with": %d}\\n' % (key, number, body, len(lines)))
"""


def test_lines_of_one_loop_turn_share_one_write(tmp_path: Path) -> None:
    """Lines submitted in one turn reach the action in one read; each still gets its own result, in order."""

    async def scenario() -> None:
        process = await started(script(tmp_path, BATCHES), tagged=True)
        futures = [asyncio.ensure_future(invoke(process, b"%d\n" % n)) for n in range(DEPTH)]
        results = [json.loads(r) for r in await asyncio.gather(*futures)]
        assert results == [{"line": n, "read_with": DEPTH} for n in range(DEPTH)]
        await process.stop(1)

    asyncio.run(scenario())


def test_crash_in_a_batch(tmp_path: Path) -> None:
    """Lines answered before a crash keep their results; the one that crashed fails; later ones are NOT_STARTED."""

    async def scenario() -> None:
        process = await started(script(tmp_path, BATCHES), tagged=True)
        lines = [b"1\n", b'{"die":1}\n', b"3\n"]
        outcomes = await asyncio.gather(*(invoke(process, line) for line in lines), return_exceptions=True)
        assert json.loads(outcomes[0])["line"] == 1  # type: ignore[arg-type]
        assert type(outcomes[1]) is ActionExited
        assert outcomes[2:] == [NOT_STARTED]
        await process.stop(1)

    asyncio.run(scenario())

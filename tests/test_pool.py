"""Which process serves which activation (pool.py), over tiny real children.

The completions here are the test's own, so it can make one of them raise.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from conftest import TIME_FACTOR

from actionloop.errors import ActionLoopError, Desync
from actionloop.pool import Pool, Single
from actionloop.process import ActionProcess

# Answers each line with its pid and the line, tagged as our launcher does
# when given a key; `die` exits, `stray` writes a line nobody asked for.
CHILD = """#!/bin/bash
echo '{"ok": true}' >&3
while read -r line; do
  tag=""
  if [ -n "$ACTIONLOOP_RESULT_KEY" ]; then tag="$ACTIONLOOP_RESULT_KEY ${line%% *} "; line="${line#* }"; fi
  case "$line" in
    *die*) exit 3 ;;
    *stray*) echo '{"stray": 1}' >&3 ;;
  esac
  echo "$tag{\\"pid\\": $$, \\"line\\": $line}" >&3
done
"""


def starter(tmp_path: Path, tagged: bool = False) -> Any:
    path = tmp_path / "exec"
    path.write_text(CHILD)
    path.chmod(0o755)

    async def start() -> ActionProcess:
        process = ActionProcess(path, dict(os.environ), 1 << 20, ack=True, tagged=tagged)
        await process.start(10 * TIME_FACTOR)
        return process

    return start


Outcomes = dict[int, "bytes | ActionLoopError"]


def collector(outcomes: Outcomes, raising: int = -1) -> Any:
    def done_for(n: int) -> Any:
        def done(outcome: bytes | ActionLoopError) -> None:
            outcomes[n] = outcome
            if n == raising:
                raise RuntimeError("a completion that raises")

        return done

    return done_for


async def settle(outcomes: Outcomes, count: int) -> None:
    for _ in range(int(500 * TIME_FACTOR)):
        if len(outcomes) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {len(outcomes)} of {count} answered")


def reported(loop: asyncio.AbstractEventLoop) -> list[dict[str, Any]]:
    contexts: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: contexts.append(context))
    return contexts


def test_a_completion_that_raises_costs_only_its_caller(tmp_path: Path) -> None:
    """One of 12 completions raises: it is reported, and the 11 others still get their own results."""

    async def scenario() -> None:
        contexts = reported(asyncio.get_running_loop())
        single = Single(starter(tmp_path), 1)
        await single.open()
        outcomes: Outcomes = {}
        done_for = collector(outcomes, raising=3)
        for n in range(12):
            single.submit(b'{"n":%d}\n' % n, None, done_for(n))
        await settle(outcomes, 12)
        assert [json.loads(outcomes[n])["line"] for n in range(12)] == [{"n": n} for n in range(12)]  # type: ignore[arg-type]
        assert len(contexts) == 1 and isinstance(contexts[0]["exception"], RuntimeError)
        await single.close()

    asyncio.run(scenario())


def test_waiting_lines_go_to_the_new_process_in_order(tmp_path: Path) -> None:
    """A crash hands the lines the action never began to the next process, in their order."""

    async def scenario() -> None:
        single = Single(starter(tmp_path), 1)
        await single.open()
        outcomes: Outcomes = {}
        done_for = collector(outcomes)
        lines = [b'{"n":0}', b'{"die":1}', b'{"n":2}', b'{"n":3}']
        for n, line in enumerate(lines):
            single.submit(line + b"\n", None, done_for(n))
        await settle(outcomes, 4)
        assert isinstance(outcomes[1], ActionLoopError) and outcomes[1].message == "command exited"
        first, later = json.loads(outcomes[0]), [json.loads(outcomes[n]) for n in (2, 3)]  # type: ignore[arg-type]
        assert [r["line"] for r in later] == [{"n": 2}, {"n": 3}]
        assert later[0]["pid"] == later[1]["pid"] != first["pid"]
        await single.close()

    asyncio.run(scenario())


def test_stray_line_fails_those_in_flight_and_replaces_the_process(tmp_path: Path) -> None:
    """Tagged: a stray line gives Desync to every activation in flight; the next is served by a new process."""

    async def scenario() -> None:
        single = Single(starter(tmp_path, tagged=True), 1)
        await single.open()
        outcomes: Outcomes = {}
        done_for = collector(outcomes)
        single.submit(b'{"stray":1}\n', None, done_for(0))
        single.submit(b'{"n":1}\n', None, done_for(1))
        await settle(outcomes, 2)
        assert all(isinstance(outcomes[n], Desync) for n in (0, 1))
        single.submit(b'{"n":2}\n', None, done_for(2))
        await settle(outcomes, 3)
        assert json.loads(outcomes[2])["line"] == {"n": 2}  # type: ignore[arg-type]
        await single.close()

    asyncio.run(scenario())


def test_pool_goes_on_after_a_completion_raises(tmp_path: Path) -> None:
    """In a pool, a raising completion still frees its process for the queued activations."""

    async def scenario() -> None:
        reported(asyncio.get_running_loop())
        pool = Pool(starter(tmp_path), 2, 1)
        await pool.open()
        outcomes: Outcomes = {}
        done_for = collector(outcomes, raising=0)
        for n in range(10):
            pool.submit(b'{"n":%d}\n' % n, None, done_for(n))
        await settle(outcomes, 10)
        assert sorted(json.loads(outcomes[n])["line"]["n"] for n in range(10)) == list(range(10))  # type: ignore[arg-type]
        await pool.close()

    asyncio.run(scenario())

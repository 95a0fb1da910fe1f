"""Live update (README: Live update): the auto-init file, a mounted ConfigMap
updated the way the kubelet does it, switched to without closing a connection."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import IMAGE_ENV, TIME_FACTOR, ask
from websockets.sync.client import connect

from actionloop.config import Config
from actionloop.errors import StartError
from actionloop.metrics import Metrics
from actionloop.watch import Stamp, Watcher, one_line, stamp

TIMEOUT = 20 * TIME_FACTOR
POLL = "0.1"


def action(version: int | str) -> str:
    """An action that says which version it is (and can take its time)."""
    return (
        "import os, time\n"
        "def main(args):\n"
        "    time.sleep(args.get('sleep', 0))\n"
        f"    return {{'version': {version}, 'i': args.get('i'), 'pid': os.getpid()}}\n"
    )


BROKEN = "def main(args)\n    return {'version': 'broken'}\n"


class ConfigMapVolume:
    """A ConfigMap volume as the kubelet's AtomicWriter lays it out and updates it.

    The mount holds `..data -> ..2026_11_26_10_00_00.123` and, per key,
    `hello.py -> ..data/hello.py`. An update writes a new timestamped folder,
    renames a new `..data_tmp` symlink over `..data` (atomic), adds the
    links of new keys and removes the old folder.
    """

    def __init__(self, root: Path, files: dict[str, str]) -> None:
        root.mkdir()
        self.root = root
        self.update(files)

    def path(self, key: str) -> str:
        return str(self.root / key)

    def update(self, files: dict[str, str]) -> None:
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + str(random.randrange(10**9))
        folder = self.root / stamp
        folder.mkdir()
        for key, content in files.items():
            (folder / key).write_text(content)
            (folder / key).chmod(0o644)
        os.symlink(stamp, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", data)
        for key in files:
            if not (self.root / key).is_symlink():
                os.symlink(f"..data/{key}", self.root / key)
        if old is not None:
            shutil.rmtree(self.root / old)


class Chatter(threading.Thread):
    """A WebSocket client sending a message every 20 ms, each answered before the next."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.replies: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            with connect(self.url, open_timeout=TIMEOUT) as ws:
                i = 0
                while not self.stopping.is_set():
                    ws.send(json.dumps({"i": i}))
                    self.replies.append(json.loads(ws.recv(timeout=TIMEOUT)))
                    i += 1
                    time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - raised in the test's thread
            self.error = exc

    def wait_for(self, done: Callable[[list[dict[str, Any]]], bool], what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not done(list(self.replies)):
            if self.error is not None:
                raise AssertionError(f"the client failed while waiting for {what}") from self.error
            assert time.monotonic() < deadline, f"no {what} within {TIMEOUT:g}s: {self.replies[-3:]}"
            time.sleep(0.02)

    def finish(self) -> list[dict[str, Any]]:
        self.stopping.set()
        self.join(TIMEOUT)
        assert not self.is_alive(), "the client did not stop"
        if self.error is not None:
            raise self.error
        return self.replies


def versions(replies: list[dict[str, Any]]) -> list[Any]:
    return [reply.get("version") for reply in replies]


def count(version: Any) -> Callable[[list[dict[str, Any]]], int]:
    return lambda replies: versions(replies).count(version)


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        assert time.monotonic() < deadline, f"not {what} within {TIMEOUT:g}s"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def folders(server: Any) -> list[str]:
    """The numbered action folders the server has (OW_ACTION_DIR: ./action)."""
    return sorted(p.name for p in (server.folder / "action").iterdir() if p.name.isdigit())


def updates(server: Any) -> dict[str, float]:
    with urllib.request.urlopen(server.url + "/metrics", timeout=TIMEOUT) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("actionloop_action_updates_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('"')[1]] = float(value)
    return found


def start(start_server: Any, tmp_path: Path, source: str, **env: str) -> tuple[Any, ConfigMapVolume]:
    volume = ConfigMapVolume(tmp_path / "code", {"hello.py": source})
    server = start_server(
        {**IMAGE_ENV, "OW_WEBSOCKET": "/ws", "OW_AUTOINIT": volume.path("hello.py"), "OW_AUTOINIT_POLL": POLL, **env}
    )
    return server, volume


def wait_log(server: Any, text: str, times: int = 1) -> None:
    eventually(lambda: server.err().count(text) >= times, f"logged {text!r}")


def test_stamp_moves_with_the_kubelet_swap(tmp_path: Path) -> None:
    """Same size and mtime, swapped `..data`: the stamp moves; untouched, it stays; missing: None."""
    volume = ConfigMapVolume(tmp_path / "code", {"hello.py": action(1)})
    path = volume.path("hello.py")
    before = stamp(path)
    assert isinstance(before, Stamp) and stamp(path) == before
    volume.update({"hello.py": action(2)})
    os.utime(path, ns=(before.mtime_ns, before.mtime_ns))
    after = stamp(path)
    assert after is not None and after.size == before.size and after.mtime_ns == before.mtime_ns
    assert after != before and after.realpath != before.realpath
    assert stamp(str(tmp_path / "nothing.py")) is None
    assert one_line("cannot compile:\n  line 1\n\n  error\n") == "cannot compile:; line 1; error"


class FakeRuntime:
    """What the watcher needs of a Runtime: `update`, `metrics` and `config`."""

    def __init__(self) -> None:
        self.config = Config()
        self.metrics = Metrics()
        self.updates: list[bytes] = []
        self.fail = False

    async def update(self, code: bytes, main: str) -> None:
        self.updates.append(code)
        if self.fail:
            raise StartError("Command exited abruptly during initialization.")


def test_watcher_updates_once_per_new_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Unchanged or same bytes: nothing; new bytes: one update; a failure: logged, not retried; forced: again."""
    volume = ConfigMapVolume(tmp_path / "code", {"hello.py": action(1)})
    runtime = FakeRuntime()

    async def scenario() -> None:
        watcher = Watcher(cast(Any, runtime), volume.path("hello.py"), "main", 0)
        watcher.baseline()
        await watcher.check()
        volume.update({"hello.py": action(1)})  # a new stamp, the same bytes
        await watcher.check()
        assert runtime.updates == []
        volume.update({"hello.py": action(2)})
        await watcher.check()
        await watcher.check()
        assert runtime.updates == [action(2).encode()]
        runtime.fail = True
        volume.update({"hello.py": BROKEN})
        await watcher.check()
        await watcher.check()
        assert runtime.updates[1:] == [BROKEN.encode()]
        await watcher.check(force=True)
        assert runtime.updates[2:] == [BROKEN.encode()]
        await watcher.close()

    asyncio.run(scenario())
    assert runtime.metrics.updates == {"ok": 1, "failed": 2}
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"actionloop: action updated from {volume.path('hello.py')} (sha256 ")
    assert (
        err[1:]
        == [
            f"actionloop: update from {volume.path('hello.py')} failed: cannot start action: "
            "Command exited abruptly during initialization.; the previous version keeps serving"
        ]
        * 2
    )


@pytest.mark.parametrize("mode", ["shared", "pool"])
def test_switch_under_continuous_traffic(start_server: Any, tmp_path: Path, mode: str) -> None:
    """A client sending every 20 ms: every message answered, no close, v1 then v2, never back."""
    server, volume = start(start_server, tmp_path, action(1), OW_PROCESS_MODE=mode, OW_POOL_SIZE="2")
    chatter = Chatter(server.ws_url("/ws"))
    chatter.start()
    chatter.wait_for(lambda r: count(1)(r) >= 10, "10 replies of v1")
    volume.update({"hello.py": action(2)})
    chatter.wait_for(lambda r: count(2)(r) >= 10, "10 replies of v2")
    replies = chatter.finish()
    assert [reply["i"] for reply in replies] == list(range(len(replies)))
    switch = versions(replies).index(2)
    assert switch >= 10 and set(versions(replies[:switch])) == {1} and set(versions(replies[switch:])) == {2}
    digest = hashlib.sha256(action(2).encode()).hexdigest()
    assert f"actionloop: action updated from {volume.path('hello.py')} (sha256 {digest})" in server.err()
    assert server.run({})[1]["version"] == 2  # /run follows the new code too
    old = {reply["pid"] for reply in replies[:switch]}
    eventually(lambda: all(gone(pid) for pid in old), "the old processes stopped")
    eventually(lambda: folders(server) == ["2"], "the old folder removed")
    assert updates(server) == {"ok": 1, "failed": 0}


def test_message_in_flight_finishes_on_the_old_version(start_server: Any, tmp_path: Path) -> None:
    """A slow v1 message (1 s) in flight at the switch answers as v1; others get v2 meanwhile."""
    server, volume = start(start_server, tmp_path, action(1))
    with (
        connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as slow,
        connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as quick,
    ):
        assert ask(slow, {})["version"] == 1
        sent = time.monotonic()
        slow.send(json.dumps({"sleep": 1 * TIME_FACTOR, "i": "slow"}))
        volume.update({"hello.py": action(2)})
        wait_log(server, "actionloop: action updated")
        assert time.monotonic() - sent < 1 * TIME_FACTOR, "the switch came after the slow reply was due"
        # The shared process is busy with the slow one: this reply comes from the new one.
        assert ask(quick, {"i": "quick"})["version"] == 2
        reply = json.loads(slow.recv(timeout=TIMEOUT))
        assert reply == {"version": 1, "i": "slow", "pid": reply["pid"]}
        assert time.monotonic() - sent >= 1 * TIME_FACTOR
        assert ask(slow, {})["version"] == 2
        eventually(lambda: gone(reply["pid"]), "the old process stopped")


def test_broken_version_keeps_the_old_one_serving(start_server: Any, tmp_path: Path) -> None:
    """A v2 with a syntax error is logged once and v1 answers on; a good v3 is then picked up."""
    server, volume = start(start_server, tmp_path, action(1))
    chatter = Chatter(server.ws_url("/ws"))
    chatter.start()
    chatter.wait_for(lambda r: count(1)(r) >= 5, "5 replies of v1")
    volume.update({"hello.py": BROKEN})
    failed = (
        f"actionloop: update from {volume.path('hello.py')} failed: cannot start action: "
        "Command exited abruptly during initialization.; the previous version keeps serving"
    )
    wait_log(server, failed)
    seen = len(chatter.replies)
    chatter.wait_for(lambda r: len(r) >= seen + 10, "10 more replies")
    volume.update({"hello.py": action(3)})
    chatter.wait_for(lambda r: count(3)(r) >= 5, "5 replies of v3")
    replies = chatter.finish()
    switch = versions(replies).index(3)
    assert switch >= seen + 10 and set(versions(replies[:switch])) == {1} and set(versions(replies[switch:])) == {3}
    err = server.err()
    assert err.count(failed) == 1 and "SyntaxError" in err
    assert updates(server) == {"ok": 1, "failed": 1}
    eventually(lambda: len(folders(server)) == 1, "one action folder left")


def test_sighup_reloads_at_once(start_server: Any, tmp_path: Path) -> None:
    """With polling off, a new file waits for SIGHUP; SIGHUP on unchanged bytes restarts the action."""
    server, volume = start(start_server, tmp_path, action(1), OW_AUTOINIT_POLL="0")
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as ws:
        first = ask(ws, {})
        volume.update({"hello.py": action(2)})
        time.sleep(0.5 * TIME_FACTOR)
        assert ask(ws, {})["version"] == 1  # nobody polls
        server.process.send_signal(signal.SIGHUP)
        wait_log(server, "actionloop: action updated")
        second = ask(ws, {})
        assert second["version"] == 2 and second["pid"] != first["pid"]
        server.process.send_signal(signal.SIGHUP)
        wait_log(server, "actionloop: action updated", times=2)
        third = ask(ws, {})
        assert third["version"] == 2 and third["pid"] != second["pid"]
    assert updates(server) == {"ok": 2, "failed": 0}
    assert server.stop() == 0
    assert all(gone(reply["pid"]) for reply in (first, second, third))


def test_connection_mode_open_connections_keep_their_version(start_server: Any, tmp_path: Path) -> None:
    """An open connection keeps its v1 process; a new one gets v2; v1's folder goes with the last user."""
    server, volume = start(start_server, tmp_path, action(1), OW_PROCESS_MODE="connection")
    with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as old:
        before = ask(old, {})
        volume.update({"hello.py": action(2)})
        wait_log(server, "actionloop: action updated")
        with connect(server.ws_url("/ws"), open_timeout=TIMEOUT) as new:
            assert ask(new, {})["version"] == 2
            assert ask(old, {}) == before
            assert server.run({})[1]["version"] == 2
        assert folders(server) == ["1", "2"]
    eventually(lambda: gone(before["pid"]), "the old connection's process stopped")
    eventually(lambda: folders(server) == ["2"], "the old folder removed")

"""The `actionloop` command: help, `serve` flags, and how it starts and stops.

Each test runs the real command as a child process in its own session, on a
free port, and kills what is left of it (and of its action processes) at the end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ACTIONLOOP, EXAMPLES, TIME_FACTOR, ask, clean_env, free_port
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

TIMEOUT = 20 * TIME_FACTOR

# Writes a line to MARKS when imported and when stopped with SIGTERM.
MARKED = """\
import os, signal

def mark(word):
    with open({marks!r}, "a") as file:
        file.write(word + " " + str(os.getpid()) + "\\n")

def stopped(signum, frame):
    mark("terminated")
    os._exit(0)

mark("imported")
signal.signal(signal.SIGTERM, stopped)

def main(args):
    return args
"""


@contextmanager
def actionloop(folder: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`actionloop ARGS` in `folder`, stdout and stderr to files there; killed at the end."""
    child = subprocess.Popen(
        [ACTIONLOOP, *args],
        cwd=folder,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        stdout=open(folder / "stdout.txt", "wb"),  # noqa: SIM115 - the child owns it
        stderr=open(folder / "stderr.txt", "wb"),  # noqa: SIM115
        start_new_session=True,
    )
    try:
        yield child
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait(TIMEOUT)


def wait_listening(child: subprocess.Popen[bytes], port: int, folder: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise AssertionError(f"exited {child.returncode}: {(folder / 'stderr.txt').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError("did not start listening")


def stopped_stderr(child: subprocess.Popen[bytes], folder: Path) -> str:
    """SIGTERM, wait for the exit, return what it wrote on stderr."""
    child.send_signal(signal.SIGTERM)
    child.wait(TIMEOUT)
    return (folder / "stderr.txt").read_text()


@contextmanager
def failing_listener(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The entrypoint auto-initialising MARKED, then failing with ImportError (redis broken).

    With OW_REDIS_URL, `serve` imports redis after auto-init: a broken redis
    first on PYTHONPATH raises ImportError inside `serve`.
    """
    broken = tmp_path / "broken" / "redis"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('redis broken on purpose')\n")
    marks = tmp_path / "marks.txt"
    action = tmp_path / "marked.py"
    action.write_text(MARKED.format(marks=str(marks)))
    path = [str(broken.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {"OW_AUTOINIT": str(action), "OW_REDIS_URL": "redis://127.0.0.1:1/0", "PYTHONPATH": os.pathsep.join(path)}
    try:
        with actionloop(tmp_path, "--port", str(free_port()), "--host", "127.0.0.1", env=env) as child:
            child.wait(TIMEOUT)
            assert child.returncode != 0
            assert "redis broken on purpose" in (tmp_path / "stderr.txt").read_text()
            yield child, marks
    finally:
        for line in marks.read_text().splitlines() if marks.exists() else ():
            try:
                os.killpg(int(line.split()[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_import_error_inside_serve_does_not_serve_again(tmp_path: Path) -> None:
    """An ImportError raised inside `serve` is not taken for a missing uvloop: auto-init runs once."""
    with failing_listener(tmp_path) as (_, marks):
        assert marks.read_text().split().count("imported") == 1


def test_serve_failing_stops_the_action(tmp_path: Path) -> None:
    """When `serve` fails with an exception, the action process is stopped (SIGTERM) before the exit."""
    with failing_listener(tmp_path) as (_, marks):
        assert "terminated" in marks.read_text().split()


def test_help_lists_subcommands(tmp_path: Path) -> None:
    """`actionloop -h` lists `serve` and `kube`, each with a description."""
    done = subprocess.run([ACTIONLOOP, "-h"], cwd=tmp_path, capture_output=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0
    out = done.stdout.decode()
    for command in ("serve", "kube"):
        assert re.search(rf"^\s+{command} FILE\s+\w+", out, re.MULTILINE), out


def test_serve_origin_comma_separated(tmp_path: Path) -> None:
    """`serve --origin a,b` allows both origins (a repeated flag adds more) and refuses others."""
    port = free_port()
    args = ["--port", str(port), "--origin", "a.example,b.example", "--origin", "https://c.example"]
    with actionloop(tmp_path, "serve", str(EXAMPLES / "hello.py"), *args) as child:
        wait_listening(child, port, tmp_path)
        url = f"ws://127.0.0.1:{port}/ws"
        for origin in ("http://a.example", "https://b.example:8443", "https://c.example"):
            with connect(url, origin=origin, open_timeout=TIMEOUT) as ws:  # type: ignore[call-overload]
                assert ask(ws, {"name": "o"}) == {"greeting": "Hello, o!"}
        for origin in ("http://d.example", "http://c.example"):
            with pytest.raises(InvalidStatus) as refused:
                connect(url, origin=origin, open_timeout=TIMEOUT)  # type: ignore[call-overload]
            assert refused.value.response.status_code == 403


def test_serve_origin_empty_is_refused(tmp_path: Path) -> None:
    """`serve --origin ''` names no origin: a usage error, not "any origin"."""
    done = subprocess.run(
        [ACTIONLOOP, "serve", str(EXAMPLES / "hello.py"), "--port", str(free_port()), "--origin", ","],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 2
    assert "--origin" in done.stderr.decode()


def test_serve_traceback_names_the_file(tmp_path: Path) -> None:
    """A Python action's traceback under `serve FILE` names FILE, not a temporary copy."""
    source = tmp_path / "mine.py"
    source.write_text("def main(args):\n    raise ValueError('broken on purpose')\n")
    port = free_port()
    with actionloop(tmp_path, "serve", str(source), "--port", str(port)) as child:
        wait_listening(child, port, tmp_path)
        with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=TIMEOUT) as ws:
            assert ask(ws, {}) == {"error": "broken on purpose"}
        err = stopped_stderr(child, tmp_path)
    assert f'File "{source}", line 2, in main' in err, err


def test_serve_import_failure_names_the_file(tmp_path: Path) -> None:
    """A Python action that does not compile: the traceback and the auto-init line name FILE."""
    source = tmp_path / "mine.py"
    source.write_text("def main(args):\n    return {\n")
    with actionloop(tmp_path, "serve", str(source), "--port", str(free_port())) as child:
        assert child.wait(TIMEOUT) == 1
    err = (tmp_path / "stderr.txt").read_text()
    assert f'File "{source}", line 2' in err, err
    assert f"auto-init from {source} failed" in err, err

"""Process hygiene beyond an action's own process group: no zombies, no orphans.

An action process runs in a process group of its own, which its stop kills
whole (process.py). A child that leaves the group (setsid, a daemon) would
escape that and outlive its action; so the server makes itself the reaper of
its descendants' orphans (a Linux subreaper), and after an action process
ends, sweeps what it adopted: every child of ours that is no running action
process, and everything below it, is killed and reaped.
"""

from __future__ import annotations

import asyncio
import os
import signal

# The pids of the action processes now running (see sweep_orphans).
running: set[int] = set()
PR_SET_CHILD_SUBREAPER = 36
SWEEP_DELAY = 0.2


def adopt_orphans() -> None:
    """Become the reaper of our descendants' orphans (Linux prctl).

    An action's child that leaves the process group (setsid) escapes
    killpg; when its parent dies it is handed to us instead of to init, so
    sweep_orphans can stop it. Call once, at start-up.
    """
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def children() -> dict[int, list[int]]:
    """Each process's children, from the parent pids in /proc."""
    found: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                parent = int(stat.read().rpartition(b")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        found.setdefault(parent, []).append(int(name))
    return found


def descendants(root: int, tree: dict[int, list[int]]) -> list[int]:
    found, todo = [], [root]
    while todo:
        for child in tree.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


_sweep: list[asyncio.TimerHandle] = []  # the sweep due, if one is


def sweep_soon(loop: asyncio.AbstractEventLoop) -> None:
    """A sweep shortly: processes ending together (connections closing in
    `connection` mode) share one scan of /proc instead of one each."""
    if not _sweep:
        _sweep.append(loop.call_later(SWEEP_DELAY, _swept))


def _swept() -> None:
    _sweep.clear()
    sweep_orphans()


def sweep_orphans() -> None:
    """Kill the processes we adopted (children of ours that are no running
    action process) and everything below them; reap those that have died.

    Children in our own process group are ours on purpose (an OW_COMPILER or
    pip run preparing an action): an adopted orphan comes from an action's group or its own session.
    """
    found = children()
    for pid in found.get(os.getpid(), ()):
        try:
            if pid in running or os.getpgid(pid) == os.getpgrp():
                continue
        except ProcessLookupError:
            continue
        kill([pid, *descendants(pid, found)])
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass

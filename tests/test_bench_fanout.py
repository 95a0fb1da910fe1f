"""The fan-out benchmark's own logic: one short real run of each side, and how --save edits RESULTS.md.

No timing assertions: speed is measured by bench/fanout.py, never by tests.
Both sides need redis-server; the Socket.IO side also node and `npm ci` in
bench/socketio (scripts/test runs it). Without them they are skipped, unless
ACTIONLOOP_REQUIRE_SYSTEM=1.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import ROOT, TIME_FACTOR
from deploy_helpers import REQUIRE_SYSTEM, need

BENCH = ROOT / "bench" / "fanout.py"


def quick(tmp_path: Path, side: str) -> dict[str, Any]:
    """`bench/fanout.py --quick` for one side: its figures, after checking the report names its command."""
    need("redis-server")
    figures, report = tmp_path / f"{side}.json", tmp_path / f"{side}.md"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--sides", side, "--json", str(figures), "--out", str(report)],
        capture_output=True,
        check=False,
        timeout=180 * TIME_FACTOR,
    )
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    text = report.read_text()
    assert text.startswith("## Fan-out\n") and "Command: `python bench/fanout.py --quick" in text
    assert "Machine:" in text and "| delivered within 5 s of the last publish / expected (missing) |" in text
    rows: list[dict[str, Any]] = json.loads(figures.read_text())
    assert [row["side"] for row in rows] == [side]
    return rows[0]


def check_sane(row: dict[str, Any]) -> None:
    assert row["subscribed"] == row["connections"] == 200
    assert row["expected"] == row["publishes"] * row["connections"] > 0
    assert row["delivered"] == row["expected"], f"missing {row['missing']}"
    assert row["missing"] == 0 and row["duplicates"] == 0 and row["dropped"] == 0
    assert row["publish_errors"] == []
    latencies = [row[key] for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms")]
    assert all(math.isfinite(x) and x > 0 for x in latencies), latencies
    assert latencies == sorted(latencies)
    assert all(math.isfinite(x) and x > 0 for x in row["p99_by_replica_ms"])
    assert math.isfinite(row["server_cpu_us"]) and row["server_cpu_us"] >= 0
    assert set(row["server_cpu_split_us"]) == {"replica 1", "replica 2", "Redis"}


def test_quick_actionloop_delivers_every_message(tmp_path: Path) -> None:
    """actionloop side: 200 connections over 2 replicas and Redis each get every measured publish, latency measured."""
    check_sane(quick(tmp_path, "actionloop"))


def test_quick_socketio_delivers_every_message(tmp_path: Path) -> None:
    """Socket.IO side (the peer anchor): the same run against two Node servers and the Redis adapter."""
    if shutil.which("node") is None or not (ROOT / "bench" / "socketio" / "node_modules" / "socket.io").is_dir():
        reason = "node and `npm ci` in bench/socketio are needed (scripts/test runs it)"
        if REQUIRE_SYSTEM:
            raise AssertionError(f"{reason} (ACTIONLOOP_REQUIRE_SYSTEM=1)")
        pytest.skip(reason)
    check_sane(quick(tmp_path, "socketio"))


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fanout_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_save_replaces_only_its_section(tmp_path: Path) -> None:
    """--save replaces the Fan-out section, keeps its hand-written notes and everything around it."""
    fanout = load_bench()
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\ntable\n\n## Notes\n\nnotes of run.py\n")
    fanout.save("## Fan-out\n\nfirst figures\n", results)
    assert results.read_text() == (
        "# Benchmark results\n\ntable\n\n## Notes\n\nnotes of run.py\n\n## Fan-out\n\nfirst figures\n"
    )
    results.write_text(results.read_text() + "\n### Fan-out notes\n\nwhat was met\n\n## Later\n\nkept\n")
    fanout.save("## Fan-out\n\nsecond figures\n", results)
    assert results.read_text() == (
        "# Benchmark results\n\ntable\n\n## Notes\n\nnotes of run.py\n\n"
        "## Fan-out\n\nsecond figures\n\n### Fan-out notes\n\nwhat was met\n\n## Later\n\nkept\n"
    )

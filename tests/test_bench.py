"""The benchmark's own logic: one short real run, checked for a well-formed report.

No timing assertions: speed is measured by bench/run.py, never by tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, TIME_FACTOR


def test_quick_run_produces_a_table(tmp_path: Path) -> None:
    """`bench/run.py --quick` measures a real server and writes a complete table."""
    out = tmp_path / "report.md"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--servers",
            "actionloop-shared",
            "inprocess-echo",
            "--out",
            str(out),
        ],
        capture_output=True,
        check=False,
        timeout=180 * TIME_FACTOR,
    )
    assert done.returncode == 0, done.stderr.decode()
    text = out.read_text()
    assert "Command: `python bench/run.py --quick" in text and "Machine:" in text
    rows = [line for line in text.splitlines() if line.startswith(("| actionloop-shared", "| inprocess-echo"))]
    assert len(rows) == 2
    header = next(line for line in text.splitlines() if line.startswith("| server"))
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == header.count("|") - 1
        msgs = float(cells[1].replace(",", ""))
        assert msgs > 0
        assert re.fullmatch(r"[\d.,]+ \(\d+/\d+\)", cells[5]), cells[5]
        counts = re.search(r"\((\d+)/(\d+)\)", cells[5])
        assert counts is not None
        answered, opened = counts.groups()
        assert answered == opened
    assert rows[0].split("|")[-2].strip() != "-", "the /run column is measured for actionloop"

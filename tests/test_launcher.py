"""The Python launcher on its own, in tiny real child processes.

The child runs the `exec` stub that prepare writes, with bash mapping its fd 3
onto a pipe we read; nothing of the server is involved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import TIME_FACTOR

from actionloop.prepare import prepare


def make_action(tmp_path: Path, source: str, main: str = "main") -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "__main__.py").write_text(source)
    return prepare(src, tmp_path / "bin", main)


def launch(
    exec_path: Path, lines: list[dict[str, Any]], env: dict[str, str] | None = None
) -> tuple[int, list[Any], str, str]:
    """Run the action with these stdin lines; (exit code, fd 3 lines, stdout, stderr)."""
    stdout = exec_path.parent / "stdout.txt"
    done = subprocess.run(
        ["bash", "-c", 'exec ./exec 3>&1 1>"$0"', str(stdout)],
        cwd=exec_path.parent,
        input=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
        capture_output=True,
        check=False,
        env=env,
        timeout=20 * TIME_FACTOR,
    )
    results = [json.loads(line) for line in done.stdout.splitlines()]
    return done.returncode, results, stdout.read_text(), done.stderr.decode()


def test_ack_then_one_result_per_line(tmp_path: Path) -> None:
    """The first fd 3 line is the ack, then one result per stdin line, then exit 0 at EOF."""
    exec_path = make_action(tmp_path, "def main(args):\n    return {'got': args}\n")
    code, results, _, _ = launch(exec_path, [{"value": {"a": 1}}, {"value": [1, 2]}])
    assert code == 0
    assert results == [{"ok": True}, {"got": {"a": 1}}, {"got": [1, 2]}]


def test_keys_become_ow_environment(tmp_path: Path) -> None:
    """Every key but value reaches the action as __OW_<KEY>; non-strings as JSON."""
    source = "import os\ndef main(args):\n    return {k: os.environ.get(k) for k in ('__OW_ACTIVATION_ID', '__OW_DEADLINE')}\n"
    _, results, _, _ = launch(make_action(tmp_path, source), [{"value": {}, "activation_id": "abc", "deadline": 123}])
    assert results[1] == {"__OW_ACTIVATION_ID": "abc", "__OW_DEADLINE": "123"}


def test_exception_becomes_error_result_and_traceback(tmp_path: Path) -> None:
    """An exception in main is an error result; the traceback goes to stderr; serving goes on."""
    source = (
        "def main(args):\n    if args.get('boom'):\n        raise RuntimeError('kaboom')\n    return {'fine': True}\n"
    )
    code, results, _, err = launch(make_action(tmp_path, source), [{"value": {"boom": 1}}, {"value": {}}])
    assert code == 0 and results[1:] == [{"error": "kaboom"}, {"fine": True}]
    assert "Traceback" in err and "RuntimeError: kaboom" in err


def test_unencodable_result(tmp_path: Path) -> None:
    """A result JSON cannot hold becomes an error result, not a crash."""
    _, results, _, _ = launch(make_action(tmp_path, "def main(args):\n    return {'s': {1, 2}}\n"), [{"value": {}}])
    assert "not JSON" in results[1]["error"]


def test_logs_are_flushed_before_the_result(tmp_path: Path) -> None:
    """print() output reaches stdout before the result is written."""
    source = "def main(args):\n    print('log line', args['n'])\n    return {}\n"
    _, results, out, _ = launch(make_action(tmp_path, source), [{"value": {"n": 1}}, {"value": {"n": 2}}])
    assert out.splitlines() == ["log line 1", "log line 2"] and len(results) == 3


def test_import_error_exits_without_ack(tmp_path: Path) -> None:
    """An import error prints a traceback and exits before acknowledging."""
    code, results, _, err = launch(make_action(tmp_path, "import nosuchmodule\n"), [])
    assert code != 0 and results == [] and "ModuleNotFoundError" in err


def test_missing_entry_point(tmp_path: Path) -> None:
    """A missing entry point is named in the error."""
    code, results, _, err = launch(make_action(tmp_path, "def main(args):\n    return {}\n", main="nope"), [])
    assert code != 0 and results == [] and "'nope'" in err


def test_unicode_result(tmp_path: Path) -> None:
    """Results are UTF-8 JSON with the characters as they are."""
    exec_path = make_action(tmp_path, "def main(args):\n    return {'w': args['d'] + ' ☃'}\n")
    _, results, _, _ = launch(exec_path, [{"value": {"d": "❄"}}])
    assert results[1] == {"w": "❄ ☃"}


def test_virtualenv_site_packages_come_first(tmp_path: Path) -> None:
    """A bundled virtualenv's packages shadow the interpreter's own."""
    src = tmp_path / "src"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(src / "virtualenv")], check=True)
    packages = next((src / "virtualenv").glob("lib/python3*/site-packages"))
    (packages / "json_shadow_probe.py").write_text("WHERE = 'venv'\n")
    (src / "__main__.py").write_text(
        "import json_shadow_probe\ndef main(args):\n    return {'where': json_shadow_probe.WHERE}\n"
    )
    _, results, _, _ = launch(prepare(src, tmp_path / "bin", "main"), [{"value": {}}])
    assert results[1] == {"where": "venv"}


def test_per_activation_keys_do_not_grow_the_process(tmp_path: Path) -> None:
    """Unique ids on every line reach os.environ without growing the C environment's store."""
    source = (
        "import os\n"
        "def main(args):\n"
        "    rss = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        "    return {'rss': rss, 'id': os.environ['__OW_ACTIVATION_ID'], 'deadline': os.getenv('__OW_DEADLINE')}\n"
    )
    lines = [{"value": {}, "activation_id": f"{n:032x}", "deadline": str(10**12 + n)} for n in range(100_000)]
    code, results, _, _ = launch(make_action(tmp_path, source), lines)
    assert code == 0 and len(results) == len(lines) + 1
    assert results[-1]["id"] == f"{len(lines) - 1:032x}" and results[-1]["deadline"] == str(10**12 + len(lines) - 1)
    # Each unique string kept by setenv would cost about 100 bytes: 20 MB here.
    grown = results[-1]["rss"] - results[1000]["rss"]
    assert grown < 4 * 1024 * 1024, grown


def test_processes_load_the_bytecode_saved_at_prepare(tmp_path: Path) -> None:
    """Prepare compiles the launcher and __main__.py once; each process loads that bytecode, not the source."""
    exec_path = make_action(tmp_path, "def main(args):\n    return {'ok': 1}\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONVERBOSE": "1"}
    code, results, _, stderr = launch(exec_path, [{"value": {}}], env)
    assert code == 0 and results == [{"ok": True}, {"ok": 1}]
    cache = exec_path.parent / "__pycache__"
    for module in ("actionloop_launcher", "__main__"):
        pyc = next(cache.glob(f"{module}.*.pyc"))
        assert f"code object from '{pyc}'" in stderr


def test_prepare_leaves_a_syntax_error_to_the_import(tmp_path: Path) -> None:
    """A module that does not compile is still prepared; starting it fails with the traceback, as before."""
    code, results, _, stderr = launch(make_action(tmp_path, "def main(args)\n    return {}\n"), [])
    assert code != 0 and results == []
    assert "SyntaxError" in stderr


def test_activation_keys_do_not_outlive_their_activation(tmp_path: Path) -> None:
    """An api_key given to one activation is gone for the next; the server's own __OW_ values come back."""
    source = "import os\ndef main(args):\n    return {k: os.environ.get(k) for k in ('__OW_API_KEY', '__OW_API_HOST', '__OW_ACTIVATION_ID')}\n"
    lines = [
        {"value": {}, "api_key": "secret", "api_host": "https://other", "activation_id": "a1"},
        {"value": {}, "activation_id": "a2"},
    ]
    env = {**os.environ, "__OW_API_HOST": "https://own"}
    code, results, _, _ = launch(make_action(tmp_path, source), lines, env)
    assert code == 0
    assert results[1] == {"__OW_API_KEY": "secret", "__OW_API_HOST": "https://other", "__OW_ACTIVATION_ID": "a1"}
    assert results[2] == {"__OW_API_KEY": None, "__OW_API_HOST": "https://own", "__OW_ACTIVATION_ID": "a2"}

"""The checks of the OpenWhisk runtime test suite, against the real server.

Re-created from apache/openwhisk BasicActionRunnerTests.scala and
apache/openwhisk-runtime-python PythonBasicTests.scala, PythonAdvancedTests.scala
and Python3Tests.scala. Each test starts a fresh server, like a fresh container,
once with the environment the official Python image sets and once without.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import IMAGE_ENV, b64, check_streams, make_zip


@pytest.fixture(params=["image-env", "bare-env"])
def env(request: pytest.FixtureRequest) -> dict[str, str]:
    return dict(IMAGE_ENV) if request.param == "image-env" else {}


@pytest.fixture
def server(start_server: Any, env: dict[str, str]) -> Any:
    return start_server(env)


def logs_init_errors(env: dict[str, str]) -> bool:
    return "OW_LOG_INIT_ERROR" in env


ECHO = """
import sys
def main(args):
    print('hello stdout')
    print('hello stderr', file=sys.stderr)
    return args
"""


def test_init_with_empty_code_fails(server: Any) -> None:
    """handle initialization with no code: no stub, so not 200."""
    status, body = server.init("")
    assert status == 403
    assert body == {"error": "Missing main/no code to execute."}


def test_init_with_no_content_fails(server: Any) -> None:
    """handle initialization with no content: the reference's message."""
    status, body = server.post("/init", {})
    assert status == 403
    assert body == {"error": "Missing main/no code to execute."}


def test_not_returning_json(server: Any) -> None:
    """run and report an error for a function not returning a JSON object."""
    assert server.init("def main(args):\n    return 'not a json object'\n")[0] == 200
    status, body = server.run({})
    assert status == 502
    assert body == {"error": "The action did not return a dictionary or array."}
    out, err = check_streams(*server.streams())
    assert out == "" and err == ""


def test_init_twice_fails(server: Any) -> None:
    """fail to initialize a second time; the message is also logged."""
    code = "def main(args):\n    return args\n"
    assert server.init(code)[0] == 200
    status, body = server.init(code)
    assert status == 403
    assert body == {"error": "Cannot initialize the action more than once."}
    out, err = check_streams(*server.streams(), sentinels=0)
    assert "Cannot initialize the action more than once." in out + err


def test_non_standard_entry_point(server: Any) -> None:
    """invoke non-standard entry point."""
    assert server.init("def niam(args):\n  return args\n", main="niam")[0] == 200
    assert server.run({"string": "hello"}) == (200, {"string": "hello"})
    out, err = check_streams(*server.streams())
    assert out == "" and err == ""


def test_echo_and_logs(server: Any) -> None:
    """echo arguments and print message to stdout/stderr."""
    assert server.init(ECHO)[0] == 200
    argss = [{"string": "hello"}, {"string": "❄ ☃ ❄"}, {"numbers": [42, 1]}, {"object": {"a": "A"}}]
    for args in argss:
        assert server.run(args) == (200, args)
    out, err = check_streams(*server.streams(), sentinels=len(argss))
    assert "hello stdout" in out
    assert "hello stderr" in err


def test_unicode(server: Any) -> None:
    """handle unicode in source, input params, logs, and result."""
    code = "def main(args):\n    sep = args['delimiter']\n    s = sep + ' ☃ ' + sep\n    print(s)\n    return {'winter': s}\n"
    assert server.init(code)[0] == 200
    status, body = server.run({"delimiter": "❄"})
    assert status == 200 and body["winter"] == "❄ ☃ ❄"
    out, _ = check_streams(*server.streams())
    assert "❄ ☃ ❄" in out


def test_env_exported_before_init(server: Any) -> None:
    """export environment variables before initialization (testEnvPartition)."""
    code = """
import os
def main(args):
    return {k: os.environ[k] for k in ("ARRAY", "OBJECT", "STRING", "NUMBER", "BOOL", "NULL")}
"""
    env = {"ARRAY": ["a", "b"], "OBJECT": {"a": "A"}, "STRING": "xyz", "NUMBER": 3, "BOOL": True, "NULL": None}
    assert server.init(code, env=env)[0] == 200
    status, body = server.run({})
    assert status == 200
    assert __import__("json").loads(body["ARRAY"]) == ["a", "b"]
    assert __import__("json").loads(body["OBJECT"]) == {"a": "A"}
    assert body["STRING"] == "xyz" and body["NUMBER"] == "3" and body["BOOL"] == "true" and body["NULL"] == ""
    out, err = check_streams(*server.streams())
    assert out == "" and err == ""


def test_env_parameters_at_import(server: Any) -> None:
    """init env is visible to module-level code (testEnvParameters)."""
    code = """
import os
somevar = os.environ['SOME_VAR']
another = os.environ['ANOTHER_VAR']
def main(args):
    return {"SOME_VAR": somevar, "ANOTHER_VAR": another}
"""
    assert server.init(code, env={"SOME_VAR": "xyz", "ANOTHER_VAR": ""})[0] == 200
    assert server.run({}) == (200, {"SOME_VAR": "xyz", "ANOTHER_VAR": ""})


def test_activation_environment(start_server: Any, env: dict[str, str]) -> None:
    """confirm expected environment variables: run keys become __OW_*."""
    server = start_server({**env, "__OW_API_HOST": "xyz"})
    code = """
import os
def main(args):
    keys = ("api_host", "api_key", "namespace", "action_name", "action_version", "activation_id", "deadline")
    return {k: os.environ["__OW_" + k.upper()] for k in keys}
"""
    assert server.init(code)[0] == 200
    props = {
        "api_host": "xyz",
        "api_key": "abc",
        "namespace": "zzz",
        "action_name": "xxx",
        "action_version": "0.0.1",
        "activation_id": "iii",
        "deadline": "123",
    }
    assert server.run({}, **props) == (200, props)
    out, err = check_streams(*server.streams())
    assert out == "" and err == ""


def test_large_input(server: Any) -> None:
    """echo a large input (1 MB, passed on stdin)."""
    assert server.init("def main(args):\n    return args\n")[0] == 200
    arg = {"arg": "a" * 1048561}
    assert server.run(arg) == (200, arg)


def test_zip_non_default_entry(server: Any) -> None:
    """support zip-encoded action using non-default entry points."""
    code = make_zip(
        {
            "__main__.py": "from echo import echo\ndef niam(args):\n    return echo(args)\n",
            "echo.py": "def echo(args):\n  return {'echo': args}\n",
        }
    )
    assert server.init(b64(code), main="niam", binary=True)[0] == 200
    args = {"msg": "it works"}
    assert server.run(args) == (200, {"echo": args})
    out, err = check_streams(*server.streams())
    assert out == "" and err == ""


def test_zip_relative_paths(server: Any) -> None:
    """support zip-encoded action which can read from relative paths."""
    code = make_zip(
        {
            "__main__.py": "def main(args):\n    with open('workfile') as f:\n        return {'file': f.read()}\n",
            "workfile": "this is a test string",
        }
    )
    assert server.init(b64(code), binary=True)[0] == 200
    assert server.run({}) == (200, {"file": "this is a test string"})
    out, err = check_streams(*server.streams())
    assert out == "" and err == ""


def test_zip_without_main(server: Any, env: dict[str, str]) -> None:
    """report error if zip-encoded action does not include required file."""
    code = make_zip({"echo.py": "def echo(args):\n  return {'echo': args}\n"})
    status, body = server.init(b64(code), main="echo", binary=True)
    assert status == 502
    if logs_init_errors(env):
        assert body == {"error": "The action failed to generate or locate a binary. See logs for details."}
        out, err = check_streams(*server.streams())
        assert out == "" and "Zip file does not include __main__.py" in err
    else:
        assert "Zip file does not include" in body["error"]


def test_action_error(server: Any) -> None:
    """return on action error when action fails: error result, traceback on stderr."""
    code = "def div(x, y):\n    return x/y\n\ndef main(dict):\n    return {'divBy0': div(5,0)}\n"
    assert server.init(code)[0] == 200
    status, body = server.run({})
    assert status == 200 and body == {"error": "division by zero"}
    out, err = check_streams(*server.streams())
    assert out == "" and "Traceback" in err and "ZeroDivisionError" in err


def test_compilation_errors_logged(server: Any, env: dict[str, str]) -> None:
    """log compilation errors: 502 at init, traceback on stderr."""
    status, _ = server.init('\n 10 PRINT "Hello!"\n 20 GOTO 10\n')
    assert status == 502
    out, err = check_streams(*server.streams(), sentinels=1 if logs_init_errors(env) else 0)
    assert out == "" and "Traceback" in err and "10 PRINT" in err


def test_application_error(server: Any) -> None:
    """support application errors: an error result is a normal 200."""
    assert server.init("def main(args):\n    return {'error': 'sorry'}\n")[0] == 200
    assert server.run({}) == (200, {"error": "sorry"})
    out, err = check_streams(*server.streams())
    assert out == "" and err == ""


def test_unknown_import(server: Any, env: dict[str, str]) -> None:
    """error when importing a not-supported package: detected at init."""
    status, _ = server.init("import iamnotsupported\ndef main(args):\n    return {}\n")
    assert status == 502
    out, err = check_streams(*server.streams(), sentinels=1 if logs_init_errors(env) else 0)
    assert out == "" and "Traceback" in err and "iamnotsupported" in err


def test_sys_executable(server: Any) -> None:
    """have a valid sys.executable."""
    assert server.init("import sys\ndef main(args):\n    return {'sys': sys.executable}\n")[0] == 200
    status, body = server.run({})
    assert status == 200 and "python" in body["sys"]


def test_termination_at_run(server: Any) -> None:
    """detect termination at run: 400 command exited, nothing logged."""
    assert server.init("import sys\ndef main(args):\n  sys.exit(1)\n")[0] == 200
    status, body = server.run({})
    assert status == 400 and "command exited" in body["error"]
    out, err = check_streams(*server.streams())
    assert out == "" and err == ""


def test_termination_at_init(server: Any, env: dict[str, str]) -> None:
    """detect termination at init: sys.exit() at import fails the init."""
    status, body = server.init("import sys\nsys.exit(1)\ndef main(args):\n   pass\n")
    assert status == 502
    if logs_init_errors(env):
        assert "Cannot start action" in body["error"]
        out, err = check_streams(*server.streams())
        assert out == "" and "Command exited abruptly during initialization." in err
    else:
        assert body == {"error": "cannot start action: Command exited abruptly during initialization."}


def test_read_env_at_import(server: Any) -> None:
    """read an environment variable and print it at import."""
    code = "import os\nX = os.getenv('X')\nprint(X)\ndef main(args):\n   return {'body': 'ok'}\n"
    assert server.init(code, env={"X": "xyz"})[0] == 200
    assert server.run({}) == (200, {"body": "ok"})
    out, err = check_streams(*server.streams())
    assert "xyz" in out and err == ""


def build_virtualenv_zip(folder: Path, with_main: bool = True, valid: bool = True) -> bytes:
    """A real `python -m venv`, with a module in its site-packages, zipped."""
    venv = folder / "virtualenv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    packages = next(venv.glob("lib/python3*/site-packages"))
    (packages / "agentlib.py").write_text("AGENT = 'actionloop-test-agent'\n")
    files: dict[str, str | bytes] = {}
    if with_main:
        files["__main__.py"] = (
            "import agentlib\n"
            "def main(args):\n    return {'agent': agentlib.AGENT}\n"
            "def naim(args):\n    return {'agent': agentlib.AGENT, 'entry': 'naim'}\n"
        )
    for path in sorted(venv.rglob("*")):
        if path.is_file() and (valid or "bin" not in path.relative_to(folder).parts):
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return make_zip(files)


@pytest.mark.parametrize("main", ["main", "naim"])
def test_virtualenv_zip(server: Any, tmp_path: Path, main: str) -> None:
    """run zipped Python action containing a virtual environment (both entries)."""
    code = build_virtualenv_zip(tmp_path)
    assert server.init(b64(code), main=main, binary=True) == (200, {"ok": True})
    status, body = server.run({})
    assert status == 200 and body["agent"] == "actionloop-test-agent"


def test_virtualenv_zip_wrong_main_module(server: Any, tmp_path: Path, env: dict[str, str]) -> None:
    """report error if zipped Python action has wrong main module name."""
    code = build_virtualenv_zip(tmp_path, with_main=False)
    status, body = server.init(b64(code), binary=True)
    assert status == 502
    if logs_init_errors(env):
        out, err = check_streams(*server.streams())
        assert out == "" and "Zip file does not include __main__.py" in err
    else:
        assert "Zip file does not include __main__.py" in body["error"]


def test_virtualenv_zip_invalid(server: Any, tmp_path: Path, env: dict[str, str]) -> None:
    """report error if zipped Python action has invalid virtualenv directory."""
    code = build_virtualenv_zip(tmp_path, valid=False)
    status, body = server.init(b64(code), binary=True)
    assert status == 502
    if logs_init_errors(env):
        out, err = check_streams(*server.streams())
        assert out == "" and "Zip file does not include /virtualenv/bin/" in err
    else:
        assert "Invalid virtualenv. Zip file does not include /virtualenv/bin/" in body["error"]

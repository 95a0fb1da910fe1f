"""The rest of contract part A against the real server: generic actions,
OW_COMPILER, OW_EXECUTION_ENV, -compile, debug re-init, bad input."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

from conftest import ACTIONLOOP, EXAMPLES, IMAGE_ENV, TIME_FACTOR, b64, check_streams, clean_env, concurrently, make_zip

BASH_ECHO = (
    '#!/bin/bash\n[ -n "$__OW_WAIT_FOR_ACK" ] && echo \'{"ok": true}\' >&3\nwhile read -r l; do echo "$l" >&3; done\n'
)


def test_bad_bodies(start_server: Any) -> None:
    """Non-JSON bodies get 400 with a clear message; /run before /init gets 500."""
    server = start_server(IMAGE_ENV)
    status, body = server.post("/init", b"{oops")
    assert status == 400 and "could not be parsed" in body["error"]
    assert server.init("AAA=!", binary=True)[0] == 400
    assert server.run({}) == (500, {"error": "no action defined yet"})
    assert server.post("/run", b"[1")[0] == 400


def test_generic_bash_action(start_server: Any) -> None:
    """A `#!/bin/bash` source is run as-is; it sees the whole activation line."""
    server = start_server(IMAGE_ENV)
    assert server.init(BASH_ECHO) == (200, {"ok": True})
    status, body = server.run({"a": "❄"}, activation_id="id1")
    assert status == 200 and body == {"value": {"a": "❄"}, "activation_id": "id1"}


def test_generic_zip_exec_and_bad_result(start_server: Any) -> None:
    """A zip holding an executable exec is generic; a non-JSON answer is 502."""
    server = start_server()
    code = make_zip({"exec": "#!/bin/bash\nwhile read -r l; do echo 'plain text' >&3; done\n"}, modes={"exec": 0o755})
    assert server.init(b64(code), binary=True)[0] == 200
    assert server.run({}) == (502, {"error": "The action did not return a dictionary or array."})
    check_streams(*server.streams())


def test_wait_for_ack_required(start_server: Any) -> None:
    """With OW_WAIT_FOR_ACK a program must ack: exiting or staying silent fails the init."""
    server = start_server({"OW_WAIT_FOR_ACK": "1", "OW_START_TIMEOUT": "1", "OW_DEBUG": "1"})
    status, body = server.init("#!/bin/bash\nexit 0\n")
    assert (status, body) == (502, {"error": "cannot start action: Command exited abruptly during initialization."})
    status, body = server.init("#!/bin/bash\nsleep 30\n")
    assert status == 502 and "did not acknowledge start-up within 1s" in body["error"]


def test_environment_passthrough(start_server: Any) -> None:
    """__OW_* of the server's environment, the proxy version and the execution env reach the action."""
    server = start_server({**IMAGE_ENV, "__OW_API_HOST": "https://ow.example"})
    code = "import os\ndef main(a):\n    return {k: os.environ.get(k) for k in ('__OW_API_HOST', '__OW_PROXY_VERSION', '__OW_EXECUTION_ENV', '__OW_WAIT_FOR_ACK')}\n"
    assert server.init(code)[0] == 200
    status, body = server.run({})
    assert status == 200 and body["__OW_API_HOST"] == "https://ow.example"
    assert body["__OW_PROXY_VERSION"] and body["__OW_EXECUTION_ENV"] == IMAGE_ENV["OW_EXECUTION_ENV"]
    assert body["__OW_WAIT_FOR_ACK"] == "1"


def test_compiler(start_server: Any, tmp_path: Path) -> None:
    """OW_COMPILER turns sources into BIN/exec; any output it prints is the failure."""
    compiler = tmp_path / "compile"
    compiler.write_text(
        "#!/bin/bash\n"
        'if grep -q FAIL "$2/exec"; then echo "syntax error in $1"; exit 0; fi\n'
        'printf \'#!/bin/bash\\nwhile read -r l; do echo "{\\\\"main\\\\": \\\\"%s\\\\"}" >&3; done\\n\' "$1" > "$3/exec"\n'
        'chmod +x "$3/exec"\n'
    )
    compiler.chmod(0o755)
    server = start_server({"OW_COMPILER": str(compiler), "OW_DEBUG": "1"})
    assert server.init("FAIL", main="hello") == (502, {"error": "syntax error in hello"})
    assert server.init("some source", main="hello") == (200, {"ok": True})
    assert server.run({}) == (200, {"main": "hello"})


def compile_with(code: bytes, main: str, env: dict[str, str], folder: Path) -> bytes:
    done = subprocess.run(
        [ACTIONLOOP, "-compile", main],
        input=code,
        capture_output=True,
        check=False,
        env=clean_env(env),
        cwd=folder,
        timeout=30 * TIME_FACTOR,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_compile_then_init(start_server: Any, tmp_path: Path) -> None:
    """-compile MAIN writes a prepared zip that a runtime initialises and runs."""
    prepared = compile_with((EXAMPLES / "hello.py").read_bytes(), "main", IMAGE_ENV, tmp_path)
    server = start_server(IMAGE_ENV)
    assert server.init(b64(prepared), binary=True)[0] == 200
    assert server.run({"name": "compiled"}) == (200, {"greeting": "Hello, compiled!"})


def test_execution_env_mismatch(start_server: Any, tmp_path: Path) -> None:
    """An action prepared for another execution environment refuses to start."""
    prepared = compile_with((EXAMPLES / "hello.py").read_bytes(), "main", {"OW_EXECUTION_ENV": "other/env"}, tmp_path)
    server = start_server({"OW_EXECUTION_ENV": "this/env"})
    status, body = server.init(b64(prepared), binary=True)
    assert status == 502 and "Execution environment version mismatch" in body["error"]
    logged = start_server({**IMAGE_ENV})
    status, body = logged.init(b64(prepared), binary=True)
    assert status == 502 and body == {"error": "Cannot start action. Check logs for details."}


def test_debug_reinit_keeps_working_action(start_server: Any) -> None:
    """In debug mode /init may repeat; a failed one leaves the working action serving."""
    server = start_server({"OW_DEBUG": "1"})
    assert server.init("def main(a):\n    return {'v': 1}\n")[0] == 200
    assert server.init("def main(a):\n    return {'v': \n")[0] == 502
    assert server.run({}) == (200, {"v": 1})
    assert server.init("def main(a):\n    return {'v': 2}\n")[0] == 200
    assert server.run({}) == (200, {"v": 2})
    folders = sorted(p.name for p in (server.folder / "action").iterdir())
    assert folders == ["1", "2", "3"]


def test_zip_slip_and_broken_zip(start_server: Any, tmp_path: Path) -> None:
    """Escaping zips and broken zips fail the init (502) and write nothing outside."""
    server = start_server({"OW_DEBUG": "1"})
    evil = make_zip({"__main__.py": "def main(a):\n    return a\n", "../../escaped.txt": "x"})
    status, body = server.init(b64(evil), binary=True)
    assert status == 502 and "outside the action folder" in body["error"]
    assert not list(tmp_path.rglob("escaped.txt"))
    status, body = server.init(base64.b64encode(b"PK\x03\x04broken").decode(), binary=True)
    assert status == 502 and "Cannot unpack the zip" in body["error"]


def test_archive_size_limit(start_server: Any) -> None:
    """OW_MAX_ARCHIVE bounds what a zip may expand to."""
    server = start_server({"OW_MAX_ARCHIVE": "100000"})
    status, body = server.init(b64(make_zip({"__main__.py": "#" * 200000})), binary=True)
    assert status == 502 and "over the limit" in body["error"]


def test_body_size_limit(start_server: Any) -> None:
    """A body over OW_MAX_BODY gets 413 with a JSON error; the server serves on."""
    server = start_server({"OW_MAX_BODY": "2000000"})
    assert server.init("def main(a):\n    return {'n': len(a['s'])}\n")[0] == 200
    status, body = server.post("/run", json.dumps({"value": {"s": "x" * 3000000}}).encode())
    assert status == 413 and "larger than" in body["error"]
    assert server.run({"s": "xy"}) == (200, {"n": 2})


def test_debug_flag_allows_reinit(start_server: Any) -> None:
    """The reference's -debug flag allows a second /init."""
    server = start_server(args=["-debug"])
    assert server.init("def main(a):\n    return {'v': 1}\n")[0] == 200
    assert server.init("def main(a):\n    return {'v': 2}\n")[0] == 200
    assert server.run({}) == (200, {"v": 2})


def test_version_flag() -> None:
    """-version prints the version."""
    done = subprocess.run([ACTIONLOOP, "-version"], capture_output=True, check=False, timeout=30 * TIME_FACTOR)
    assert done.returncode == 0 and done.stdout.startswith(b"actionloop ")


def get(server: Any, path: str) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(server.url + path, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_health_and_readiness(start_server: Any) -> None:
    """/healthz answers while alive; /readyz only once an action is initialised."""
    server = start_server(IMAGE_ENV)
    assert get(server, "/healthz")[0] == 200
    status, body = get(server, "/readyz")
    assert status == 503 and json.loads(body)["initialized"] is False
    assert server.init("def main(a):\n    return a\n")[0] == 200
    assert get(server, "/readyz")[0] == 200
    out, err = check_streams(*server.streams(), sentinels=0)
    assert out == "" and err == ""


def test_demo_page(start_server: Any) -> None:
    """OW_DEMO serves a page at / that connects to the WebSocket path."""
    server = start_server({"OW_WEBSOCKET": "/hello", "OW_DEMO": "1", "OW_AUTOINIT": str(EXAMPLES / "hello.py")})
    status, body = get(server, "/")
    assert status == 200 and b'data-ws-path="/hello"' in body and b"<button" in body
    assert get(start_server({"OW_WEBSOCKET": "/hello"}), "/")[0] == 404


def test_max_result_on_every_line(start_server: Any) -> None:
    """A 5,010-byte result with OW_MAX_RESULT=100 is refused with 502; the process serves on."""
    server = start_server({**IMAGE_ENV, "OW_MAX_RESULT": "100"})
    code = "import os\ndef main(a):\n    return {'pad': 'x' * a.get('size', 0), 'pid': os.getpid()}\n"
    assert server.init(code)[0] == 200
    assert server.run({"size": 5000}) == (502, {"error": "The action's result is larger than 100 bytes."})
    status, small = server.run({"size": 10})
    assert status == 200 and small["pad"] == "x" * 10
    status, again = server.run({"size": 10})
    assert again["pid"] == small["pid"]  # the same process: nothing was killed
    assert server.run({"size": 200_000})[0] == 502  # over the limit in several reads too
    status, last = server.run({})
    assert status == 200 and last["pid"] == small["pid"]


def test_concurrent_inits_with_requirements_in_debug_mode(start_server: Any, tmp_path: Path) -> None:
    """60 /init at once, 6 by 6, in debug mode, each running pip in a thread while
    the previous action's processes stop: every one succeeds.

    A stopped process's result pipe was closed twice under uvloop (by libuv,
    then through its file object), and the second close could hit a pipe that
    pip's thread had just been given: 4 to 9 in 60 failed with EBADF.
    """
    from test_compile import USES_TINYDEP, wheel_folder

    wheels = wheel_folder(tmp_path)
    server = start_server({"OW_DEBUG": "1", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)})
    code = b64(make_zip({"__main__.py": USES_TINYDEP, "requirements.txt": "tinydep==1.0\n"}))
    answers: list[tuple[int, Any]] = []
    for _ in range(10):
        concurrently(6, lambda _: answers.append(server.init(code, binary=True)))
    assert answers == [(200, {"ok": True})] * 60

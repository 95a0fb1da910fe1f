"""`actionloop -compile MAIN` with a `requirements.txt`: the virtualenv is
built by pip from a local wheel folder (no network), and the prepared zip
runs on a real runtime; it holds neither pip nor stale bytecode; a
requirement pip cannot find fails loudly.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from conftest import ACTIONLOOP, IMAGE_ENV, ROOT, TIME_FACTOR, b64, clean_env, free_port, make_zip

# pip builds a virtualenv: seconds, more on one slow CPU (a minute with ensurepip).
TIMEOUT = 120 * TIME_FACTOR
# The prepared zip of test_compile_installs_requirements: 8.2 MB while the
# virtualenv had pip and setuptools in it, 20 KB since.
SMALL_ZIP = 64 * 1024

USES_TINYDEP = """\
import tinydep

def main(args):
    return {"said": tinydep.hello(args.get("name", "")), "from": tinydep.__file__}
"""


def record_line(name: str, data: bytes) -> str:
    """One RECORD row of a wheel: path, sha256 (urlsafe base64, no padding), size."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(folder: Path, name: str = "tinydep", version: str = "1.0") -> Path:
    """A pure-Python wheel made by hand: a package, METADATA, WHEEL and RECORD."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"def hello(who):\n    return '{name} {version} greets ' + who\n".encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: by-hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [record_line(path, data) for path, data in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def wheel_folder(tmp_path: Path, name: str = "tinydep", version: str = "1.0") -> Path:
    """tmp_path/wheels, holding one wheel made by hand: what PIP_FIND_LINKS points at."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, name, version)
    return wheels


def compile_action(code: bytes, wheels: Path, folder: Path) -> subprocess.CompletedProcess[bytes]:
    """`actionloop -compile main` with pip kept off the network, to the wheel folder only."""
    env = {**IMAGE_ENV, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    return subprocess.run(
        [ACTIONLOOP, "-compile", "main"],
        input=code,
        capture_output=True,
        check=False,
        env=clean_env(env),
        cwd=folder,
        timeout=TIMEOUT,
    )


def test_compile_installs_requirements(start_server: Any, tmp_path: Path) -> None:
    """requirements.txt becomes virtualenv/ in the prepared zip, and the action runs with it."""
    wheels = wheel_folder(tmp_path)
    source = make_zip({"__main__.py": USES_TINYDEP, "requirements.txt": "tinydep==1.0\n"})
    done = compile_action(source, wheels, tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    with zipfile.ZipFile(io.BytesIO(done.stdout)) as prepared:
        names = prepared.namelist()
        links = [info.filename for info in prepared.infolist() if stat.S_ISLNK(info.external_attr >> 16)]
    assert any(
        n.startswith("virtualenv/lib/python3.") and n.endswith("site-packages/tinydep/__init__.py") for n in names
    )
    assert "requirements.txt" in names and not links
    assert not any(n.startswith("virtualenv/bin/python") for n in names)
    # Only what requirements.txt asked for: it fits a ConfigMap (1 MiB) with room to spare.
    assert not any(f"site-packages/{tool}/" in n for n in names for tool in ("pip", "setuptools"))
    assert len(done.stdout) < SMALL_ZIP, len(done.stdout)

    server = start_server(IMAGE_ENV)
    assert server.init(b64(done.stdout), binary=True) == (200, {"ok": True})
    status, body = server.run({"name": "Mike"})
    assert status == 200 and body["said"] == "tinydep 1.0 greets Mike"
    assert body["from"].startswith(str(server.folder / "action"))
    assert "/virtualenv/lib/python3." in body["from"]


def test_compile_keeps_a_shipped_virtualenv(tmp_path: Path) -> None:
    """An action with its own virtualenv/ keeps it as it is: requirements.txt is not read."""
    venv_module = "virtualenv/lib/python3.11/site-packages/shipped.py"
    files: dict[str, str | bytes] = {
        "__main__.py": "import shipped\ndef main(args):\n    return {}\n",
        "requirements.txt": "no-such-requirement==1\n",
        "virtualenv/bin/activate": "",
        venv_module: "X = 1\n",
    }
    done = compile_action(make_zip(files), tmp_path, tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    with zipfile.ZipFile(io.BytesIO(done.stdout)) as prepared:
        venv = sorted(n for n in prepared.namelist() if n.startswith("virtualenv/"))
    assert venv == ["virtualenv/bin/activate", venv_module]


def test_compile_fails_when_pip_fails(tmp_path: Path) -> None:
    """A requirement pip cannot find: non-zero exit, nothing on stdout, pip's reason on stderr."""
    source = make_zip({"__main__.py": USES_TINYDEP, "requirements.txt": "no-such-requirement==1.0\n"})
    done = compile_action(source, tmp_path, tmp_path)
    assert done.returncode != 0
    assert done.stdout == b""
    err = done.stderr.decode()
    assert err.startswith("cannot install requirements.txt: pip exited with status 1\n"), err
    assert "No matching distribution found for no-such-requirement==1.0" in err
    assert len(err.splitlines()) <= 21


def test_init_installs_requirements_too(start_server: Any, tmp_path: Path) -> None:
    """As in the official image, /init builds the virtualenv as well; pip's failure is the 502's reason."""
    wheels = wheel_folder(tmp_path)
    server = start_server({"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)})
    missing = make_zip({"__main__.py": USES_TINYDEP, "requirements.txt": "tinydep==2.0\n"})
    status, body = server.init(b64(missing), binary=True)
    assert status == 502 and body["error"].startswith("cannot install requirements.txt: pip exited with status 1\n")
    assert "No matching distribution found for tinydep==2.0" in body["error"]
    good = make_zip({"__main__.py": USES_TINYDEP, "requirements.txt": "tinydep==1.0\n"})
    assert server.init(b64(good), binary=True) == (200, {"ok": True})
    status, body = server.run({"name": "Ann"})
    assert status == 200 and body["said"] == "tinydep 1.0 greets Ann"


def test_compile_ignores_what_the_runtime_has(tmp_path: Path) -> None:
    """A requirement the runtime's own environment satisfies still lands in the action's virtualenv."""
    # The runtime's own pip installs: it must look at the new virtualenv, not
    # at its own site-packages, where aiohttp has put multidict.
    assert importlib.metadata.version("multidict") != "0.0.1"
    wheels = wheel_folder(tmp_path, "multidict", "0.0.1")
    source = make_zip(
        {"__main__.py": "import multidict\ndef main(args):\n    return {}\n", "requirements.txt": "multidict\n"}
    )
    done = compile_action(source, wheels, tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    with zipfile.ZipFile(io.BytesIO(done.stdout)) as prepared:
        names = prepared.namelist()
    assert any(n.endswith("site-packages/multidict-0.0.1.dist-info/METADATA") for n in names)


def test_build_virtualenv_without_the_runtimes_pip(tmp_path: Path) -> None:
    """A runtime Python with no pip of its own puts pip in the virtualenv and installs with that."""
    wheels = wheel_folder(tmp_path)
    action = tmp_path / "action"
    action.mkdir()
    (action / "requirements.txt").write_text("tinydep==1.0\n")
    # -S: no site-packages, so no pip; the package from its source folder.
    code = "import sys; from pathlib import Path; from actionloop.prepare import build_virtualenv as b; b(Path(sys.argv[1]))"
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, str(action)],
        capture_output=True,
        check=False,
        env=clean_env(env),
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr.decode()
    packages = list((action / "virtualenv").glob("lib/python3.*/site-packages"))
    assert len(packages) == 1
    assert (packages[0] / "tinydep" / "__init__.py").is_file() and (packages[0] / "pip").is_dir()


# Records every source that Python compiles from here on, so the action can
# say whether its dependency, its own module and the launcher needed it.
CHECKS_BYTECODE = """\
import sys

compiled = []


def audit(event, args):
    if event == "compile" and isinstance(args[1], str):
        compiled.append(args[1])


sys.addaudithook(audit)
import importlib.machinery
import os

import tinydep


def main(args):
    here = os.path.dirname(__file__)
    # The check an import makes, for the two modules imported before the hook.
    for name in ("__main__", "actionloop_launcher"):
        importlib.machinery.SourceFileLoader(name, os.path.join(here, name + ".py")).get_code(name)
    return {"compiled": compiled, "dont_write": sys.flags.dont_write_bytecode, "said": tinydep.hello("B")}
"""


def pyc_flags(data: bytes) -> int:
    """The flags word of a .pyc header (PEP 552): 0 timestamp, 0b11 checked hash."""
    return int.from_bytes(data[4:8], "little")


def test_compiled_bytecode_survives_unpack(start_server: Any, tmp_path: Path) -> None:
    """The zip's bytecode is checked by hash, so after an unpack (new file times) nothing is compiled again."""
    wheels = wheel_folder(tmp_path)
    source = make_zip({"__main__.py": CHECKS_BYTECODE, "requirements.txt": "tinydep==1.0\n"})
    done = compile_action(source, wheels, tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    with zipfile.ZipFile(io.BytesIO(done.stdout)) as prepared:
        flags = {n: pyc_flags(prepared.read(n)) for n in prepared.namelist() if n.endswith(".pyc")}
    assert any("/site-packages/tinydep/__pycache__/" in n for n in flags)
    assert f"__pycache__/__main__.{sys.implementation.cache_tag}.pyc" in flags
    assert set(flags.values()) == {0b11}, flags

    # As in the image: Python saves no bytecode, so a stale .pyc stays stale.
    server = start_server({**IMAGE_ENV, "PYTHONDONTWRITEBYTECODE": "1"})
    assert server.init(b64(done.stdout), binary=True) == (200, {"ok": True})
    assert server.run({}) == (200, {"compiled": [], "dont_write": 1, "said": "tinydep 1.0 greets B"})


def test_autoinit_pip_failure_is_one_line(tmp_path: Path) -> None:
    """An auto-init whose requirements.txt cannot be installed: pip's reason in the one log line, exit non-zero."""
    action = tmp_path / "action.zip"
    action.write_bytes(make_zip({"__main__.py": USES_TINYDEP, "requirements.txt": "no-such-requirement==1.0\n"}))
    # Without OW_LOG_INIT_ERROR, which logs the reason as the action's own lines first.
    env = {"OW_WEBSOCKET": "/hello", "OW_AUTOINIT": str(action), "OW_WAIT_FOR_ACK": "1"}
    done = subprocess.run(
        [ACTIONLOOP, "--port", str(free_port())],
        cwd=tmp_path,
        env=clean_env({**env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}),
        capture_output=True,
        check=False,
        timeout=TIMEOUT,
    )
    assert done.returncode != 0
    lines = done.stderr.decode().splitlines()
    mentions = [line for line in lines if "auto-init" in line]
    assert len(mentions) == 1 and str(action) in mentions[0], lines
    assert "pip exited with status 1; " in mentions[0]
    assert [line for line in lines if "No matching distribution found" in line] == mentions, lines


# The runtime's own secrets, in every form its environment holds them.
SECRETS = {
    "OW_API_TOKEN": "api-token-6d1f",
    "OW_WEBSOCKET_TOKEN": "ws-token-93ab",
    "OW_REDIS_URL": "redis://:redis-password-7c2e@127.0.0.1:1/0",
    "__OW_API_KEY": "ow-key-51d0",
    "ACTIONLOOP_PRIVATE": "private-0e8a",
}
READS_ENVIRON = make_zip(
    {"__main__.py": "def main(args):\n    return {}\n", "requirements.txt": "-r /proc/self/environ\n"}
)


def assert_no_secret(text: str) -> None:
    leaked = [key for key, value in SECRETS.items() if value in text or "7c2e" in text]
    assert not leaked, text


def test_pip_gets_no_runtime_secret_at_compile(tmp_path: Path) -> None:
    """`-r /proc/self/environ`: pip echoes its environment, which holds none of the runtime's variables."""
    done = subprocess.run(
        [ACTIONLOOP, "-compile", "main"],
        input=READS_ENVIRON,
        capture_output=True,
        check=False,
        env=clean_env({**SECRETS, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}),
        cwd=tmp_path,
        timeout=TIMEOUT,
    )
    err = done.stderr.decode()
    assert done.returncode == 1 and "Invalid requirement" in err and "PIP_NO_INDEX=1" in err, err
    assert_no_secret(err)


def test_pip_gets_no_runtime_secret_at_init(start_server: Any, tmp_path: Path) -> None:
    """The same at /init: the 502 shows pip's environment, not the runtime's secrets."""
    env = {**SECRETS, "OW_API_PORT": str(free_port()), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    env.pop("OW_REDIS_URL")  # a runtime with it would need a Redis; pip's side is the same
    server = start_server(env)
    value = {"code": b64(READS_ENVIRON), "main": "main", "binary": True}
    status, body = server.post(f"/init?token={SECRETS['OW_WEBSOCKET_TOKEN']}", {"value": value})
    assert status == 502 and "Invalid requirement" in body["error"] and "PIP_FIND_LINKS=" in body["error"], body
    assert_no_secret(body["error"] + server.err())


def test_runtime_environment_file_is_redacted(start_server: Any, tmp_path: Path) -> None:
    """`-r /proc/<the runtime's pid>/environ` (in a pod, /proc/1): pip quotes it, but not our secrets."""
    env = {**SECRETS, "OW_API_PORT": str(free_port()), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    env.pop("OW_REDIS_URL")
    server = start_server(env)
    reads = f"-r /proc/{server.process.pid}/environ\n"
    code = make_zip({"__main__.py": "def main(args):\n    return {}\n", "requirements.txt": reads})
    value = {"code": b64(code), "main": "main", "binary": True}
    status, body = server.post(f"/init?token={SECRETS['OW_WEBSOCKET_TOKEN']}", {"value": value})
    assert status == 502 and "Invalid requirement" in body["error"] and "[redacted]" in body["error"], body
    assert_no_secret(body["error"] + server.err())


# A local package whose build backend is its own (PEP 517 backend-path), so
# pip builds it, editable or not, with nothing to download.
LOCAL_PYPROJECT = """\
[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]
"""
LOCAL_BACKEND = """\
import base64, hashlib, os, zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
INFO = "tinylocal-1.0.dist-info"


def _wheel(directory, files):
    files = {
        **files,
        INFO + "/METADATA": b"Metadata-Version: 2.1\\nName: tinylocal\\nVersion: 1.0\\n",
        INFO + "/WHEEL": b"Wheel-Version: 1.0\\nGenerator: backend\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[INFO + "/RECORD"] = ("\\n".join([*record, INFO + "/RECORD,,"]) + "\\n").encode()
    name = "tinylocal-1.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(directory, name), "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
    return name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open(os.path.join(HERE, "tinylocal.py"), "rb") as source:
        return _wheel(wheel_directory, {"tinylocal.py": source.read()})


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    # As an editable install does: a .pth naming the source folder.
    return _wheel(wheel_directory, {"tinylocal_editable.pth": HERE.encode() + b"\\n"})
"""
USES_TINYLOCAL = "import tinylocal\n\ndef main(args):\n    return {'said': tinylocal.SAID}\n"


def local_package_action(requirement: str) -> bytes:
    return make_zip(
        {
            "__main__.py": USES_TINYLOCAL,
            "requirements.txt": requirement + "\n",
            "tinylocal/pyproject.toml": LOCAL_PYPROJECT,
            "tinylocal/backend.py": LOCAL_BACKEND,
            "tinylocal/tinylocal.py": "SAID = 'local'\n",
        }
    )


def test_editable_install_refused(start_server: Any, tmp_path: Path) -> None:
    """`-e ./pkg` fails -compile (it would point at the deleted build folder); `./pkg` installs and runs."""
    done = compile_action(local_package_action("-e ./tinylocal"), tmp_path, tmp_path)
    err = done.stderr.decode()
    assert done.returncode == 1 and done.stdout == b"", err
    assert err.startswith(
        "requirements.txt: `-e` (editable) installs point outside the action and cannot be moved;"
        " list the path without -e (tinylocal-1.0.dist-info)"
    ), err

    done = compile_action(local_package_action("./tinylocal"), tmp_path, tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    server = start_server(IMAGE_ENV)
    assert server.init(b64(done.stdout), binary=True) == (200, {"ok": True})
    assert server.run({}) == (200, {"said": "local"})

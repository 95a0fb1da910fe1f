"""`actionloop -compile MAIN` with a `requirements.txt`: the virtualenv is
built by pip from a local wheel folder (no network), and the prepared zip
runs on a real runtime; a requirement pip cannot find fails loudly.
"""

from __future__ import annotations

import base64
import hashlib
import io
import stat
import subprocess
import zipfile
from pathlib import Path
from typing import Any

from conftest import ACTIONLOOP, IMAGE_ENV, TIME_FACTOR, b64, clean_env, make_zip

# pip builds a virtualenv, with pip itself in it: seconds, more on one slow CPU.
TIMEOUT = 120 * TIME_FACTOR

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
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels)
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
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels)
    server = start_server({"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)})
    missing = make_zip({"__main__.py": USES_TINYDEP, "requirements.txt": "tinydep==2.0\n"})
    status, body = server.init(b64(missing), binary=True)
    assert status == 502 and body["error"].startswith("cannot install requirements.txt: pip exited with status 1\n")
    assert "No matching distribution found for tinydep==2.0" in body["error"]
    good = make_zip({"__main__.py": USES_TINYDEP, "requirements.txt": "tinydep==1.0\n"})
    assert server.init(b64(good), binary=True) == (200, {"ok": True})
    status, body = server.run({"name": "Ann"})
    assert status == 200 and body["said"] == "tinydep 1.0 greets Ann"

"""Turn unpacked code into a runnable action folder with an `exec` in it.

Three kinds of action (contract part A, POST /init):
- an executable `exec` (ELF or `#!`): a generic ActionLoop program, run as-is;
- with `OW_COMPILER` set: `compiler MAIN SRC BIN` must produce `BIN/exec`;
- otherwise Python: `__main__.py` (a lone source arrives as `exec`), run by
  our launcher, which acknowledges on fd 3 once the module is imported. A
  `requirements.txt` beside it is installed into a new `virtualenv/` first,
  as the official OpenWhisk Python image's compile step does.

Bytecode is saved checked by hash (PEP 552), never by time stamp: an unpack
gives every file a new time, which would make time-stamped bytecode stale in
every process started for the action (our image saves none, as the official
one: PYTHONDONTWRITEBYTECODE). A hash stays true as long as the source does.
"""

from __future__ import annotations

import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .archive import mark_executable
from .errors import PrepareError

LAUNCHER = "actionloop_launcher.py"
# Beside it, for actions that push through the management API (api_client.py).
API_CLIENT = "actionloop_api.py"
# Present in a folder whose `exec` always acknowledges start-up on fd 3.
ACK_MARKER = "exec.ack"
# Present in a folder whose `exec` is our launcher, which tags its results (core.py).
TAG_MARKER = "exec.tagged"
EXEC_ENV = "exec.env"
VIRTUALENV = "virtualenv"
REQUIREMENTS = "requirements.txt"
# How much of pip's output a failure reports: it says what went wrong last.
OUTPUT_LINES = 20
# Checked rather than unchecked: Python then hashes each source it imports,
# which costs nothing measurable (importing aiohttp, yaml and redis: 0.30 s
# either way), and a source edited after the build is still what runs.
BYTECODE = py_compile.PycInvalidationMode.CHECKED_HASH
# `pip --python`: the runtime's pip installs into another environment.
PIP_PYTHON_OPTION = (22, 3)
# The runtime's own variables, kept from the build steps: they hold its
# secrets (OW_API_TOKEN, OW_WEBSOCKET_TOKEN, OW_REDIS_URL's password, the
# __OW_ keys), and pip echoes what it reads (`-r /proc/self/environ` puts the
# environment in its error, hence in a 502 or -compile's stderr).
PRIVATE_ENV = ("OW_", "__OW_", "ACTIONLOOP_")
EDITABLE = (
    "requirements.txt: `-e` (editable) installs point outside the action and cannot be moved; list the path without -e"
)

STUB = """#!{python}
# Written by actionloop: runs the entry point of __main__.py in the
# ActionLoop protocol (see actionloop_launcher.py beside this file).
import actionloop_launcher

actionloop_launcher.main({main!r})
"""


def prepare(src: Path, dest: Path, main: str, compiler: str = "", execution_env: str = "") -> Path:
    """Build `dest` from the unpacked `src`; return the `exec` to start."""
    if mark_executable(src / "exec"):
        src.rename(dest)
    elif compiler:
        _compile(compiler, main, src, dest)
    else:
        _prepare_python(src, dest, main)
    if execution_env and not (dest / EXEC_ENV).exists():
        (dest / EXEC_ENV).write_text(execution_env)
    return dest / "exec"


def _compile(compiler: str, main: str, src: Path, dest: Path) -> None:
    dest.mkdir()
    try:
        done = subprocess.run(
            [compiler, main, str(src), str(dest)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
    except OSError as exc:
        raise PrepareError(f"cannot run the compiler {compiler}: {exc}") from exc
    # The reference treats any output of the compiler as the failure to report.
    output = (done.stdout + done.stderr).decode(errors="replace").strip()
    if output or done.returncode != 0:
        raise PrepareError(output or f"the compiler exited with status {done.returncode}")
    if not mark_executable(dest / "exec"):
        raise PrepareError("the compiler did not produce an executable exec")


def _prepare_python(src: Path, dest: Path, main: str) -> None:
    entry = src / "__main__.py"
    if not entry.exists() and (src / "exec").is_file():
        (src / "exec").rename(entry)
    if not entry.is_file():
        # The OpenWhisk suite looks for "Zip file does not include".
        raise PrepareError("Zip file does not include __main__.py")
    _check_virtualenv(src / VIRTUALENV)
    src.rename(dest)
    # In its final folder, so the paths compiled into its bytecode are right.
    build_virtualenv(dest)
    (dest / LAUNCHER).write_bytes(Path(__file__).with_name("launcher.py").read_bytes())
    if not (dest / API_CLIENT).exists():  # the action's own file of that name wins
        (dest / API_CLIENT).write_bytes(Path(__file__).with_name("api_client.py").read_bytes())
    (dest / "exec").write_text(STUB.format(python=sys.executable, main=main))
    (dest / "exec").chmod(0o755)
    (dest / ACK_MARKER).touch()
    (dest / TAG_MARKER).touch()
    _save_bytecode(dest / LAUNCHER, dest / "__main__.py")


def _save_bytecode(*sources: Path) -> None:
    """Compile the launcher and the action's module once, at init.

    With PYTHONDONTWRITEBYTECODE (set in our image) Python saves nothing it
    compiles, so every process started for the action (restarts, one per
    connection) would compile both anew. A module that does not compile is
    skipped: importing it reports the error, as before.
    """
    for source in sources:
        try:
            py_compile.compile(str(source), doraise=True, invalidation_mode=BYTECODE)
        except py_compile.PyCompileError:
            pass


def _check_virtualenv(venv: Path) -> None:
    """A `virtualenv/` folder must be one the launcher can activate."""
    if not venv.is_dir():
        return
    if (venv / "bin" / "activate_this.py").is_file():
        return
    if (venv / "bin").is_dir() and any(venv.glob("lib/python3*/site-packages")):
        return
    raise PrepareError("Invalid virtualenv. Zip file does not include /virtualenv/bin/activate_this.py")


def build_virtualenv(folder: Path) -> None:
    """Install `requirements.txt` into a new `virtualenv/`, if there is one.

    As the official image's compile step: an action that ships its own
    `virtualenv/` keeps it, and its requirements.txt is not read.
    """
    venv = folder / VIRTUALENV
    if not (folder / REQUIREMENTS).is_file() or venv.exists():
        return
    # The runtime's own Python: the launcher runs the action with it, so the
    # packages must be built for this very interpreter. Its own pip, when it
    # has a recent one, installs into the virtualenv (it runs as the
    # virtualenv's Python, so it sees only what is installed there), and pip
    # and setuptools stay out of the action: 20 MB less, and a small action
    # fits a Kubernetes ConfigMap.
    own_pip = _has_pip_python_option()
    venv_step = [sys.executable, "-m", "venv", *(["--without-pip"] if own_pip else []), str(venv)]
    _build_step(venv_step, folder, f"cannot create {VIRTUALENV}/: venv")
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python] if own_pip else [python, "-m", "pip"]
    # pip reads its settings (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX...)
    # from the environment, which it gets but for PRIVATE_ENV; it runs in the
    # action's folder, so paths in requirements.txt are the action's own. Its
    # bytecode would be time-stamped: _compile_packages saves it instead.
    options = ["--no-input", "--disable-pip-version-check", "--no-compile"]
    _build_step([*pip, "install", *options, "-r", REQUIREMENTS], folder, f"cannot install {REQUIREMENTS}: pip")
    _refuse_editable(venv)
    _compile_packages(venv)
    _drop_links(venv)


def _refuse_editable(venv: Path) -> None:
    """An editable install (`-e ./pkg`) points at the folder it was built in,
    which -compile deletes and no unpack recreates: refuse it here rather than
    let the action fail at its import. pip marks one in direct_url.json
    (PEP 610, `dir_info.editable`); setuptools leaves `__editable__*` files."""
    found = [path.name for path in venv.glob("lib/python3*/site-packages/__editable__*")]
    for record in venv.glob("lib/python3*/site-packages/*.dist-info/direct_url.json"):
        try:
            editable = json.loads(record.read_text()).get("dir_info", {}).get("editable", False)
        except (OSError, ValueError, AttributeError):
            continue
        if editable is True:
            found.append(record.parent.name)
    if found:
        raise PrepareError(f"{EDITABLE} ({', '.join(sorted(found))})")


def _has_pip_python_option() -> bool:
    """Whether the runtime's Python has a pip that can install elsewhere (`--python`)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("pip") is None:
        return False
    try:
        major, minor = importlib.metadata.version("pip").split(".")[:2]
        return (int(major), int(minor)) >= PIP_PYTHON_OPTION
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False


def _compile_packages(venv: Path) -> None:
    """Save the bytecode of everything installed, checked by hash (see the top).

    In a child process: at /init and live updates this runs in a thread of
    the server, which must go on serving meanwhile. Best effort, as
    `_save_bytecode`: a module that does not compile (a package's Python 2
    test data, say) reports its error if it is ever imported.
    """
    packages = [str(path) for path in venv.glob("lib/python3*/site-packages")]
    if not packages:
        return  # compileall with no folder would compile all of sys.path
    mode = BYTECODE.name.lower().replace("_", "-")
    command = [sys.executable, "-m", "compileall", "-qq", "-f", "--invalidation-mode", mode, *packages]
    subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _build_step(command: list[str], folder: Path, failure: str) -> None:
    """Run one step; if it fails, a PrepareError: `failure` and the exit
    status on the first line, then the end of the step's output."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(PRIVATE_ENV)}
    try:
        done = subprocess.run(
            command,
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,  # nothing may wait for a user who is not there
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )
    except OSError as exc:
        raise PrepareError(f"{failure} did not run: {exc}") from exc
    if done.returncode != 0:
        output = redacted(done.stdout.decode(errors="replace")).strip().splitlines()[-OUTPUT_LINES:]
        raise PrepareError("\n".join([f"{failure} exited with status {done.returncode}", *output]))


def _secret(key: str, value: str) -> bool:
    """A private variable whose value may be a secret (a token, a key, a URL with a password)."""
    named = re.search(r"TOKEN|KEY|SECRET|PASSWORD|AUTH|URL|AUTOINIT", key) or key.startswith(("__OW_", "ACTIONLOOP_"))
    return bool(named) and key.startswith(PRIVATE_ENV) and len(value) >= 6


def redacted(output: str) -> str:
    """pip's output without the values of our private variables.

    pip no longer gets them, but a requirements line can still name the
    server's own environment file (`-r /proc/1/environ` in a container),
    and pip quotes what it cannot parse: into the 502 and the logs. The
    values are cut out, and the NULs that separate them.
    """
    secrets = sorted((value for key, value in os.environ.items() if _secret(key, value)), key=len, reverse=True)
    for secret in secrets:
        output = output.replace(secret, "[redacted]")
    return output.replace("\0", " ")


def _drop_links(venv: Path) -> None:
    """Remove the venv's links (`bin/python*` to this machine's interpreter, `lib64`).

    The launcher never uses them: it runs the action with the runtime's Python
    and adds the venv's site-packages. Kept, `-compile` would pack each as a
    copy of the interpreter, and an unpack refuses links (archive.py).
    """
    for path in list(venv.rglob("*")):
        if path.is_symlink():
            path.unlink()


def discard(folder: Path) -> None:
    """Remove a half-prepared folder; never fails."""
    shutil.rmtree(folder, ignore_errors=True)

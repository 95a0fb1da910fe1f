"""Turn unpacked code into a runnable action folder with an `exec` in it.

Three kinds of action (SPEC.md part A, POST /init):
- an executable `exec` (ELF or `#!`): a generic ActionLoop program, run as-is;
- with `OW_COMPILER` set: `compiler MAIN SRC BIN` must produce `BIN/exec`;
- otherwise Python: `__main__.py` (a lone source arrives as `exec`), run by
  our launcher, which acknowledges on fd 3 once the module is imported. A
  `requirements.txt` beside it is installed into a new `virtualenv/` first,
  as the official OpenWhisk Python image's compile step does.
"""

from __future__ import annotations

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
    import py_compile

    for source in sources:
        try:
            py_compile.compile(str(source), doraise=True)
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
    # packages must be built for this very interpreter.
    _build_step([sys.executable, "-m", "venv", str(venv)], folder, f"cannot create {VIRTUALENV}/: venv")
    # pip reads its settings (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX...)
    # from the environment we pass on whole; it runs in the action's folder,
    # so paths in requirements.txt are the action's own.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input", "--disable-pip-version-check"]
    _build_step([*pip, "-r", REQUIREMENTS], folder, f"cannot install {REQUIREMENTS}: pip")
    _drop_links(venv)


def _build_step(command: list[str], folder: Path, failure: str) -> None:
    """Run one step; if it fails, a PrepareError: `failure` and the exit
    status on the first line, then the end of the step's output."""
    try:
        done = subprocess.run(
            command,
            cwd=folder,
            stdin=subprocess.DEVNULL,  # nothing may wait for a user who is not there
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )
    except OSError as exc:
        raise PrepareError(f"{failure} did not run: {exc}") from exc
    if done.returncode != 0:
        output = done.stdout.decode(errors="replace").strip().splitlines()[-OUTPUT_LINES:]
        raise PrepareError("\n".join([f"{failure} exited with status {done.returncode}", *output]))


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

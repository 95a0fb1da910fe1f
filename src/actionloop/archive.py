"""Unpack an action's code into a folder: source, zip, tar.gz or executable.

The result is always a folder; a single file (source or executable) lands as
`exec`, as in the reference proxy. Archives are checked before anything is
written: no entry may leave the folder, and the total size is bounded
(SPEC.md part C, last point).
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .errors import PrepareError

if TYPE_CHECKING:  # imported where used: a source file, the usual action, needs neither
    import zipfile

ZIP_MAGIC = b"PK\x03\x04"
GZIP_MAGIC = b"\x1f\x8b"
ELF_MAGIC = b"\x7fELF"


def is_executable_bytes(head: bytes) -> bool:
    """An ELF binary or a `#!` script: run as-is (SPEC.md part A)."""
    return head.startswith((ELF_MAGIC, b"#!"))


def unpack(code: bytes, binary: bool, dest: Path, max_bytes: int) -> None:
    """Write the code into `dest` (which must exist)."""
    if binary and code.startswith(ZIP_MAGIC):
        _unzip(code, dest, max_bytes)
    elif binary and code.startswith(GZIP_MAGIC):
        _untar(code, dest, max_bytes)
    else:
        _write_exec(dest / "exec", code)


def _write_exec(path: Path, code: bytes) -> None:
    path.write_bytes(code)
    if is_executable_bytes(code[:4]):
        path.chmod(0o755)


def _safe_name(dest: Path, name: str) -> Path:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or parts[0] == "/" or ".." in parts or ":" in parts[0]:
        raise PrepareError(f"Archive entry {name!r} would be written outside the action folder.")
    return dest.joinpath(*parts)


def _check_size(total: int, max_bytes: int) -> None:
    if total > max_bytes:
        raise PrepareError(f"Archive expands to {total} bytes, over the limit of {max_bytes}.")


def _unzip(code: bytes, dest: Path, max_bytes: int) -> None:
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(code)) as archive:
            infos = archive.infolist()
            _check_size(sum(info.file_size for info in infos), max_bytes)
            targets = [_safe_name(dest, info.filename) for info in infos]
            for info, target in zip(infos, targets, strict=True):
                _extract_zip_entry(archive, info, target)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        raise PrepareError(f"Cannot unpack the zip file: {exc}") from exc


def _extract_zip_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(info) as source, open(target, "wb") as sink:
        while chunk := source.read(1 << 20):
            sink.write(chunk)
    # zipfile drops permissions; keep the executable bits (needed for `exec`).
    mode = (info.external_attr >> 16) & 0o777
    if mode & stat.S_IXUSR:
        target.chmod(mode | stat.S_IRUSR)


def _untar(code: bytes, dest: Path, max_bytes: int) -> None:
    import tarfile

    try:
        with tarfile.open(fileobj=io.BytesIO(code), mode="r:gz") as archive:
            members = archive.getmembers()
            _check_size(sum(member.size for member in members), max_bytes)
            for member in members:
                _safe_name(dest, member.name)
            # The "data" filter also refuses links and devices that escape.
            archive.extractall(dest, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise PrepareError(f"Cannot unpack the tar.gz file: {exc}") from exc


def mark_executable(path: Path) -> bool:
    """Make `path` executable if it is an ELF or `#!` file; say if it is now."""
    if not path.is_file():
        return False
    with open(path, "rb") as file:
        head = file.read(4)
    if is_executable_bytes(head):
        path.chmod(path.stat().st_mode | 0o111)
    return os.access(path, os.X_OK)


def pack(folder: Path) -> bytes:
    """Zip a prepared action folder, keeping modes (for `-compile`)."""
    buffer = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                info = zipfile.ZipInfo.from_file(path, path.relative_to(folder).as_posix())
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, path.read_bytes())
    return buffer.getvalue()

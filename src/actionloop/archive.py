"""Unpack an action's code into a folder: source, zip, tar.gz or executable.

The result is always a folder; a single file (source or executable) lands as
`exec`, as in the reference proxy. Archives are checked whole before anything
is written (contract part C): only regular files and folders, no
entry may leave the folder, and the total size is bounded. Links, devices and
fifos are refused outright rather than judged by where they point: that
judgement is what tarfile's "data" filter gets wrong (CVE-2025-4517, a chain
of symlinks longer than PATH_MAX, still open in Python 3.11.7), and an action
needs none of them.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

from .errors import PrepareError

if TYPE_CHECKING:  # imported where used: a source file, the usual action, needs neither
    import tarfile
    import zipfile

ZIP_MAGIC = b"PK\x03\x04"
GZIP_MAGIC = b"\x1f\x8b"
ELF_MAGIC = b"\x7fELF"

# What a refused entry is, by its Unix file type (zip keeps it in external_attr).
FILE_TYPES = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
    stat.S_IFIFO: "a fifo",
    stat.S_IFSOCK: "a socket",
}
# `zip -ry` keeps links (a virtualenv's lib64 and bin/python are links);
# without -y zip stores the files they point to.
ZIP_LINK_HINT = "Zip without -y (--symlinks), which stores what a link points to: links are refused for safety."


def is_executable_bytes(head: bytes) -> bool:
    """An ELF binary or a `#!` script: run as-is (contract part A)."""
    return head.startswith((ELF_MAGIC, b"#!"))


def unpack(code: bytes, binary: bool, dest: Path, max_bytes: int) -> None:
    """Write the code into `dest`, an existing (in practice new and empty) folder.

    Every failure is a PrepareError, whatever broke underneath: the callers
    clean up on that type only (Runtime.init discards the folder). What this
    call wrote before failing is removed first.
    """
    write: Callable[[bytes, Path, int], None]
    if binary and code.startswith(ZIP_MAGIC):
        what, write = "zip file", _unzip
    elif binary and code.startswith(GZIP_MAGIC):
        what, write = "tar.gz file", _untar
    else:
        what, write = "code", _write_exec
    before: set[Path] = set()
    try:
        before = set(dest.iterdir())
        write(code, dest, max_bytes)
    except Exception as exc:
        # The bytes are the client's, so any failure reading them is theirs:
        # zipfile and tarfile raise many types (zlib.error, struct.error, ...).
        _remove_new(dest, before)
        if isinstance(exc, PrepareError):
            raise
        raise PrepareError(f"Cannot unpack the {what}: {exc}") from exc


def _remove_new(dest: Path, before: set[Path]) -> None:
    """Remove what a failed unpack added to `dest`; never fails."""
    try:
        added = set(dest.iterdir()) - before
    except OSError:
        return
    for path in added:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_exec(code: bytes, dest: Path, max_bytes: int) -> None:
    # A single file is bounded by the body size limit, not the archive limit.
    path = dest / "exec"
    path.write_bytes(code)
    if is_executable_bytes(code[:4]):
        path.chmod(0o755)


def _target(dest: Path, name: str, refused: str | None, hint: str = "") -> Path:
    """Where an archive entry goes, or a PrepareError naming it (and `hint`) if it may not."""
    if refused is not None:
        why = f"Archive entry {name!r} is {refused}; only regular files and folders are allowed."
        raise PrepareError(f"{why} {hint}" if hint else why)
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts:
        return dest  # "./", as `tar czf x.tgz -C dir .` writes: the folder itself
    if parts[0] == "/" or ".." in parts or ":" in parts[0]:
        raise PrepareError(f"Archive entry {name!r} would be written outside the action folder.")
    return dest.joinpath(*parts)


def _check_size(total: int, max_bytes: int) -> None:
    if total > max_bytes:
        raise PrepareError(f"Archive expands to {total} bytes, over the limit of {max_bytes}.")


def _write_file(target: Path, source: IO[bytes], mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # No entry becomes a link, so none can be in the way; O_NOFOLLOW makes sure.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with open(fd, "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)
    # Keep the archive's executable bits (needed for `exec`), nothing else:
    # no setuid, no write for others.
    if mode & 0o111:
        target.chmod(0o644 | (mode & 0o111))


def _zip_refused(info: zipfile.ZipInfo) -> tuple[str | None, str]:
    """Why a zip entry may not be unpacked, if it may not, and what to do instead.

    The file type is in the high bits of external_attr when the zip was made
    on Unix; 0 (DOS, or Python's writestr) means a plain file or folder.
    """
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type in (0, stat.S_IFREG, stat.S_IFDIR):
        return None, ""
    hint = ZIP_LINK_HINT if file_type == stat.S_IFLNK else ""
    return FILE_TYPES.get(file_type, f"of unknown file type {file_type:o}"), hint


def _unzip(code: bytes, dest: Path, max_bytes: int) -> None:
    import zipfile

    with zipfile.ZipFile(io.BytesIO(code)) as archive:
        infos = archive.infolist()
        _check_size(sum(info.file_size for info in infos), max_bytes)
        targets = [_target(dest, info.filename, *_zip_refused(info)) for info in infos]
        for info, target in zip(infos, targets, strict=True):
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                with archive.open(info) as source:
                    _write_file(target, source, info.external_attr >> 16)


def _tar_refused(member: tarfile.TarInfo) -> str | None:
    """Why a tar member may not be unpacked, if it may not."""
    if member.isreg() or member.isdir():
        return None
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.isdev():
        return "a device or fifo"
    return f"of unknown type {member.type!r}"


def _untar(code: bytes, dest: Path, max_bytes: int) -> None:
    import tarfile

    # Our own loop rather than extractall(filter="data"): `_target` is the
    # protection, and its verdict does not change with the Python patch level.
    with tarfile.open(fileobj=io.BytesIO(code), mode="r:gz") as archive:
        members = archive.getmembers()
        _check_size(sum(member.size for member in members), max_bytes)
        targets = [_target(dest, member.name, _tar_refused(member)) for member in members]
        for member, target in zip(members, targets, strict=True):
            source = archive.extractfile(member)  # None for a folder, the only other type left
            if source is None:
                target.mkdir(parents=True, exist_ok=True)
            else:
                with source:
                    _write_file(target, source, member.mode)


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

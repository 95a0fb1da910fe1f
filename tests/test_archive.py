"""Unpacking code: formats, executable bits, escaping paths, size limits."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from conftest import make_zip

from actionloop import archive
from actionloop.errors import PrepareError

LIMIT = 1 << 20


def test_source_becomes_exec(tmp_path: Path) -> None:
    """A lone source lands as `exec`, not executable."""
    archive.unpack(b"def main(a): return a", False, tmp_path, LIMIT)
    assert (tmp_path / "exec").read_bytes() == b"def main(a): return a"
    assert not os.access(tmp_path / "exec", os.X_OK) or os.geteuid() == 0


def test_script_becomes_executable(tmp_path: Path) -> None:
    """A `#!` file is marked executable."""
    archive.unpack(b"#!/bin/sh\necho", True, tmp_path, LIMIT)
    assert (tmp_path / "exec").stat().st_mode & 0o111


def test_zip_keeps_executable_bits_and_folders(tmp_path: Path) -> None:
    """zipfile drops modes; we keep the executable bits of entries."""
    code = make_zip({"exec": "#!/bin/sh\n", "lib/data.txt": "x"}, modes={"exec": 0o755})
    archive.unpack(code, True, tmp_path, LIMIT)
    assert (tmp_path / "exec").stat().st_mode & 0o100
    assert (tmp_path / "lib" / "data.txt").read_text() == "x"


@pytest.mark.parametrize("name", ["../evil.py", "/etc/evil", "a/../../evil", "..\\evil"])
def test_zip_entries_cannot_escape(tmp_path: Path, name: str) -> None:
    """An entry that would land outside the folder refuses the whole zip."""
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(PrepareError, match="outside the action folder"):
        archive.unpack(make_zip({"__main__.py": "x", name: "evil"}), True, dest, LIMIT)
    assert not (tmp_path / "evil.py").exists() and not list(dest.iterdir())


def test_zip_bomb_refused(tmp_path: Path) -> None:
    """An archive expanding past the limit is refused before writing."""
    code = make_zip({"big": "0" * (LIMIT + 1)})
    assert len(code) < LIMIT // 100
    with pytest.raises(PrepareError, match="over the limit"):
        archive.unpack(code, True, tmp_path, LIMIT)
    assert not list(tmp_path.iterdir())


def test_broken_zip(tmp_path: Path) -> None:
    """A truncated zip is a clear PrepareError."""
    with pytest.raises(PrepareError, match="Cannot unpack the zip"):
        archive.unpack(make_zip({"__main__.py": "x" * 1000})[:60], True, tmp_path, LIMIT)


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_tar_gz(tmp_path: Path) -> None:
    """A gzip'd tar unpacks with its modes."""
    archive.unpack(tar_gz({"exec": b"#!/bin/sh\n", "sub/f": b"y"}), True, tmp_path, LIMIT)
    assert (tmp_path / "exec").stat().st_mode & 0o100 and (tmp_path / "sub/f").read_bytes() == b"y"


def test_tar_gz_escape_and_garbage(tmp_path: Path) -> None:
    """Escaping tar members and broken gzip are refused."""
    with pytest.raises(PrepareError):
        archive.unpack(tar_gz({"../evil": b"x"}), True, tmp_path, LIMIT)
    with pytest.raises(PrepareError):
        archive.unpack(b"\x1f\x8bgarbage", True, tmp_path, LIMIT)


def test_pack_round_trip(tmp_path: Path) -> None:
    """pack() keeps files and modes so unpack() restores an executable exec."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "exec").write_text("#!/bin/sh\n")
    (src / "exec").chmod(0o755)
    (src / "d" / "f").write_text("z")
    out = tmp_path / "out"
    out.mkdir()
    archive.unpack(archive.pack(src), True, out, LIMIT)
    assert (out / "exec").stat().st_mode & 0o100 and (out / "d" / "f").read_text() == "z"

"""Unpacking code: formats, executable bits, escaping paths, links and devices,
size limits, and nothing left behind by a failure."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import b64, make_zip

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
    with pytest.raises(PrepareError, match="outside the action folder"):
        archive.unpack(tar_gz({"ok": b"x", "../evil": b"x"}), True, tmp_path, LIMIT)
    assert not list(tmp_path.iterdir()) and not (tmp_path.parent / "evil").exists()
    with pytest.raises(PrepareError, match=r"Cannot unpack the tar\.gz"):
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


MAIN = b"def main(a):\n    return a\n"


def tar_gz_with(*entries: tarfile.TarInfo) -> bytes:
    """A tar.gz with a good `__main__.py` first, then `entries` (no data)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        first = tarfile.TarInfo("__main__.py")
        first.size = len(MAIN)
        tar.addfile(first, io.BytesIO(MAIN))
        for entry in entries:
            tar.addfile(entry)
    return buffer.getvalue()


def tar_entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def cve_2025_4517_tar(outside: Path) -> bytes:
    """The published pattern: a symlink chain whose real path is longer than
    PATH_MAX, so the data filter's realpath check stops short, then a link
    through it to `outside` and a file written through that link."""
    comp, steps, path = "d" * 247, "abcdefghijklmnop", ""
    entries = []
    for step in steps:
        entries.append(tar_entry(os.path.join(path, comp), tarfile.DIRTYPE))
        entries.append(tar_entry(os.path.join(path, step), tarfile.SYMTYPE, comp))
        path = os.path.join(path, comp)
    chain = os.path.join(*steps, "l" * 254)
    entries.append(tar_entry(chain, tarfile.SYMTYPE, "../" * len(steps)))
    entries.append(tar_entry("escape", tarfile.SYMTYPE, chain + "/.." * (len(steps) + 1) + str(outside)))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for entry in entries:
            tar.addfile(entry)
        payload = tarfile.TarInfo("escape/victim.txt")
        payload.size = 5
        tar.addfile(payload, io.BytesIO(b"pwned"))
    return buffer.getvalue()


def outside_with_victim(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("original")
    return outside


def assert_untouched(tmp_path: Path, dest: Path) -> None:
    """Nothing in `dest`, and nothing under tmp_path but `dest` and the victim."""
    assert not list(dest.iterdir())
    assert (tmp_path / "outside" / "victim.txt").read_text() == "original"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        dest.name,
        "outside",
        "outside/victim.txt",
    ]


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """An empty action folder beside an `outside` folder holding a victim file."""
    outside_with_victim(tmp_path)
    folder = tmp_path / "dest"
    folder.mkdir()
    return folder


@pytest.mark.parametrize(
    ("kind", "linkname", "refused"),
    [
        (tarfile.SYMTYPE, "../outside/victim.txt", "a symbolic link"),
        (tarfile.LNKTYPE, "__main__.py", "a hard link"),
        (tarfile.CHRTYPE, "", "a device or fifo"),
        (tarfile.BLKTYPE, "", "a device or fifo"),
        (tarfile.FIFOTYPE, "", "a device or fifo"),
    ],
)
def test_tar_links_and_devices_refused(tmp_path: Path, dest: Path, kind: bytes, linkname: str, refused: str) -> None:
    """A tar member that is not a file or folder refuses the whole tar, naming it, before any write."""
    code = tar_gz_with(tar_entry("evil", kind, linkname))
    with pytest.raises(PrepareError, match=f"'evil' is {refused}"):
        archive.unpack(code, True, dest, LIMIT)
    assert_untouched(tmp_path, dest)


def test_tar_cve_2025_4517_chain_refused(tmp_path: Path, dest: Path) -> None:
    """The long-symlink-chain tar (CVE-2025-4517) is refused and writes nothing, inside or out."""
    code = cve_2025_4517_tar(tmp_path / "outside")
    with pytest.raises(PrepareError, match="'a' is a symbolic link"):
        archive.unpack(code, True, dest, LIMIT)
    assert_untouched(tmp_path, dest)


def zip_with_symlink() -> bytes:
    """A zip with a good `__main__.py`, then `link` marked S_IFLNK pointing outside."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("__main__.py", MAIN)
        link = zipfile.ZipInfo("link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zipped.writestr(link, "../outside/victim.txt")
    return buffer.getvalue()


def test_zip_symlink_refused(tmp_path: Path, dest: Path) -> None:
    """A zip entry whose external_attr marks a symlink refuses the whole zip, naming it, before any write."""
    with pytest.raises(PrepareError, match="'link' is a symbolic link"):
        archive.unpack(zip_with_symlink(), True, dest, LIMIT)
    assert_untouched(tmp_path, dest)


@pytest.mark.skipif(shutil.which("zip") is None, reason="needs the zip command")
def test_zip_y_link_refused_with_a_hint(tmp_path: Path, dest: Path) -> None:
    """`zip -ry` keeps a virtualenv's links: refused, saying to zip without -y, which then unpacks."""
    action = tmp_path / "action"
    (action / "virtualenv" / "lib").mkdir(parents=True)
    (action / "__main__.py").write_bytes(MAIN)
    (action / "virtualenv" / "lib" / "data.txt").write_text("x")
    (action / "virtualenv" / "lib64").symlink_to("lib")
    for flags, name in (("-qry", "links.zip"), ("-qr", "copies.zip")):
        subprocess.run(["zip", flags, f"../{name}", "."], cwd=action, check=True)
    with pytest.raises(PrepareError) as refused:
        archive.unpack((tmp_path / "links.zip").read_bytes(), True, dest, LIMIT)
    assert str(refused.value) == (
        "Archive entry 'virtualenv/lib64' is a symbolic link; only regular files and folders are allowed."
        " Zip without -y (--symlinks), which stores what a link points to: links are refused for safety."
    )
    archive.unpack((tmp_path / "copies.zip").read_bytes(), True, dest, LIMIT)
    assert (dest / "virtualenv" / "lib64" / "data.txt").read_text() == "x"


def test_zip_path_escape_writes_nothing(tmp_path: Path, dest: Path) -> None:
    """A zip entry aimed at ../outside is refused, and the good entries before it are not written either."""
    code = make_zip({"__main__.py": MAIN, "../outside/victim.txt": "pwned"})
    with pytest.raises(PrepareError, match="outside the action folder"):
        archive.unpack(code, True, dest, LIMIT)
    assert_untouched(tmp_path, dest)


def test_zip_without_file_type_is_plain(tmp_path: Path) -> None:
    """Entries with no Unix file type (DOS zips, zipfile.writestr) are plain files and folders."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("lib/", "")
        zipped.writestr("lib/data.txt", "x")
    archive.unpack(buffer.getvalue(), True, tmp_path, LIMIT)
    assert (tmp_path / "lib" / "data.txt").read_text() == "x"


def bad_crc_zip() -> bytes:
    """A stored zip whose second file's bytes no longer match its CRC."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zipped:
        zipped.writestr("__main__.py", MAIN)
        zipped.writestr("data.txt", b"the original data")
    return buffer.getvalue().replace(b"the original data", b"the tampered data")


@pytest.mark.parametrize(
    "code",
    [bad_crc_zip(), make_zip({"lib": "a file", "lib/data.txt": "x"})],
    ids=["bad-crc", "file-then-folder"],
)
def test_failure_while_writing_removes_what_was_written(tmp_path: Path, code: bytes) -> None:
    """A failure after some files were written is a PrepareError and removes them (not what was there before)."""
    (tmp_path / "kept").write_text("here before")
    with pytest.raises(PrepareError, match="Cannot unpack the zip file"):
        archive.unpack(code, True, tmp_path, LIMIT)
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"]


def test_write_failure_is_prepare_error(tmp_path: Path) -> None:
    """Even a plain source that cannot be written fails as a PrepareError, not an OSError."""
    with pytest.raises(PrepareError, match="Cannot unpack the code"):
        archive.unpack(MAIN, False, tmp_path / "missing", LIMIT)


def test_server_refuses_links_with_502(start_server: Any, tmp_path: Path) -> None:
    """A binary /init of the CVE tar or a symlink zip answers 502 naming the entry and leaves no folder."""
    outside = outside_with_victim(tmp_path)
    server = start_server()
    status, body = server.init(b64(cve_2025_4517_tar(outside)), binary=True)
    assert (status, body) == (
        502,
        {"error": "Archive entry 'a' is a symbolic link; only regular files and folders are allowed."},
    )
    status, body = server.init(b64(zip_with_symlink()), binary=True)
    assert status == 502 and "'link' is a symbolic link" in body["error"]
    assert not list((server.folder / "action").iterdir())
    assert (outside / "victim.txt").read_text() == "original" and list(outside.iterdir()) == [outside / "victim.txt"]


def test_tar_made_with_dot_unpacks(tmp_path: Path) -> None:
    """`tar czf x.tgz -C dir .` (entries `./`, `./__main__.py`) unpacks like any tar."""
    source = tmp_path / "action"
    source.mkdir()
    (source / "__main__.py").write_text("def main(a):\n    return a\n")
    made = tmp_path / "x.tgz"
    subprocess.run(["tar", "czf", str(made), "-C", str(source), "."], check=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    archive.unpack(made.read_bytes(), True, dest, LIMIT)
    assert (dest / "__main__.py").read_text().startswith("def main")

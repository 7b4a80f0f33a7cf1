"""vm.cp's tar-over-SSH copy against a *local* stand-in for the guest (its commands run under the
local ``sh``, with GNU tar and with busybox tar), and the host's writer against hostile tar streams.

The same copies run against the real guest in tests/e2e/test_vm_ops_e2e.py.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

import needs
from devops_tasks import guest
from devops_tasks.errors import GuestError
from devops_tasks.guest import transfer
from devops_tasks.guest.transfer import CopyResult, SafeWriter
from local_guest import LocalConn

NEWLINE = "new\nline"
AWKWARD = ["a b.txt", "it's", 'quo"te', NEWLINE, "é ü", "$(touch pwned)", "-dash", "*", "L" * 200]


@pytest.fixture(params=["gnu", "busybox"])
def conn(request, tmp_path):
    env = dict(os.environ)
    if request.param == "busybox":
        busybox = needs.require_tool("busybox", "busybox-static")
        bin_dir = tmp_path / "bb-bin"
        bin_dir.mkdir()
        (bin_dir / "tar").symlink_to(busybox)
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    else:
        needs.require_tool("tar", "tar")
    return LocalConn(env)


def make_tree(root: Path) -> Path:
    """Awkward names, modes, a symlink, a hard link, an empty folder, a read-only folder, big data."""
    root.mkdir()
    for index, name in enumerate(AWKWARD):
        (root / name).write_bytes(f"{name}\n".encode() * (index + 1))
    os.chmod(root / "a b.txt", 0o600)
    sub = root / "sub dir" / "deeper"
    sub.mkdir(parents=True)
    (sub / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(sub / "run.sh", 0o755)
    (sub / "big.bin").write_bytes(os.urandom(300_000))
    (root / "empty").mkdir()
    (root / "link").symlink_to("a b.txt")
    (root / "dangling").symlink_to("/nowhere/at/all")
    os.link(root / "it's", root / "hard")
    ro = root / "read only"
    ro.mkdir()
    (ro / "inside").write_text("x")
    os.chmod(ro, 0o555)
    os.chmod(root / "sub dir", 0o750)
    os.utime(sub / "run.sh", (1_000_000_000, 1_000_000_000))
    return root


def snapshot(root: Path) -> dict:
    """Everything a copy keeps: type, mode, content or link target, file mtimes."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[rel] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                found[rel] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes(), int(info.st_mtime))
    return found


@pytest.fixture
def cleanup_modes():
    roots = []
    yield roots.append
    for root in roots:  # read-only folders: let pytest remove the tmp dir
        for dirpath, dirnames, _ in os.walk(root):
            for name in dirnames:
                with_suppress_chmod(Path(dirpath) / name)


def with_suppress_chmod(path: Path) -> None:
    try:
        if not path.is_symlink():
            os.chmod(path, 0o755)
    except OSError:
        pass


# --------------------------------------------------------------------------- the arguments


def test_parse_copy():
    assert transfer.parse_copy("src", ":/root/x") == transfer.CopySpec("src", "/root/x", to_guest=True)
    assert transfer.parse_copy(":/root/x y", "out") == transfer.CopySpec("/root/x y", "out", to_guest=False)
    with pytest.raises(GuestError, match="neither is written :PATH"):
        transfer.parse_copy("a", "b")
    with pytest.raises(GuestError, match="both are written :PATH"):
        transfer.parse_copy(":a", ":b")
    with pytest.raises(GuestError, match="destination path is empty"):
        transfer.parse_copy("a", ":")
    with pytest.raises(GuestError, match="NUL"):
        transfer.parse_copy("a\0b", ":x")


def test_plans_follow_cp_r(tmp_path):
    plan = transfer.plan_to_guest
    assert plan(Path("proj"), "/root", "dir", True, True) == ("/root", "proj")
    assert plan(Path("proj/"), "/root/new", "missing", True, True) == ("/root", "new")
    assert plan(Path("f.txt"), "/root/g.txt", "file", True, False) == ("/root", "g.txt")
    assert plan(Path("f.txt"), "rel", "missing", True, False) == (".", "rel")
    with pytest.raises(GuestError, match="the VM has no folder '/nope'"):
        plan(Path("f"), "/nope/x", "missing", False, False)
    with pytest.raises(GuestError, match="is a file, not a folder"):
        plan(Path("d"), "/root/f", "file", True, True)
    with pytest.raises(GuestError, match="the VM has no folder '/root/new/'"):
        plan(Path("f"), "/root/new/", "missing", True, False)
    (tmp_path / "out").mkdir()
    (tmp_path / "file").write_text("")
    assert transfer.plan_from_guest("/root/x y", tmp_path / "out", True) == (tmp_path / "out", "x y")
    assert transfer.plan_from_guest("/root/x", tmp_path / "new", True) == (tmp_path, "new")
    assert transfer.plan_from_guest("/root/f", tmp_path / "file", False) == (tmp_path, "file")
    with pytest.raises(GuestError, match="is a file, not a folder"):
        transfer.plan_from_guest("/root/d", tmp_path / "file", True)
    with pytest.raises(GuestError, match="there is no folder"):
        transfer.plan_from_guest("/root/x", tmp_path / "missing" / "x", False)
    for bad in ("/", ".", "..", "a/.."):
        with pytest.raises(GuestError, match="name a file or folder"):
            transfer.top_name(bad)


@pytest.mark.parametrize("name", AWKWARD + ["/", "."])
def test_probe_script_under_sh(tmp_path, name):
    conn = LocalConn()
    folder = tmp_path / "probe"
    folder.mkdir()
    if name not in ("/", "."):
        (folder / name).write_text("")
        path = str(folder / name)
        expected = ("file", True)
    else:
        path = name
        expected = ("dir", True)
    code, out, err = guest.capture(conn, transfer.probe_script(path))
    assert code == 0, err
    assert transfer.parse_probe(out) == expected
    missing = f"{folder}/no such/{name if name not in ('/', '.') else 'x'}"
    code, out, _ = guest.capture(conn, transfer.probe_script(missing))
    assert transfer.parse_probe(out) == ("missing", False)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


# --------------------------------------------------------------------------- round trips


def test_round_trip_both_ways_keeps_everything(conn, tmp_path, cleanup_modes):
    source = make_tree(tmp_path / "my tree 'q'")
    guest_side = tmp_path / "guest home"
    guest_side.mkdir()
    back = tmp_path / "back"
    back.mkdir()
    cleanup_modes(tmp_path)
    sent = transfer.copy_to_guest(conn, source, str(guest_side))
    assert sent.where == str(guest_side / source.name)
    assert snapshot(guest_side / source.name) == snapshot(source)
    got = transfer.copy_from_guest(conn, str(guest_side / source.name), back)
    assert snapshot(back / source.name) == snapshot(source)
    assert (got.files, got.links) == (sent.files, sent.links)
    assert sent.files == len(AWKWARD) + 4  # the hard link counts as a file
    assert os.stat(back / source.name / "hard").st_ino == os.stat(back / source.name / "it's").st_ino
    assert not (tmp_path / "pwned").exists()


def test_single_files_renamed_and_replaced(conn, tmp_path):
    src = tmp_path / NEWLINE
    src.write_text("one")
    os.chmod(src, 0o640)
    guest_dir = tmp_path / "g"
    guest_dir.mkdir()
    transfer.copy_to_guest(conn, src, str(guest_dir / "renamed it's"))
    assert (guest_dir / "renamed it's").read_text() == "one"
    assert stat.S_IMODE(os.stat(guest_dir / "renamed it's").st_mode) == 0o640
    src.write_text("two")
    transfer.copy_to_guest(conn, src, str(guest_dir / "renamed it's"))  # an existing file is replaced
    assert (guest_dir / "renamed it's").read_text() == "two"
    out = tmp_path / "out.txt"
    out.write_text("old")
    transfer.copy_from_guest(conn, str(guest_dir / "renamed it's"), out)
    assert out.read_text() == "two"


def test_copy_errors_are_one_line_and_write_nothing(conn, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(GuestError, match="the VM has no folder"):
        transfer.copy_to_guest(conn, tmp_path / "f", str(tmp_path / "missing" / "f"))
    with pytest.raises(GuestError, match="does not exist on this machine"):
        transfer.copy_to_guest(conn, tmp_path / "nope", str(tmp_path))
    with pytest.raises(GuestError, match="does not exist in the VM"):
        transfer.copy_from_guest(conn, str(tmp_path / "nope"), tmp_path)
    with pytest.raises(GuestError, match="there is no folder"):
        transfer.copy_from_guest(conn, str(tmp_path / "f"), tmp_path / "missing" / "f")
    assert not (tmp_path / "missing").exists()


def test_a_failing_guest_tar_is_reported(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tar").write_text("#!/bin/sh\ncat >/dev/null; echo 'tar: No space left on device' >&2; exit 2\n")
    os.chmod(bin_dir / "tar", 0o755)
    conn = LocalConn({**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    (tmp_path / "f").write_text("x")
    with pytest.raises(GuestError, match=r"copying into .* in the VM failed: tar: No space left on device$"):
        transfer.copy_to_guest(conn, tmp_path / "f", str(tmp_path))
    with pytest.raises(GuestError, match=r"copying .* from the VM failed: tar: No space left on device$"):
        transfer.copy_from_guest(conn, str(tmp_path / "f"), tmp_path / "back")
    assert not (tmp_path / "back").exists()


# --------------------------------------------------------------------------- hostile streams


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def entry(name: str, kind=tarfile.REGTYPE, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    return info


def extract(data: bytes, dest: Path, top: str = "top", rename: str = "copy") -> CopyResult:
    result = CopyResult()
    with SafeWriter(dest, top, rename, result) as writer, tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for member in tar:
            writer.write(member, tar)
    return result


@pytest.fixture
def victim(tmp_path):
    """A host file outside the destination that a hostile guest wants to overwrite."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep me")
    dest = tmp_path / "dest"
    dest.mkdir()
    return dest, outside


# An absolute name points into the test's own folder: were the writer ever to follow it, it must not
# hit a real system file.
@pytest.mark.parametrize("name", ["../outside/secret", "top/../../outside/secret", "{outside}/secret", "other/file",
                                  "./../x", "top/x/../../../outside/secret"])
def test_names_outside_the_copy_are_refused(victim, name):
    dest, outside = victim
    name = name.format(outside=outside)
    with pytest.raises(GuestError, match="refused an entry the VM sent outside the copy"):
        extract(tar_bytes((entry("top", tarfile.DIRTYPE, mode=0o755), b""), (entry(name), b"evil")), dest)
    assert (outside / "secret").read_text() == "keep me"


def test_a_symlink_is_never_written_through(victim):
    dest, outside = victim
    stream = tar_bytes(
        (entry("top", tarfile.DIRTYPE, mode=0o755), b""),
        (entry("top/l", tarfile.SYMTYPE, linkname=str(outside)), b""),
        (entry("top/l/secret"), b"evil"),
    )
    with pytest.raises(GuestError, match="a link or a file stands where a folder should be"):
        extract(stream, dest)
    assert (outside / "secret").read_text() == "keep me"
    assert os.readlink(dest / "copy" / "l") == str(outside)  # the link itself is just a link


def test_an_existing_symlink_in_the_destination_is_replaced_not_followed(victim):
    dest, outside = victim
    (dest / "copy").mkdir()
    (dest / "copy" / "f").symlink_to(outside / "secret")
    extract(tar_bytes((entry("top", tarfile.DIRTYPE, mode=0o755), b""), (entry("top/f"), b"new")), dest)
    assert (outside / "secret").read_text() == "keep me"
    assert not (dest / "copy" / "f").is_symlink() and (dest / "copy" / "f").read_text() == "new"


def test_hard_links_outside_the_copy_are_refused(victim):
    dest, outside = victim
    stream = tar_bytes((entry("top", tarfile.DIRTYPE, mode=0o755), b""),
                       (entry("top/h", tarfile.LNKTYPE, linkname="../outside/secret"), b""))
    with pytest.raises(GuestError, match="outside the copy"):
        extract(stream, dest)
    stream = tar_bytes((entry("top", tarfile.DIRTYPE, mode=0o755), b""),
                       (entry("top/l", tarfile.SYMTYPE, linkname=str(outside / "secret")), b""),
                       (entry("top/h", tarfile.LNKTYPE, linkname="top/l"), b""))
    extract(stream, dest)  # a hard link to the symlink links the symlink, not its target
    assert os.path.islink(dest / "copy" / "h")
    assert os.lstat(dest / "copy" / "h").st_nlink == 2 and os.stat(outside / "secret").st_nlink == 1


def test_devices_are_skipped_and_set_id_bits_dropped(victim):
    dest, _ = victim
    result = extract(tar_bytes(
        (entry("top", tarfile.DIRTYPE, mode=0o1777), b""),
        (entry("top/suid", mode=0o4755), b"#!/bin/sh\n"),
        (entry("top/null", tarfile.CHRTYPE), b""),
        (entry("top/fifo", tarfile.FIFOTYPE), b""),
    ), dest)
    assert result.skipped == ["copy/null", "copy/fifo"]
    assert stat.S_IMODE(os.stat(dest / "copy" / "suid").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "copy").st_mode) == 0o777
    assert sorted(os.listdir(dest / "copy")) == ["suid"]


def test_a_file_never_replaces_a_folder(victim):
    dest, _ = victim
    (dest / "copy" / "d").mkdir(parents=True)
    (dest / "copy" / "d" / "mine").write_text("mine")
    with pytest.raises(GuestError, match="is a folder: not replaced by a file"):
        extract(tar_bytes((entry("top", tarfile.DIRTYPE, mode=0o755), b""), (entry("top/d"), b"x")), dest)
    assert (dest / "copy" / "d" / "mine").read_text() == "mine"


def test_the_host_tree_tar_has_root_owners_and_sorted_names(tmp_path):
    tree = tmp_path / "t"
    tree.mkdir()
    for name in ("b", "a", "c"):
        (tree / name).write_text(name)
    buffer = io.BytesIO()
    result = CopyResult()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        transfer._add_tree(tar, tree, "x", result)
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["x", "x/a", "x/b", "x/c"]
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "root", "root")}
    assert (result.files, result.folders, result.bytes) == (3, 1, 3)
    shutil.rmtree(tree)

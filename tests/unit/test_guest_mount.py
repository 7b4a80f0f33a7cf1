"""guest.Mount against a *local* stand-in for the guest: the guest's side (the mount script, sshfs)
runs on this machine through a fake SSH channel, so the whole reverse-SSHFS logic (sftp-server ↔
``sshfs -o slave``, reuse, refusal, stale cleanup, errors) is checked without a VM.

Needs the host's sftp-server; the real mounts also need sshfs, /dev/fuse and root (skipped otherwise,
failed under CI=true: see tests/needs.py).
The same behaviour is checked against the real guest in tests/e2e/test_workspace.py.
"""

from __future__ import annotations

import io
import os
import signal
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import needs
from local_guest import LocalConn
from devops_tasks import guest
from devops_tasks.errors import GuestError

try:
    SFTP = guest.find_sftp_server()
except GuestError:
    SFTP = None

SFTP_PROBLEM = "" if SFTP else "no sftp-server on this machine (apt-get install openssh-sftp-server)"
needs_sftp = needs.mark(SFTP_PROBLEM)
needs_fuse = needs.mark(
    SFTP_PROBLEM or needs.tool_problem("sshfs", "sshfs")
    or ("" if os.path.exists("/dev/fuse") and os.geteuid() == 0 else "local mounts need /dev/fuse and root")
)


def mounted_at(point: Path) -> list[str]:
    return [line.split()[0] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1] == str(point)]


@pytest.fixture
def point(tmp_path):
    mountpoint = tmp_path / "app"
    yield mountpoint
    while mounted_at(mountpoint):  # never leave a mount behind, whatever a test did
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.fixture
def project(tmp_path):
    folder = tmp_path / "my project 'x' $(touch pwned) `id` é"
    folder.mkdir()
    (folder / "hello.txt").write_text("hello\n")
    return folder


@needs_fuse
def test_mount_edits_both_ways_and_unmounts(point, project, tmp_path):
    conn = LocalConn()
    with guest.Mount(conn, project, str(point), timeout=15) as mount:
        assert mount.mounted and not mount.reused
        assert mounted_at(point) == [mount.source] and mount.source.startswith(guest.fsname_for(project) + ":")
        assert (point / "hello.txt").read_text() == "hello\n"
        (point / "from-guest.txt").write_text("guest wrote this")
        assert (project / "from-guest.txt").read_text() == "guest wrote this"
        (project / "from-host.txt").write_text("host wrote this")
        deadline = time.monotonic() + 5
        while not (point / "from-host.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (point / "from-host.txt").read_text() == "host wrote this"
    assert mounted_at(point) == []
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    assert all(ch.proc.poll() is not None for ch in conn.channels)


@needs_fuse
def test_mount_twice_reuses_and_repeated_mounts_work(point, project):
    conn = LocalConn()
    for _ in range(3):
        with guest.Mount(conn, project, str(point), timeout=15) as outer:
            with guest.Mount(conn, project, str(point), timeout=15) as inner:
                assert inner.reused and not outer.reused
            assert (point / "hello.txt").exists()  # the inner one left the outer's mount alone
        assert mounted_at(point) == []


@needs_fuse
def test_mount_refuses_to_replace_another_live_mount(point, project, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    conn = LocalConn()
    with guest.Mount(conn, project, str(point), timeout=15):
        with pytest.raises(GuestError, match="already holds a live mount of another folder"):
            guest.Mount(conn, other, str(point), timeout=15).start()
        assert (point / "hello.txt").exists()


@needs_fuse
def test_mount_replaces_a_dead_mount(point, project):
    conn = LocalConn()
    first = guest.Mount(conn, project, str(point), timeout=15)
    first.start()
    # The host side dies without unmounting (kill -9 of the tool): its sftp-server is killed and
    # the tool's ends of the pipes close. (Killed alone, bwrap's sandbox may outlive it a while.)
    first._proc.kill()
    first._proc.stdin.close()
    first._proc.stdout.close()
    # The guest's side notices (sshfs reads EOF and ends, then its script): a stat could still be
    # answered from the kernel's cache, so wait for the script itself (a loaded machine is slow).
    deadline = time.monotonic() + 30
    while not first._chan.exit_status_ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first._chan.exit_status_ready(), "the dead mount's sshfs did not end"
    with guest.Mount(conn, project, str(point), timeout=15) as second:
        assert not second.reused
        assert (point / "hello.txt").read_text() == "hello\n"
    first.mounted = False
    first.stop()
    assert mounted_at(point) == []


@needs_fuse
def test_mount_reports_sshfs_errors(point, project):
    conn = LocalConn()
    with pytest.raises(GuestError, match="unknown option"):
        guest.Mount(conn, project, str(point), timeout=15, options=("no_such_option",)).start()
    assert mounted_at(point) == []


@needs_sftp
def test_mount_says_when_sshfs_is_missing(point, project, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("awk", "mkdir", "sleep", "cat", "rm", "umount"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    conn = LocalConn(env={"PATH": str(bin_dir)})
    with pytest.raises(GuestError, match="sshfs is not installed in the guest image"):
        guest.Mount(conn, project, str(point), timeout=15).start()
    assert all(ch.proc.poll() is not None for ch in conn.channels)


def test_mount_says_when_the_folder_is_missing(tmp_path):
    with pytest.raises(GuestError, match="no such directory"):
        guest.Mount(LocalConn(), tmp_path / "missing").start()
    (tmp_path / "file").write_text("")
    with pytest.raises(GuestError, match="not a directory"):
        guest.Mount(LocalConn(), tmp_path / "file").start()


def test_mount_says_when_sftp_server_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(guest.sftp_server, "SFTP_SERVER_CANDIDATES", (str(tmp_path / "none"),))
    monkeypatch.delenv("CORE_SFTP_SERVER", raising=False)
    with pytest.raises(GuestError, match="apt-get install openssh-sftp-server"):
        guest.Mount(LocalConn(), tmp_path).start()


@needs_fuse
def test_mount_does_not_follow_a_link_out_of_the_project(point, project, tmp_path, monkeypatch):
    """sshfs -o follow_symlinks makes the host's server resolve links: the sandbox (bubblewrap)
    has nothing outside the project for them to reach."""
    monkeypatch.delenv("CORE_MOUNT_CONFINE", raising=False)
    secret = tmp_path / "secret.txt"
    secret.write_text("PRIVATE\n")
    (project / "link-out").symlink_to(secret)
    (project / "link-in").symlink_to("hello.txt")
    needs.need(needs.bwrap_problem())
    with guest.Mount(LocalConn(), project, str(point), timeout=15, options=("follow_symlinks",)) as mount:
        assert mount.confined
        assert (point / "link-in").read_text() == "hello\n"
        with pytest.raises(OSError):
            (point / "link-out").read_text()


def set_id_attempts(app: Path) -> dict[str, str]:
    """What root in the guest tries through the mount: set-id bits, device nodes, fifos. Returns
    {name: the error} for what the mount refused."""
    refused = {}
    (app / "suid").write_text("#!/bin/sh\n")
    os.chmod(app / "suid", 0o4755)
    (app / "sgid").write_text("x")
    os.chmod(app / "sgid", 0o2755)
    (app / "both").write_text("x")
    os.chmod(app / "both", 0o6777)
    (app / "sticky-dir").mkdir()
    os.chmod(app / "sticky-dir", 0o1777)
    os.close(os.open(app / "created-suid", os.O_CREAT | os.O_WRONLY, 0o4755))
    os.mkdir(app / "made-dir", 0o3777)
    for name, make in (("char-dev", lambda p: os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))),
                       ("block-dev", lambda p: os.mknod(p, stat.S_IFBLK | 0o666, os.makedev(7, 0))),
                       ("fifo", os.mkfifo),
                       ("mknod-reg", lambda p: os.mknod(p, stat.S_IFREG | 0o4755))):
        try:
            make(app / name)
        except OSError as exc:
            refused[name] = exc.strerror
    return refused


def assert_no_set_id_or_special_file(project: Path) -> None:
    for path in [project, *project.rglob("*")]:
        mode = path.lstat().st_mode
        assert stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode), f"{path.name}: {oct(mode)}"
        assert stat.S_IMODE(mode) & 0o7000 == 0, f"{path.name}: {oct(mode)}"


@needs_fuse
def test_the_mount_leaves_no_set_id_bit_device_or_fifo_on_the_host(point, project):
    with guest.Mount(LocalConn(), project, str(point), timeout=15):
        refused = set_id_attempts(point)
        assert {"char-dev", "block-dev", "fifo"} <= set(refused), refused
        assert stat.S_IMODE((point / "suid").stat().st_mode) == 0o755  # chmod itself still works
    assert_no_set_id_or_special_file(project)
    assert stat.S_IMODE((project / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((project / "both").stat().st_mode) == 0o777
    assert stat.S_IMODE((project / "sticky-dir").stat().st_mode) == 0o777
    assert stat.S_IMODE((project / "created-suid").stat().st_mode) == 0o755 & ~os.umask(os.umask(0))


needs_bwrap = needs.mark(needs.bwrap_problem())


@needs_fuse
@needs_bwrap
def test_a_confined_mount_never_reuses_an_unconfined_one(point, project, monkeypatch):
    """``CORE_MOUNT_CONFINE=off inv serve`` then ``inv claude``: claude must not get serve's mount."""
    monkeypatch.delenv("CORE_MOUNT_CONFINE", raising=False)
    conn = LocalConn()
    with guest.Mount(conn, project, str(point), timeout=15, confine="off") as unconfined:
        assert not unconfined.confined and not unconfined.reused
        with pytest.raises(GuestError, match="holds an unconfined mount of this project .* stop that command first"):
            guest.Mount(conn, project, str(point), timeout=15, confine="require").start()
        with pytest.raises(GuestError, match="holds an unconfined mount"):  # auto sandboxes here: no less
            guest.Mount(conn, project, str(point), timeout=15).start()
        with guest.Mount(conn, project, str(point), timeout=15, confine="off") as also_off:
            assert also_off.reused and not also_off.confined
        assert mounted_at(point) == [unconfined.source]
    with guest.Mount(conn, project, str(point), timeout=15, confine="require") as confined:
        with guest.Mount(conn, project, str(point), timeout=15, confine="off") as user:
            assert user.reused and user.confined  # more confined than asked: fine
        assert mounted_at(point) == [confined.source]
    assert mounted_at(point) == []


@needs_fuse
@needs_bwrap
def test_a_git_read_only_mount_never_reuses_one_with_git_writable(point, project, monkeypatch):
    """``inv test`` then ``inv claude --live``: claude must not get a mount through which .git is
    writable; the other way round, test may use claude's stricter mount."""
    monkeypatch.delenv("CORE_MOUNT_CONFINE", raising=False)
    (project / ".git").mkdir()
    (project / ".git" / "config").write_text("[core]\n")
    conn = LocalConn()
    with guest.Mount(conn, project, str(point), timeout=15, confine="require") as plain:
        with pytest.raises(GuestError, match="holds a mount of this project through which .git is writable"):
            guest.Mount(conn, project, str(point), timeout=15, confine="require", read_only=[".git"]).start()
        assert mounted_at(point) == [plain.source]
    with guest.Mount(conn, project, str(point), timeout=15, confine="require", read_only=[".git"]) as guarded:
        assert ":guarded:" in guarded.source
        with pytest.raises(OSError):
            (point / ".git" / "config").write_text("[core]\n\tfsmonitor = x\n")
        (point / "elsewhere.txt").write_text("written")
        with guest.Mount(conn, project, str(point), timeout=15, confine="require") as user:
            assert user.reused and user.confined
    assert (project / ".git" / "config").read_text() == "[core]\n"
    assert (project / "elsewhere.txt").read_text() == "written"
    assert mounted_at(point) == []


@needs_fuse
def test_the_owner_leaving_waits_for_the_mount_s_other_users(point, project, capfd):
    """``inv serve`` ends while ``inv test`` runs on its mount: the mount stays until test ends."""
    conn = LocalConn()
    owner = guest.Mount(conn, project, str(point), timeout=15)
    owner.start()
    user = guest.Mount(conn, project, str(point), timeout=15)
    stopper = None
    try:
        user.start()
        assert user.reused
        stopper = threading.Thread(target=owner.stop)
        stopper.start()
        deadline = time.monotonic() + 15
        while "is still used by another command" not in capfd.readouterr().err:
            assert time.monotonic() < deadline, "the owner did not say it waits"
            time.sleep(0.05)
        stopper.join(1.5)
        assert stopper.is_alive(), "the owner went without waiting"
        assert (point / "hello.txt").read_text() == "hello\n"  # still served
        (point / "still-there.txt").write_text("yes")
        assert (project / "still-there.txt").read_text() == "yes"
        user.stop()
        stopper.join(15)
        assert not stopper.is_alive()
        assert mounted_at(point) == []
    finally:
        user.stop()
        if stopper is not None:
            stopper.join(15)
        owner.stop()


class NoticeWatch(io.StringIO):
    """sys.stderr that sends this process SIGINT (Ctrl-C) once the owner says it waits."""

    def write(self, text):
        if "is still used by another command" in text:
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


@needs_fuse
def test_ctrl_c_while_the_owner_waits_unmounts_at_once(point, project, monkeypatch):
    conn = LocalConn()
    owner = guest.Mount(conn, project, str(point), timeout=15)
    owner.start()
    user = guest.Mount(conn, project, str(point), timeout=15)
    try:
        user.start()
        monkeypatch.setattr(sys, "stderr", NoticeWatch())
        with pytest.raises(KeyboardInterrupt):
            owner.stop()
        assert mounted_at(point) == []
    finally:
        user.stop()
        owner.stop()


def test_sshfs_symlink_containment_is_off_when_the_guests_sshfs_has_it():
    """Debian's sshfs refuses every link whose target holds '..' unless told not to (its server,
    the host's project, is no threat to the guest); older ones do not know the option."""
    from devops_tasks.guest.mount import mount_script

    script = mount_script("/app", "devops-tasks:0123", "t")
    assert 'if grep -qs no_contain_symlinks "$s"; then echo 1; else echo 0; fi >"$k"' in script  # probed once a boot
    assert '[ "$nc" = 1 ] && o="$o,no_contain_symlinks"' in script
    assert 'sshfs : "$D" -f -o "$o"' in script

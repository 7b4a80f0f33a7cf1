"""The virtiofs project mount against one real guest (TCG) booted with ``vm.mount_type: virtiofs``.

Everything runs through the real entry points (``inv``, ``devops``) with ``CORE_HOME`` in tmp and
a free port. The attacks run for real as root in the guest; the host is checked afterwards.
Waits poll with deadlines.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import needs
from devops_tasks import guest
from devops_tasks.guest.virtiofs import find_virtiofsd
from devops_tasks.machine.process import qmp
from devops_tasks.manifest import ImageInfo, Manifest

from helpers import free_port, wait_for

pytestmark = [pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INV = str(BIN / "inv")
DEVOPS = str(BIN / "devops")
EXAMPLE = REPO / "examples" / "hello-pytest"


class Machine:
    def __init__(self, home: Path, env: dict):
        self.home, self.env = home, env

    def run(self, program: str, *args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([program, *args], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def shell(self, project: Path, script: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """``devops shell --project P -- sh -c SCRIPT``: the project at /app for the command only."""
        return self.run(DEVOPS, "shell", "--project", str(project), "--", "sh", "-c", script, timeout=timeout)

    def guest(self, script: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(DEVOPS, "shell", "--no-mount", "--", "sh", "-c", script, timeout=timeout)

    @property
    def record(self) -> dict:
        return json.loads((self.home / "vms" / "core-dev" / "record.json").read_text())

    def devices(self) -> list[str]:
        """The hot-plugged devices and added chardevs QEMU holds now."""
        sock = self.record["qmp_socket"]
        names = [item["name"] for item in qmp(sock, "qom-list", {"path": "/machine/peripheral"})
                 if item["name"] != "type"]
        names += [item["label"] for item in qmp(sock, "query-chardev") if item["label"].startswith("vfs")]
        return names


def virtiofsd_processes() -> list[str]:
    out = subprocess.run(["ps", "-eww", "-o", "stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "virtiofsd" in line and not line.startswith("Z")]


@pytest.fixture(scope="module")
def vm(request, tmp_path_factory):
    if find_virtiofsd() is None:
        needs.unavailable("virtiofsd is not installed (Debian 12: qemu-system-common)")
    needs.need(needs.bwrap_problem())
    try:
        image = Path(request.getfixturevalue("built_image"))
    except pytest.FixtureLookupError:
        needs.unavailable("needs the image builder's built_image fixture")
    base = tmp_path_factory.mktemp("vfs")
    home, images = base / "core", base / "images"
    home.mkdir()
    images.mkdir()
    port = free_port()
    (home / "config.yaml").write_text(f"vm:\n  ssh_port: {port}\n  memory: 1024\n  cpus: 2\n  boot_timeout: 180\n"
                                      "  mount_type: virtiofs\n")
    (images / "core-devops-linux-amd64.qcow2").symlink_to(image)
    manifest = Manifest(images / "manifest.json")
    manifest.set("core-devops-linux-amd64.qcow2", ImageInfo(version="v0.0.1-vfs", source="build", guest_contract=1))
    manifest.save()
    env = {**os.environ, "CORE_HOME": str(home), "CORE_IMAGES_DIR": str(images)}
    env.pop("SSH_AUTH_SOCK", None)
    with pytest.MonkeyPatch.context() as mp:
        for key in ("CORE_HOME", "CORE_IMAGES_DIR"):
            mp.setenv(key, env[key])
        machine = Machine(home, env)
        try:
            boot = machine.run(INV, "vm.boot", timeout=300)
            assert boot.returncode == 0, boot.stdout + boot.stderr
            yield machine
        finally:
            with pytest.MonkeyPatch.context():
                try:
                    from devops_tasks.devops import DevOps

                    guest.close_master(DevOps().vm.target())
                except Exception:
                    pass
            machine.run(INV, "vm.stop", timeout=120)


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "proj"
    shutil.copytree(EXAMPLE, root)
    return root


def assert_share_gone(vm: Machine) -> None:
    assert virtiofsd_processes() == []
    assert wait_for(lambda: vm.devices() == [], 60, "the share's device and chardev to go"), vm.devices()


def test_status_and_list_show_the_mount_type(vm):
    status = vm.run(INV, "vm.status", "--json")
    assert json.loads(status.stdout)["mount_type"] == "virtiofs"
    assert "Mount type: virtiofs" in vm.run(INV, "vm.status").stdout
    assert "virtiofs" in vm.run(INV, "vm.list").stdout.splitlines()[1].split()


def test_inv_test_of_the_example_over_virtiofs(vm, project):
    result = vm.run(INV, "test", cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout
    assert "sshfs" not in result.stdout + result.stderr  # no fallback note
    assert_share_gone(vm)


def test_edits_both_ways(vm, project):
    (project / "from-host.txt").write_text("written on the host\n")
    result = vm.shell(project, "awk '$2 == \"/app\" {print $3}' /proc/mounts; cat /app/from-host.txt; "
                      "echo 'written in the guest' > /app/from-guest.txt; mkdir -p /app/sub/deeper; "
                      "echo nested > /app/sub/deeper/n.txt; echo more >> /app/from-host.txt; rm /app/hello.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == ["virtiofs", "written on the host"]
    assert (project / "from-guest.txt").read_text() == "written in the guest\n"
    assert (project / "sub" / "deeper" / "n.txt").read_text() == "nested\n"
    assert (project / "from-host.txt").read_text() == "written on the host\nmore\n"
    assert not (project / "hello.py").exists()
    for path in (project / "from-guest.txt", project / "sub", project / "sub" / "deeper" / "n.txt"):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid()), path
    assert_share_gone(vm)


ATTACKS = """\
cd /app || exit 1
try() { if sh -c "$1" >/dev/null 2>&1; then echo "MADE $1"; else echo "refused $1"; fi; }
try 'chmod 4755 victim'
try 'chmod 2755 victim'
try 'chmod 6777 victim'
try 'mkdir -m 2755 sgid-dir'
try 'mkfifo fifo'
try 'mknod char-dev c 1 3'
try 'mknod block-dev b 7 0'
try 'ln /etc/passwd hard-from-guest'
try 'cat link-out'
try "cat $SECRET"
try "cat /app/../..$SECRET"
python3 - <<'PY'
import os, socket
def attempt(name, fn):
    try:
        fn()
        print("MADE", name)
    except OSError as exc:
        print("refused", name, exc.errno)
attempt("open 04755", lambda: os.close(os.open("/app/created-suid", os.O_CREAT | os.O_WRONLY, 0o4755)))
attempt("open 02755", lambda: os.close(os.open("/app/created-sgid", os.O_CREAT | os.O_WRONLY, 0o2755)))
attempt("fchmod 06755", lambda: os.fchmod(os.open("/app/victim", os.O_RDONLY), 0o6755))
attempt("mkfifo", lambda: os.mkfifo("/app/fifo2"))
attempt("mknod socket", lambda: os.mknod("/app/sock-node", 0o140755))
attempt("socket", lambda: socket.socket(socket.AF_UNIX).bind("/app/sock"))
attempt("..", lambda: print(open("/app/" + "../" * 12 + os.environ["SECRET"].lstrip("/")).read()))
PY
"""


def test_attacks_from_the_guest_reach_nothing_outside_and_leave_nothing_special(vm, project, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("PRIVATE KEY\n")
    before = secret.stat()
    (project / "victim").write_text("x\n")
    (project / "link-out").symlink_to(secret)
    (project / "rel-out").symlink_to(os.path.relpath(secret, project))
    result = vm.shell(project, f"SECRET={secret}; export SECRET\n" + ATTACKS + "try 'cat rel-out'\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "MADE" not in out and out.count("refused") == 19, out
    assert "PRIVATE" not in out
    for path in [project, *project.rglob("*")]:
        mode = path.lstat().st_mode
        assert stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode), f"{path.name}: {oct(mode)}"
        assert stat.S_IMODE(mode) & 0o6000 == 0, f"{path.name}: {oct(mode)}"
    # A guest socket lives in the guest (the kernel keeps it; nothing reaches the host).
    assert not (project / "sock").exists() or stat.S_ISREG((project / "sock").lstat().st_mode)
    after = secret.stat()
    assert secret.read_text() == "PRIVATE KEY\n" and after.st_mtime_ns == before.st_mtime_ns
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert_share_gone(vm)


LEFTOVER = """\
cd /app/sub || exit 1
exec 3</app/keep.txt
setsid sh -c 'cd /app/sub; exec 3</app/keep.txt; echo started > /tmp/leftover.log;
  while [ ! -e /tmp/leftover.go ]; do sleep 0.05; done;
  cat later.txt >> /tmp/leftover.log 2>&1; cat ../later.txt >> /tmp/leftover.log 2>&1;
  cat <&3 >> /tmp/leftover.log 2>&1; echo done >> /tmp/leftover.log' </dev/null >/dev/null 2>&1 &
while ! grep -qs started /tmp/leftover.log; do sleep 0.05; done
echo holder-started
"""


def test_the_share_is_gone_after_the_command_even_for_a_process_that_kept_a_fd_or_cwd(vm, project):
    (project / "sub").mkdir()
    (project / "keep.txt").write_text("kept but never read\n")
    vm.guest("rm -f /tmp/leftover.log /tmp/leftover.go")
    result = vm.shell(project, LEFTOVER)
    assert result.returncode == 0, result.stderr
    assert "holder-started" in result.stdout
    assert_share_gone(vm)
    (project / "later.txt").write_text("HOST SECRET WRITTEN LATER\n")
    (project / "sub" / "later.txt").write_text("HOST SECRET WRITTEN LATER\n")
    vm.guest("touch /tmp/leftover.go")
    deadline = time.monotonic() + 10  # a negative check: the leftover gets 10 s to read something
    text = ""
    while time.monotonic() < deadline:
        text = vm.guest("cat /tmp/leftover.log").stdout
        if "done" in text:
            break
        time.sleep(0.5)
    assert "HOST SECRET" not in text and "kept but never read" not in text, text
    assert vm.guest("awk '$2 == \"/app\"' /proc/mounts").stdout.strip() == ""


def test_a_second_command_reuses_the_share_of_its_project_and_another_project_is_busy(vm, project, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(EXAMPLE, other)
    holder = subprocess.Popen([DEVOPS, "shell", "--project", str(project), "--", "sh", "-c",
                               "touch /app/holding; while [ ! -e /app/release ]; do sleep 0.1; done"],
                              cwd=REPO, env=vm.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (project / "holding").exists(), 120, "the first command's mount")
        again = vm.run(INV, "test", cwd=project)
        assert again.returncode == 0 and "4 passed" in again.stdout, again.stdout + again.stderr
        busy = vm.run(INV, "test", cwd=other)
        assert busy.returncode != 0
        assert "already holds a live mount of another folder" in busy.stderr + busy.stdout
        assert len([p for p in virtiofsd_processes() if "bwrap" in p]) == 1  # busy and reuse start none
    finally:
        (project / "release").write_text("")
        out, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, err
    assert_share_gone(vm)


def test_a_kept_virtiofs_share_serves_later_commands_then_goes_when_idle(vm, project):
    """``vm.mount_idle_timeout`` on a virtiofs VM: the keeper holds the hot-plugged share (one
    virtiofsd), the next command uses it at once, and idle it is unplugged like any other."""
    config = vm.home / "config.yaml"
    saved = config.read_text()
    config.write_text(saved + "  mount_idle_timeout: 6\n")

    def mounts() -> list[dict]:
        return json.loads(vm.run(INV, "vm.status", "--json").stdout)["mounts"]

    try:
        first = vm.run(INV, "test", cwd=project)
        assert first.returncode == 0 and "4 passed" in first.stdout, first.stdout + first.stderr
        [kept] = mounts()
        assert kept["kept"] and kept["project"] == str(project.resolve())
        assert len([p for p in virtiofsd_processes() if "bwrap" in p]) == 1  # the keeper's, after the command
        second = vm.run(INV, "test", "--", "cat", "hello.py", cwd=project)
        assert second.returncode == 0 and "def " in second.stdout, second.stderr
        assert [m["pid"] for m in mounts()] == [kept["pid"]]
        wait_for(lambda: mounts() == [], 60, "the kept share to end when idle")
        # the keeper unplugs after it stopped answering: give it a deadline to finish
        wait_for(lambda: virtiofsd_processes() == [], 60, "the keeper to finish")
        assert_share_gone(vm)
    finally:
        config.write_text(saved)


def test_a_guest_without_virtiofs_falls_back_to_sshfs_with_a_note(vm, project):
    """Last in this module: it takes the module out of the guest."""
    gone = vm.guest("rmmod virtiofs && ! grep -qw virtiofs /proc/filesystems && ! modprobe virtiofs 2>/dev/null")
    if gone.returncode != 0:
        pytest.skip(f"cannot take virtiofs out of this guest: {gone.stderr.strip()}")
    result = vm.run(INV, "test", cwd=project)
    assert result.returncode == 0 and "4 passed" in result.stdout, result.stdout + result.stderr
    notes = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Note:")]
    assert notes == ["Note: mounting the project over sshfs, not virtiofs: the guest image has no virtiofs kernel module"]
    assert_share_gone(vm)

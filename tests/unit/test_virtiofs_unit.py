"""The virtiofs backend's pure parts: the seccomp program (run by a small BPF interpreter here, and
once for real under bwrap), virtiofsd's command line, the QMP arguments, the config key, QEMU's
shared memory and the backend choice (no VM)."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import needs
from devops_tasks.config import check_mount_type, default_config, load_config
from devops_tasks.errors import ConfigError, GuestError
from devops_tasks.guest import mounts, virtiofs
from devops_tasks.guest.virtiofs import (RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS, chardev_add_args, device_add_args,
                                         seccomp_program, tag_prefix, virtiofsd_command)
from devops_tasks.machine.qemu import MachineSpec, build_argv

X86, ARM = 0xC000003E, 0xC00000B7
EPERM, ENOSYS = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS


def run_bpf(program: bytes, nr: int, args=(0, 0, 0, 0, 0, 0), arch: int = X86) -> int:
    """Classic BPF as the kernel runs a seccomp filter (the few opcodes the program uses)."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [struct.unpack("=HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    a, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:
            a = struct.unpack_from("=I", data, k)[0]
        elif code == 0x54:
            a &= k
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x35:
            pc += jt if a >= k else jf
        elif code == 0x45:
            pc += jt if a & k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


X86_PROG = seccomp_program("x86_64")


@pytest.mark.parametrize("name, nr, args, expected", [
    ("chmod 0755", 90, (0, 0o755), RET_ALLOW),
    ("chmod 04755", 90, (0, 0o4755), EPERM),
    ("chmod 02755", 90, (0, 0o2755), EPERM),
    ("fchmod 06755", 91, (3, 0o6755), EPERM),
    ("fchmodat 0644", 268, (3, 0, 0o644), RET_ALLOW),
    ("fchmodat 04755", 268, (3, 0, 0o4755), EPERM),
    ("open O_CREAT 04755", 2, (0, 0o101, 0o4755), EPERM),
    ("openat O_CREAT 0644", 257, (3, 0, 0o101, 0o644), RET_ALLOW),
    ("openat O_CREAT 04755", 257, (3, 0, 0o101, 0o4755), EPERM),
    ("creat 02755", 85, (0, 0o2755), EPERM),
    ("mkdir 02755", 83, (0, 0o2755), EPERM),
    ("mkdirat 0755", 258, (3, 0, 0o755), RET_ALLOW),
    ("mkdirat 02000", 258, (3, 0, 0o2000), EPERM),
    ("mknodat fifo", 259, (3, 0, 0o010644, 0), EPERM),
    ("mknodat char device", 259, (3, 0, 0o020644, 0x103), EPERM),
    ("mknodat socket", 259, (3, 0, 0o140755, 0), EPERM),
    ("mknodat block device", 259, (3, 0, 0o060644, 0x700), EPERM),
    ("mknodat regular file", 259, (3, 0, 0o100644, 0), RET_ALLOW),
    ("mknodat mode 0", 259, (3, 0, 0o644, 0), RET_ALLOW),
    ("mknodat regular setuid", 259, (3, 0, 0o104755, 0), EPERM),
    ("mknod fifo", 133, (0, 0o010644, 0), EPERM),
    ("openat2", 437, (3, 0, 0, 24), ENOSYS),
    ("fchmodat2", 452, (3, 0, 0o4755, 0), ENOSYS),
    ("read", 0, (3, 0, 100), RET_ALLOW),
    ("x32 openat", 0x40000000 + 257, (3, 0, 0o101, 0o644), RET_KILL_PROCESS),
])
def test_x86_filter(name, nr, args, expected):
    assert run_bpf(X86_PROG, nr, args) == expected, name


def test_another_architecture_is_killed():
    assert run_bpf(X86_PROG, 15, (0, 0o4755), arch=0x40000003) == RET_KILL_PROCESS  # i386 chmod


def test_arm64_filter():
    prog = seccomp_program("aarch64")
    assert run_bpf(prog, 53, (3, 0, 0o4755), arch=ARM) == EPERM  # fchmodat
    assert run_bpf(prog, 56, (3, 0, 0o101, 0o644), arch=ARM) == RET_ALLOW  # openat
    assert run_bpf(prog, 33, (3, 0, 0o010644, 0), arch=ARM) == EPERM  # mknodat fifo
    assert run_bpf(prog, 53, (3, 0, 0o4755), arch=X86) == RET_KILL_PROCESS


def test_unknown_architecture_is_unavailable():
    with pytest.raises(virtiofs.VirtiofsUnavailable, match="riscv64"):
        seccomp_program("riscv64")


def test_filter_applied_for_real_by_bwrap(tmp_path):
    tmp_path = tmp_path / "share"
    tmp_path.mkdir()
    """The program as bwrap loads it: set-id modes, fifos and socket nodes (virtiofsd makes a guest's
    socket with mknodat, never bind) refused, the rest works."""
    needs.need(needs.bwrap_problem())
    import platform

    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("filter tables for x86_64 and aarch64 only")
    script = (
        "import os, socket, sys\n"
        "d = sys.argv[1]\n"
        "def t(name, fn):\n"
        "    try:\n        fn(); print(name, 'ok')\n"
        "    except OSError as e:\n        print(name, e.errno)\n"
        "t('create', lambda: os.close(os.open(d + '/plain', os.O_CREAT | os.O_WRONLY, 0o644)))\n"
        "t('chmod', lambda: os.chmod(d + '/plain', 0o755))\n"
        "t('chmod4755', lambda: os.chmod(d + '/plain', 0o4755))\n"
        "t('open4755', lambda: os.open(d + '/suid', os.O_CREAT | os.O_WRONLY, 0o4755))\n"
        "t('mkfifo', lambda: os.mkfifo(d + '/fifo'))\n"
        "t('socket', lambda: os.mknod(d + '/sock', 0o140755))\n"
    )
    read_end, write_end = os.pipe()
    with open(write_end, "wb") as pipe:
        pipe.write(seccomp_program())
    result = subprocess.run(["bwrap", "--dev-bind", "/", "/", "--seccomp", str(read_end), sys.executable, "-c",
                             script, str(tmp_path)], capture_output=True, text=True, pass_fds=[read_end], timeout=60)
    os.close(read_end)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == [
        "create ok", "chmod ok", f"chmod4755 {errno.EPERM}", f"open4755 {errno.EPERM}",
        f"mkfifo {errno.EPERM}", f"socket {errno.EPERM}",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
    assert (tmp_path / "plain").stat().st_mode & 0o7777 == 0o755


def test_virtiofsd_command(tmp_path):
    command = virtiofsd_command(tmp_path, tmp_path / "v.sock", "/usr/lib/qemu/virtiofsd", "/usr/bin/bwrap",
                                machine="x86_64")
    argv = list(command.argv)
    assert argv[:3] == ["/usr/bin/bwrap", "--die-with-parent", "--new-session"]
    (index, program), = command.files
    assert argv[index - 1] == "--seccomp" and program == X86_PROG
    rest = argv[argv.index("--") + 1:]
    assert rest[1:4] == ["-r", "--", "/usr/lib/qemu/virtiofsd"]
    assert f"--socket-path={tmp_path / 'v.sock'}" in rest
    assert ["-o", f"source={tmp_path}"] == rest[rest.index(f"source={tmp_path}") - 1:rest.index(f"source={tmp_path}") + 1]
    assert "no_xattr" in rest
    assert command.env == {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def test_qmp_arguments():
    assert chardev_add_args("vfsc-1", "/v/vfs-1.sock") == {
        "id": "vfsc-1",
        "backend": {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": "/v/vfs-1.sock"}},
                                               "server": False}},
    }
    assert device_add_args("vfsd-1", "vfsc-1", "dtabc-1") == {
        "driver": "vhost-user-fs-pci", "chardev": "vfsc-1", "tag": "dtabc-1", "id": "vfsd-1"}


def test_tags_are_short_and_per_project():
    a, b = tag_prefix(Path("/p/a")), tag_prefix(Path("/p/b"))
    assert a != b and a == tag_prefix(Path("/p/a"))
    assert len(a + "0123abcd") <= 36 and "/" not in a


def test_mount_scripts_quote_and_name_the_tag():
    script = virtiofs.mount_script("/app", "dtx-", "0123abcd")
    assert "mount -t virtiofs" in script and "say ready" in script and "say nomodule" in script
    unmount = virtiofs.unmount_script("/app", "dtx-0123abcd")
    assert "F=dtx-0123abcd" in unmount and "/mount-users/0123abcd" in unmount


def test_shared_memory_argv():
    spec = MachineSpec(name="v", arch="amd64", accel="tcg", memory=1024, cpus=2, disk=Path("/v/d"),
                       pidfile=Path("/v/p"), qmp_socket=Path("/v/q"), serial_socket=Path("/v/s"),
                       serial_log=Path("/v/l"), ssh_port=2200)
    assert "memory-backend-memfd" not in " ".join(build_argv(spec))
    import dataclasses

    argv = build_argv(dataclasses.replace(spec, shared_memory=True))
    i = argv.index("-object")
    assert argv[i:i + 4] == ["-object", "memory-backend-memfd,id=mem,size=1024M,share=on",
                             "-machine", "memory-backend=mem"]


def test_mount_type_config(tmp_path, monkeypatch):
    assert default_config().vm.mount_type == "virtiofs"
    assert check_mount_type("sshfs", "x") == "sshfs"
    with pytest.raises(ConfigError) as info:
        check_mount_type("9p", "cfg: vm.mount_type")
    text = str(info.value)
    assert "\n" not in text and "'9p'" in text and "CONFIG_9P_FS" in text
    with pytest.raises(ConfigError, match=r"unknown mount type 'nfs' \(valid: virtiofs, sshfs\)"):
        check_mount_type("nfs", "x")
    path = tmp_path / "config.yaml"
    path.write_text("vm:\n  mount_type: 9p\n")
    with pytest.raises(ConfigError, match=rf"^{path}: vm.mount_type: mount type '9p' is not available"):
        load_config(path)
    path.write_text("vm:\n  mount_type: SSHFS\n")
    assert load_config(path).vm.mount_type == "sshfs"


class FakeMount:
    started: list = []

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.reused = args, kwargs, False

    def start(self):
        FakeMount.started.append((type(self).__name__, self.kwargs.get("read_only", ())))

    def stop(self):
        pass


class FakeVirtiofs(FakeMount):
    fail = ""

    def start(self):
        if FakeVirtiofs.fail:
            raise virtiofs.VirtiofsUnavailable(FakeVirtiofs.fail)
        super().start()


@pytest.fixture
def fakes(monkeypatch):
    FakeMount.started = []
    FakeVirtiofs.fail = ""
    monkeypatch.setattr(mounts, "Mount", FakeMount)
    monkeypatch.setattr(mounts, "VirtiofsMount", FakeVirtiofs)
    return FakeMount.started


def test_open_mount_picks_by_the_vms_mount_type(fakes, tmp_path):
    notes = []
    with mounts.open_mount(None, tmp_path, mount_type="virtiofs", qmp=print, runtime_dir=tmp_path,
                           note=notes.append) as m:
        assert m.mount_type == "virtiofs"
    with mounts.open_mount(None, tmp_path, mount_type="sshfs", qmp=print, runtime_dir=tmp_path) as m:
        assert m.mount_type == "sshfs"
    with mounts.open_mount(None, tmp_path, mount_type="virtiofs", qmp=print, runtime_dir=tmp_path,
                           read_only=(".git",), note=notes.append) as m:
        assert m.mount_type == "sshfs"  # per-path read-only: sshfs only
    assert fakes == [("FakeVirtiofs", ()), ("FakeMount", ()), ("FakeMount", (".git",))]
    assert notes == []


def test_open_mount_falls_back_to_sshfs_with_a_note(fakes, tmp_path):
    FakeVirtiofs.fail = "the guest image has no virtiofs kernel module"
    notes = []
    with mounts.open_mount(None, tmp_path, mount_type="virtiofs", qmp=print, runtime_dir=tmp_path,
                           note=notes.append) as m:
        assert m.mount_type == "sshfs"
    assert notes == ["Note: mounting the project over sshfs, not virtiofs: the guest image has no virtiofs kernel module"]


def test_missing_virtiofsd_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(virtiofs, "find_virtiofsd", lambda: None)
    mount = virtiofs.VirtiofsMount(None, tmp_path, print, tmp_path)
    with pytest.raises(virtiofs.VirtiofsUnavailable, match="virtiofsd is not installed"):
        mount.start()
    assert issubclass(virtiofs.VirtiofsUnavailable, GuestError)

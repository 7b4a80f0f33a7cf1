"""QEMU's exact argument list, binary by architecture, and accelerator detection (no QEMU started)."""

from pathlib import Path

import pytest

from devops_tasks.errors import VMError
from devops_tasks.machine import qemu
from devops_tasks.machine.qemu import MachineSpec, build_argv, detect_accel, image_arch, qemu_binary

D = Path("/v/core-dev")


def spec(**changes):
    base = dict(
        name="core-dev", arch="amd64", accel="tcg", memory=512, cpus=2, disk=D / "overlay.qcow2",
        pidfile=D / "qemu.pid", qmp_socket=D / "qmp.sock", serial_socket=D / "serial.sock",
        serial_log=D / "serial.log", ssh_port=2222, host_key=D / "hostkey",
        authorized_keys=Path("/h/id_ed25519.pub"),
    )
    base.update(changes)
    return MachineSpec(**base)


def test_tcg_x86_argv_exact():
    assert build_argv(spec()) == [
        "qemu-system-x86_64", "-name", "core-dev",
        "-accel", "tcg,thread=multi", "-cpu", "max",
        "-m", "512", "-smp", "2",
        "-daemonize", "-pidfile", "/v/core-dev/qemu.pid",
        "-display", "none", "-nodefaults", "-no-user-config",
        "-qmp", "unix:/v/core-dev/qmp.sock,server=on,wait=off",
        "-chardev", "socket,id=s0,path=/v/core-dev/serial.sock,server=on,wait=off,logfile=/v/core-dev/serial.log",
        "-serial", "chardev:s0",
        "-drive", "file=/v/core-dev/overlay.qcow2,if=virtio,format=qcow2",
        "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22",
        "-device", "virtio-net-pci,netdev=n0",
        "-device", "virtio-rng-pci",
        "-fw_cfg", "name=opt/devops-tasks/ssh_host_ed25519_key,file=/v/core-dev/hostkey",
        "-fw_cfg", "name=opt/devops-tasks/authorized_keys,file=/h/id_ed25519.pub",
    ]


def test_kvm_uses_host_cpu_and_binary_override():
    argv = build_argv(spec(accel="kvm", memory=4096, cpus=4), binary="/usr/bin/qemu-system-x86_64")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert argv[3:7] == ["-accel", "kvm", "-cpu", "host"]
    assert argv[7:11] == ["-m", "4096", "-smp", "4"]


def test_forwards_bind_loopback_only():
    argv = build_argv(spec(ssh_port=40022, forwards=((8000, 8000),)))
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev == "user,id=n0,hostfwd=tcp:127.0.0.1:40022-:22,hostfwd=tcp:127.0.0.1:8000-:8000"
    assert "hostfwd=tcp::" not in " ".join(argv)
    assert "-nographic" not in argv and "stdio" not in " ".join(argv)


def test_commas_in_paths_are_escaped():
    argv = build_argv(spec(disk=Path("/a,b/overlay.qcow2"), host_key=Path("/k,1")))
    assert "file=/a,,b/overlay.qcow2,if=virtio,format=qcow2" in argv
    assert "name=opt/devops-tasks/ssh_host_ed25519_key,file=/k,,1" in argv


def test_no_keys_no_fw_cfg():
    argv = build_argv(spec(host_key=None, authorized_keys=None))
    assert "-fw_cfg" not in argv


def test_arm64_uses_aarch64_virt_and_firmware():
    argv = build_argv(spec(arch="arm64", accel="hvf", firmware=Path("/fw/edk2.fd")))
    assert argv[:7] == ["qemu-system-aarch64", "-name", "core-dev", "-machine", "virt", "-bios", "/fw/edk2.fd"]
    assert argv[7:11] == ["-accel", "hvf", "-cpu", "host"]


def test_unknown_accel_is_an_error():
    with pytest.raises(VMError, match="unknown accelerator"):
        build_argv(spec(accel="xen"))


NESTED = "processor: 0\nflags\t\t: fpu vme de pse hypervisor lahf_lm\n"
VMX = "processor: 0\nflags\t\t: fpu vme vmx hypervisor\n"
SVM = "flags: fpu svm\n"


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(cpuinfo=NESTED, kvm_usable=True), "tcg"),  # nested KVM without vmx: would hang
        (dict(cpuinfo=VMX, kvm_usable=True), "kvm"),
        (dict(cpuinfo=SVM, kvm_usable=True), "kvm"),
        (dict(cpuinfo=VMX, kvm_usable=False), "tcg"),  # /dev/kvm missing or not ours
        (dict(cpuinfo=VMX, kvm_usable=True, host_arch="arm64"), "tcg"),  # foreign guest
        (dict(system="darwin", host_arch="amd64"), "hvf"),
        (dict(system="win32", host_arch="amd64"), "tcg"),
        (dict(cpuinfo=NESTED, kvm_usable=True, override="kvm"), "kvm"),
        (dict(cpuinfo=VMX, kvm_usable=True, override=" TCG "), "tcg"),
    ],
)
def test_detect_accel(kwargs, expected):
    kwargs.setdefault("system", "linux")
    kwargs.setdefault("host_arch", "amd64")
    assert detect_accel("amd64", **kwargs) == expected


def test_arm64_linux_kvm_needs_only_dev_kvm():
    assert detect_accel("arm64", system="linux", host_arch="arm64", cpuinfo="Features: fp asimd", kvm_usable=True) == "kvm"


def test_bad_override_is_an_error():
    with pytest.raises(VMError, match="CORE_ACCEL"):
        detect_accel("amd64", override="fast")


def test_env_beats_config(monkeypatch):
    monkeypatch.setenv("CORE_ACCEL", "tcg")
    assert qemu.accel_override("kvm") == "tcg"
    monkeypatch.delenv("CORE_ACCEL")
    assert qemu.accel_override("kvm") == "kvm"


def test_image_arch_from_name():
    assert image_arch("/x/core-devops-linux-arm64.qcow2") == "arm64"
    assert image_arch("core-devops-darwin-amd64.qcow2") == "amd64"


def test_missing_qemu_names_the_package(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(VMError, match=r"qemu-system-x86_64 not found: install qemu-system-x86"):
        qemu_binary("amd64", system="linux")
    with pytest.raises(VMError, match=r"qemu-system-aarch64 not found: install qemu \(brew"):
        qemu_binary("arm64", system="darwin")


def test_binary_by_arch(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: f"/bin/{name}")
    assert qemu_binary("amd64") == "/bin/qemu-system-x86_64"
    assert qemu_binary("arm64") == "/bin/qemu-system-aarch64"
    with pytest.raises(VMError, match="unsupported"):
        qemu_binary("riscv64")


def test_restricted_network_is_restrict_on_plus_one_guestfwd_to_the_proxy_socket():
    argv = build_argv(spec(network="restricted", proxy_socket=D / "proxy.sock", socat="/usr/bin/socat"))
    assert argv[argv.index("-netdev") + 1] == (
        "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22,"
        "guestfwd=tcp:10.0.2.100:3128-cmd:/usr/bin/socat - UNIX-CONNECT:/v/core-dev/proxy.sock"
    )
    assert argv[-2:] == ["-fw_cfg", "name=opt/devops-tasks/proxy,string=http://10.0.2.100:3128"]


def test_open_network_has_no_restriction_and_no_proxy():
    argv = build_argv(spec())
    assert "restrict" not in " ".join(argv) and "guestfwd" not in " ".join(argv)
    assert "name=opt/devops-tasks/proxy" not in " ".join(argv)


@pytest.mark.parametrize("path", ["/v/my vms/proxy.sock", "/v/a,b/proxy.sock", "/v/$(id)/proxy.sock",
                                  "/v/a;b/proxy.sock", "/v/a:b/proxy.sock", "relative/proxy.sock"])
def test_the_guestfwd_command_takes_plain_paths_only(path):
    with pytest.raises(VMError, match="characters QEMU's guestfwd cannot take"):
        build_argv(spec(network="restricted", proxy_socket=Path(path), socat="/usr/bin/socat"))
    with pytest.raises(VMError, match="socat path"):
        build_argv(spec(network="restricted", proxy_socket=D / "proxy.sock", socat="/opt/my tools/socat"))


def test_unknown_network_mode_is_an_error():
    with pytest.raises(VMError, match="unknown network mode 'closed'"):
        build_argv(spec(network="closed"))

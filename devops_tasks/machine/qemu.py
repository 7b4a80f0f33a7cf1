"""QEMU's command line as a pure function of a :class:`MachineSpec`, plus binary and accelerator choice.

Kept pure so the exact argument list is unit-tested: it must start, create the console socket,
use the binary of the image's architecture, and forward SSH on 127.0.0.1 only.

Networking is QEMU's user mode, ``open`` (the guest reaches what the host reaches) or ``restricted``
(``restrict=on``: no connection out, not even to the host's loopback; only the SSH forward and one
way out, ``10.0.2.100:3128`` (:data:`GUEST_PROXY_URL`), which QEMU hands to ``socat``
connecting to a unix socket in the VM's folder where the host proxy listens while it runs). The
boundary is QEMU's, so root in the guest cannot undo it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import paths
from ..config import NETWORK_MODES
from ..errors import VMError

FW_CFG_VENDOR = "opt/devops-tasks"
# The address a restricted guest reaches the host proxy at (guestfwd: only this one connects out).
GUEST_PROXY_HOST = "10.0.2.100"
GUEST_PROXY_PORT = 3128
GUEST_PROXY_URL = f"http://{GUEST_PROXY_HOST}:{GUEST_PROXY_PORT}"
# QEMU runs a guestfwd command through shell-style parsing: only paths made of these characters go in.
_PLAIN_PATH = re.compile(r"^/[A-Za-z0-9/._+-]+$")
ACCELS = ("kvm", "hvf", "tcg")
_FW_CFG_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,30}$")  # fw_cfg names hold 55 bytes

_BINARIES = {"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}
# Which package provides the binary, to name it in the "QEMU missing" error.
_PACKAGES = {
    ("linux", "amd64"): "qemu-system-x86 (apt-get install qemu-system-x86 qemu-utils)",
    ("linux", "arm64"): "qemu-system-arm (apt-get install qemu-system-arm qemu-utils)",
}
# UEFI firmware for arm64 guests (x86 uses QEMU's built-in SeaBIOS).
_AARCH64_FIRMWARE = (
    "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd",
    "/usr/share/AAVMF/AAVMF_CODE.fd",
    "/opt/homebrew/share/qemu/edk2-aarch64-code.fd",
    "/usr/local/share/qemu/edk2-aarch64-code.fd",
)


def opt_value(text: str | os.PathLike) -> str:
    """Escape a value inside a QEMU ``key=value,...`` option: a comma is written ``,,``."""
    return str(text).replace(",", ",,")


@dataclass(frozen=True)
class MachineSpec:
    """Everything that decides QEMU's argument list. Paths must be absolute (QEMU chdirs to /)."""

    name: str
    arch: str  # Go spelling: amd64 | arm64
    accel: str  # kvm | hvf | tcg
    memory: int  # MB
    cpus: int
    disk: Path  # the VM's qcow2 overlay, never the installed image
    pidfile: Path
    qmp_socket: Path
    serial_socket: Path
    serial_log: Path
    ssh_port: int
    host_key: Path | None = None  # guest contract: the guest's ssh host private key
    authorized_keys: Path | None = None  # guest contract: the tool's login public key
    firmware: Path | None = None  # arm64 UEFI code
    forwards: tuple[tuple[int, int], ...] = field(default=())  # extra (host, guest) TCP forwards
    network: str = "open"  # open | restricted
    proxy_socket: Path | None = None  # restricted: the host proxy's unix socket
    socat: str = "socat"  # restricted: the absolute path of socat
    # guest contract: more files for the guest, (name under opt/devops-tasks/, host file)
    guest_files: tuple[tuple[str, Path], ...] = field(default=())
    # the guest's RAM in a shared memfd: a vhost-user device (virtiofsd) can be hot-plugged then
    shared_memory: bool = False


def accel_args(accel: str, arch: str) -> list[str]:
    if accel == "tcg":
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]
    if accel in ("kvm", "hvf"):
        return ["-accel", accel, "-cpu", "host"]
    raise VMError(f"unknown accelerator {accel!r} (use one of: {', '.join(ACCELS)})")


def build_argv(spec: MachineSpec, binary: str | None = None) -> list[str]:
    """The full argument list: daemonised, headless, QMP + serial sockets, 127.0.0.1-only forwards."""
    binary = binary or _BINARIES.get(spec.arch, "qemu-system-x86_64")
    argv = [binary, "-name", opt_value(spec.name)]
    if spec.arch == "arm64":
        argv += ["-machine", "virt"]
        if spec.firmware:
            argv += ["-bios", str(spec.firmware)]
    argv += accel_args(spec.accel, spec.arch)
    argv += ["-m", str(int(spec.memory)), "-smp", str(int(spec.cpus))]
    if spec.shared_memory:
        argv += memory_backend_args(spec.memory)
    argv += [
        "-daemonize",
        "-pidfile", str(spec.pidfile),
        "-display", "none",
        "-nodefaults",
        "-no-user-config",
        "-qmp", f"unix:{opt_value(spec.qmp_socket)},server=on,wait=off",
        "-chardev",
        f"socket,id=s0,path={opt_value(spec.serial_socket)},server=on,wait=off,"
        f"logfile={opt_value(spec.serial_log)}",
        "-serial", "chardev:s0",
        "-drive", f"file={opt_value(spec.disk)},if=virtio,format=qcow2",
    ]
    argv += ["-netdev", netdev_option(spec), "-device", "virtio-net-pci,netdev=n0"]
    argv += ["-device", "virtio-rng-pci"]
    if spec.host_key:
        argv += ["-fw_cfg", f"name={FW_CFG_VENDOR}/ssh_host_ed25519_key,file={opt_value(spec.host_key)}"]
    if spec.authorized_keys:
        argv += ["-fw_cfg", f"name={FW_CFG_VENDOR}/authorized_keys,file={opt_value(spec.authorized_keys)}"]
    if spec.network == "restricted":  # the guest exports it to login shells (HTTP_PROXY ...)
        argv += ["-fw_cfg", f"name={FW_CFG_VENDOR}/proxy,string={GUEST_PROXY_URL}"]
    for name, path in spec.guest_files:
        if not _FW_CFG_NAME_RE.match(name):
            raise VMError(f"invalid fw_cfg file name {name!r}")
        argv += ["-fw_cfg", f"name={FW_CFG_VENDOR}/{name},file={opt_value(path)}"]
    return argv


def memory_backend_args(memory: int) -> list[str]:
    """The guest's RAM as a shared memfd (``share=on``): vhost-user devices such as virtiofsd map it,
    and it must exist from boot (a running VM's RAM cannot be moved into one)."""
    return ["-object", f"memory-backend-memfd,id=mem,size={int(memory)}M,share=on", "-machine", "memory-backend=mem"]


def netdev_option(spec: MachineSpec) -> str:
    """``-netdev user,...``: the SSH and extra forwards on 127.0.0.1; restricted adds ``restrict=on``
    and the one guestfwd to the proxy socket."""
    if spec.network not in NETWORK_MODES:
        raise VMError(f"unknown network mode {spec.network!r} (valid: {', '.join(NETWORK_MODES)})")
    forwards = [(spec.ssh_port, 22), *spec.forwards]
    parts = ["user", "id=n0"]
    if spec.network == "restricted":
        parts.append("restrict=on")
    parts += [f"hostfwd=tcp:127.0.0.1:{int(h)}-:{int(g)}" for h, g in forwards]
    if spec.network == "restricted":
        if spec.proxy_socket is None:
            raise VMError("a restricted VM needs the proxy socket's path")
        for what, path in (("proxy socket", str(spec.proxy_socket)), ("socat", spec.socat)):
            if not _PLAIN_PATH.match(path):
                raise VMError(f"the {what} path {path!r} has characters QEMU's guestfwd cannot take "
                              "(letters, digits and / . _ + - only): set CORE_HOME or TMPDIR to a plain path")
        parts.append(f"guestfwd=tcp:{GUEST_PROXY_HOST}:{GUEST_PROXY_PORT}-cmd:{spec.socat} - "
                     f"UNIX-CONNECT:{spec.proxy_socket}")
    return ",".join(parts)


def plain_path(path: Path | str) -> bool:
    """Can ``path`` go into the guestfwd command as is?"""
    return bool(_PLAIN_PATH.match(str(path)))


def socat_binary() -> str:
    """Absolute path of socat (it carries a restricted guest's connections to the proxy socket)."""
    import shutil  # here, as in qemu_binary: reading records (vm.status) never needs it

    found = shutil.which("socat")
    if not found:
        raise VMError("socat not found: a restricted VM needs it (apt-get install socat; brew install socat)")
    return found


def image_arch(image: Path | str) -> str:
    """The guest architecture from an image name like ``core-devops-linux-arm64.qcow2``."""
    stem = Path(image).name.split(".")[0]
    tail = stem.rsplit("-", 1)[-1]
    return paths.go_arch(tail) if tail in ("amd64", "arm64", "x86_64", "aarch64") else paths.go_arch()


def qemu_binary(arch: str, system: str | None = None) -> str:
    """Absolute path of the QEMU system binary for ``arch``; a clear error naming the package if absent."""
    name = _BINARIES.get(arch)
    if name is None:
        raise VMError(f"unsupported image architecture {arch!r} (supported: amd64, arm64)")
    import shutil

    found = shutil.which(name)
    if found:
        return found
    os_name = paths.go_os(system)
    hint = _PACKAGES.get((os_name, arch), "qemu (brew install qemu)" if os_name == "darwin" else "qemu")
    raise VMError(f"{name} not found: install {hint}")


def aarch64_firmware() -> Path | None:
    for candidate in _AARCH64_FIRMWARE:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def _cpu_flags(cpuinfo: str) -> set[str]:
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _kvm_usable(device: str = "/dev/kvm") -> bool:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def detect_accel(
    arch: str,
    override: str = "",
    system: str | None = None,
    host_arch: str | None = None,
    cpuinfo: str | None = None,
    kvm_usable: bool | None = None,
) -> str:
    """``CORE_ACCEL`` / config override, else kvm only when the CPU flags *and* /dev/kvm allow it.

    A nested KVM without vmx/svm starts without error and then hangs the guest, so "try kvm, fall back
    on a start error" is wrong: the flags decide. hvf on macOS; tcg otherwise or for a foreign arch.
    """
    choice = (override or "").strip().lower()
    if choice:
        if choice not in ACCELS:
            raise VMError(f"unknown accelerator {override!r} in CORE_ACCEL/vm.accel (use one of: {', '.join(ACCELS)})")
        return choice
    os_name = paths.go_os(system)
    host = host_arch or paths.go_arch()
    if host != arch:
        return "tcg"
    if os_name == "darwin":
        return "hvf"
    if os_name != "linux":
        return "tcg"
    flags = _cpu_flags(cpuinfo if cpuinfo is not None else _read_cpuinfo())
    if arch == "amd64" and not ({"vmx", "svm"} & flags):
        return "tcg"
    usable = kvm_usable if kvm_usable is not None else _kvm_usable()
    return "kvm" if usable else "tcg"


def accel_override(config_value: str = "") -> str:
    """The environment beats the config file: ``CORE_ACCEL=tcg inv vm.boot``."""
    return os.environ.get("CORE_ACCEL", "") or config_value or ""


__all__ = [
    "MachineSpec",
    "build_argv",
    "detect_accel",
    "accel_override",
    "qemu_binary",
    "image_arch",
    "aarch64_firmware",
    "opt_value",
    "netdev_option",
    "socat_binary",
    "NETWORK_MODES",
    "GUEST_PROXY_URL",
]

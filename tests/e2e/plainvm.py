"""Boot an image with a plain QEMU command line and the guest contract's inputs (fw_cfg keys, a
serial socket with a log, user networking on a free port): what the image tests and the build
benchmark need, independent of the project's own VM code."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from helpers import free_port

READY_LINE = b"devops-tasks: ssh ready"


def accel_args() -> list[str]:
    """``CORE_ACCEL`` (kvm, hvf, tcg...) when set, else KVM only with vmx/svm *and* a usable
    /dev/kvm (a nested KVM without those flags hangs the guest), else multi-threaded TCG."""
    forced = os.environ.get("CORE_ACCEL", "").strip()
    if forced:
        return ["-accel", forced, "-cpu", "max" if forced.startswith("tcg") else "host"]
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M) and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


class PlainVM:
    """One guest on a qcow2 overlay of ``image`` (the image itself is never written)."""

    def __init__(self, image: Path, workdir: Path, keys: bool = True, memory: int = 512, cpus: int = 2):
        self.image = Path(image)
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keys = keys
        self.memory = memory
        self.cpus = cpus
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.overlay = self.dir / "overlay.qcow2"
        self.serial_log = self.dir / "serial.log"
        self.serial_sock = self.dir / "serial.sock"
        self.qmp_sock = self.dir / "qmp.sock"
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.login_key = self.dir / "id_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.started = 0.0

    def _keys(self) -> None:
        for key in (self.host_key, self.login_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)],
                               check=True)
        (self.dir / "authorized_keys").write_text(self.login_key.with_suffix(".pub").read_text())

    def argv(self) -> list[str]:
        args = [
            "qemu-system-x86_64", *accel_args(), "-m", str(self.memory), "-smp", str(self.cpus),
            "-display", "none", "-nodefaults", "-no-user-config",
            "-drive", f"file={self.overlay},if=virtio,format=qcow2",
            "-device", "virtio-rng-pci",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22", "-device", "virtio-net-pci,netdev=n0",
            "-chardev", f"socket,id=s0,path={self.serial_sock},server=on,wait=off,logfile={self.serial_log}",
            "-serial", "chardev:s0",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
        ]
        if self.keys:
            args += ["-fw_cfg", f"name=opt/devops-tasks/ssh_host_ed25519_key,file={self.host_key}",
                     "-fw_cfg", f"name=opt/devops-tasks/authorized_keys,file={self.dir / 'authorized_keys'}"]
        return args

    def start(self, fresh: bool = True) -> None:
        """Start QEMU in its own process group (Ctrl-C in the test run does not reach it)."""
        if fresh or not self.overlay.exists():
            self.overlay.unlink(missing_ok=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image.resolve()), "-F",
                            "qcow2", str(self.overlay)], check=True)
        self._keys()
        self.port = free_port()
        public = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {public[0]} {public[1]}\n")
        for path in (self.serial_log, self.serial_sock, self.qmp_sock):
            path.unlink(missing_ok=True)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds from QEMU start until the guest printed its readiness line."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.serial_log.exists() and READY_LINE in self.serial_log.read_bytes():
                return time.monotonic() - self.started
            if self.proc is not None and self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                raise RuntimeError(f"QEMU exited ({self.proc.returncode}): {out.strip()[-500:]}")
            time.sleep(0.02)
        raise TimeoutError(f"no '{READY_LINE.decode()}' within {timeout}s; serial log tail: {self.serial_tail()}")

    def serial_tail(self, size: int = 1500) -> str:
        try:
            return self.serial_log.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def ssh_argv(self, *command: str, agent: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
                "-o", "LogLevel=ERROR", "-i", str(self.login_key), "-p", str(self.port),
                *(["-A"] if agent else []), *extra, "root@127.0.0.1", *command]

    def ssh(self, *command: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        agent = kwargs.pop("agent", False)
        extra = kwargs.pop("extra", ())
        return subprocess.run(self.ssh_argv(*command, agent=agent, extra=extra), capture_output=True, text=True,
                              timeout=timeout, stdin=kwargs.pop("stdin", subprocess.DEVNULL), **kwargs)

    def qmp(self, command: str) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.qmp_sock))
            reader = sock.makefile("rb")
            reader.readline()  # greeting
            for cmd in ("qmp_capabilities", command):
                sock.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
                while True:
                    reply = json.loads(reader.readline())
                    if "return" in reply or "error" in reply:
                        break

    def wait_exit(self, timeout: float) -> bool:
        try:
            assert self.proc is not None
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

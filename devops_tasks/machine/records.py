"""One folder per VM under ``~/.core/vms/<name>/``: its record, lock, sockets, log, overlay and host key.

The record says which process *is* the VM (pid plus the kernel's start time plus its command line), so
a dead, zombie or reused PID never counts as running, and a stale record is removed rather
than left to hide a live VM. Writes are atomic and guarded by a per-VM ``flock``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Iterator

from .. import paths
from ..clock import now_utc, parse_time
from ..errors import VMError
from ..fsutil import atomic_write_text, file_lock, try_file_lock
from .qemu import plain_path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# sockaddr_un.sun_path is 108 bytes on Linux, 104 on macOS: keep a margin.
MAX_SOCKET_PATH = 100
PRIVATE_UMASK = 0o077  # what QEMU and qemu-img create in a VM's folder is the user's alone


@dataclass
class VMRecord:
    """What ``record.json`` holds about one running (or starting) VM."""

    id: str  # 8 lowercase hex characters
    name: str
    image: str
    pid: int
    process_start: str  # /proc/<pid>/stat field 22 (or `ps` lstart): guards against PID reuse
    started_at: str  # RFC 3339
    ssh_port: int
    memory: int
    cpus: int
    ports: dict[str, int] = field(default_factory=dict)
    status: str = "starting"  # starting | running
    accel: str = ""
    binary: str = ""
    pidfile: str = ""
    qmp_socket: str = ""
    serial_socket: str = ""
    serial_log: str = ""
    guest_contract: int = 0
    network: str = "open"  # open | restricted (a record from before network modes: open)
    # how /app reaches the project: virtiofs (booted with shared memory) | sshfs (a record from
    # before mount types: sshfs)
    mount_type: str = "sshfs"
    proxy_socket: str = ""  # restricted: where QEMU's guestfwd connects (the host proxy listens there)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "VMRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def uptime_seconds(self, now: datetime | None = None) -> float:
        try:
            started = parse_time(self.started_at)
        except ValueError:
            return 0.0
        return max(0.0, ((now or now_utc()) - started).total_seconds())


def validate_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise VMError(
            f"invalid VM name {name!r}: use letters, digits, '.', '_' or '-' (at most 63, not starting with '.' or '-')"
        )
    return name


class VMDir:
    """The paths of one VM. Sockets move to a short folder under the temp dir when the VM folder's
    path would be too long for a unix socket address."""

    def __init__(self, name: str, root: Path | None = None):
        self.name = validate_name(name)
        self.path = Path(root if root is not None else paths.vms_dir()).absolute() / name

    record = property(lambda self: self.path / "record.json")
    lock_path = property(lambda self: self.path / "lock")
    pidfile = property(lambda self: self.path / "qemu.pid")
    disk = property(lambda self: self.path / "overlay.qcow2")
    base_info = property(lambda self: self.path / "base.json")
    host_key = property(lambda self: self.path / "ssh_host_ed25519_key")
    serial_log = property(lambda self: self.path / "serial.log")
    qemu_stderr = property(lambda self: self.path / "qemu.stderr")
    last_boot = property(lambda self: self.path / "last_boot.json")  # what vm.list shows once stopped
    ssh_config = property(lambda self: self.path / "ssh_config")  # for ssh -F / Include
    ssh_known_hosts = property(lambda self: self.path / "ssh_known_hosts")  # this VM's host key only
    proxy_log = property(lambda self: self.path / "proxy.log")

    @property
    def socket_dir(self) -> Path:
        """The VM folder, unless its path is too long for a socket address or holds characters a
        QEMU guestfwd command cannot take (see ``qemu.plain_path``)."""
        if len(str(self.path / "serial.sock")) <= MAX_SOCKET_PATH and plain_path(self.path):
            return self.path
        import hashlib  # here, as tempfile below: vm.status and vm.list rarely need them
        import tempfile

        digest = hashlib.sha256(str(self.path).encode()).hexdigest()[:16]
        uid = os.getuid() if hasattr(os, "getuid") else 0
        return Path(tempfile.gettempdir()) / f"devops-tasks-{uid}" / digest

    qmp_socket = property(lambda self: self.socket_dir / "qmp.sock")
    serial_socket = property(lambda self: self.socket_dir / "serial.sock")
    proxy_socket = property(lambda self: self.socket_dir / "proxy.sock")

    def ensure(self) -> None:
        """The VM's folder, private to this user (0700, its files 0600: the serial log holds root's
        console session, the overlay the guest's disk). A folder made by an older version is fixed."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        make_private(self.path)
        sockets = self.socket_dir
        if sockets != self.path:  # a shared temp dir: ours alone, or refuse (no symlink games)
            sockets.parent.mkdir(mode=0o700, exist_ok=True)
            st = sockets.parent.lstat()
            uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
                raise VMError(f"{sockets.parent} is not a private folder of this user: remove it and retry")
            sockets.mkdir(mode=0o700, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock across processes for boot/stop/cleanup of this VM."""
        with file_lock(self.lock_path):
            yield

    @contextlib.contextmanager
    def try_locked(self) -> Iterator[bool]:
        """Non-blocking lock: yields False when another process (a boot in progress) holds it."""
        if not self.path.is_dir():
            yield False
            return
        with try_file_lock(self.lock_path) as locked:
            yield locked

    def load(self) -> VMRecord | None:
        try:
            return VMRecord.from_dict(json.loads(self.record.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise VMError(f"{self.record}: unreadable VM record ({exc}); run 'inv vm.stop --name {self.name}'") from exc

    def save(self, record: VMRecord) -> None:
        atomic_write_text(self.record, record.to_json(), 0o600)

    def clear(self) -> None:
        """Forget the running VM: record, pidfile and sockets (the disk, key and log stay)."""
        for path in (self.record, self.pidfile, self.qmp_socket, self.serial_socket, self.proxy_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def make_private(folder: Path) -> None:
    """``folder`` 0700 and the files directly in it without group/other bits."""
    os.chmod(folder, 0o700)
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            mode = entry.stat(follow_symlinks=False).st_mode
            if mode & 0o077:
                os.chmod(entry.path, stat.S_IMODE(mode) & 0o700)


def all_names(root: Path | None = None) -> list[str]:
    """Names of the VM folders that hold a record (running, starting or stale)."""
    root = Path(root if root is not None else paths.vms_dir())
    try:
        return sorted(p.name for p in root.iterdir() if (p / "record.json").is_file() and NAME_RE.match(p.name))
    except FileNotFoundError:
        return []


def vm_folders(root: Path | None = None) -> list[str]:
    """Names of every VM folder, with or without a record (stopped VMs have none)."""
    root = Path(root if root is not None else paths.vms_dir())
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries if NAME_RE.match(e.name) and e.is_dir(follow_symlinks=False))


# -- liveness ---------------------------------------------------------------------------------

@dataclass
class ProcInfo:
    state: str
    start: str
    cmdline: list[str]


def _linux_info(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = stat[stat.rfind(")") + 2 :].split()
    cmdline = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    return ProcInfo(state=rest[0], start=rest[19], cmdline=cmdline)


def _ps_info(pid: int) -> ProcInfo | None:
    try:
        out = subprocess.run(
            ["ps", "-o", "stat=", "-o", "lstart=", "-o", "command=", "-p", str(pid)],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    words = out.split()
    if len(words) < 7:
        return None
    return ProcInfo(state=words[0][:1], start=" ".join(words[1:6]), cmdline=[" ".join(words[6:])])


def proc_info(pid: int) -> ProcInfo | None:
    """State, start time and command line of ``pid`` (None when there is no such process)."""
    if pid <= 0:
        return None
    if sys.platform.startswith("linux"):
        return _linux_info(pid)
    return _ps_info(pid)


def process_start(pid: int) -> str:
    info = proc_info(pid)
    return info.start if info else ""


def is_vm_process(pid: int, start: str, marker: str) -> bool:
    """True only for that very QEMU: alive, not a zombie, same start time, ``marker`` on its command line.

    An exited QEMU stays a zombie until init reaps it (about 1.4 s here), and ``kill(pid, 0)`` still
    succeeds then; a reused PID has another start time and command line.
    """
    info = proc_info(pid)
    if info is None or info.state[:1] in ("Z", "X", "x"):
        return False
    if start and info.start != start:
        return False
    if marker and not any(marker in part for part in info.cmdline):
        return False
    return True


def is_alive(record: VMRecord) -> bool:
    return is_vm_process(record.pid, record.process_start, record.pidfile)

"""Project mounts kept between commands (``vm.mount_idle_timeout`` seconds after the last one),
and the VM's live mounts for ``vm.status``.

By default the project is shared for exactly as long as the command that asked for it runs (the
threat model's promise): each ``inv test`` mounts and unmounts, 0.6-1 s under TCG. With
``vm.mount_idle_timeout: N`` (N > 0) the user trades that for speed: a *keeper*, a small host
process per VM and project (``python -m devops_tasks.mount_keeper``, in its own session so Ctrl-C
does not reach it), owns the mount (:class:`MountPlan`: virtiofs or sshfs as the VM was booted,
over a :class:`guest.MuxSession`, with the same sandboxing) and keeps it while commands hold a
*lease* on it and for N seconds after the last one ended. Then it unmounts and exits; so does it when the VM stops or the mount
dies. ``vm.status`` lists the live ones (:func:`live_mounts`); ``vm.stop`` ends them.

A lease is a connection to the keeper's Unix socket (in a private 0700 folder, like the OpenSSH
master's), held open for the command's life: ``lease`` → ``ok``. Other requests: ``info`` (a JSON
line), ``quit-if-idle`` (``bye`` or ``busy``: a command for another project retires an idle keeper
that holds ``/app``), ``stop``. Each keeper leaves a JSON line in ``<vm folder>/mounts/`` naming its
socket and project, so the VM's live mounts can be found; a command's own mount says so there too
(:func:`announced`). This module joins the guest side (SSH) and the machine's (QMP, for virtiofs
hot-plug), as :mod:`.workspace` does: ``guest/`` knows no QEMU.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from . import guest
from .errors import GuestError
from .guest.connection import Target

MOUNTS_DIR = "mounts"  # in the VM's folder: kept-<key>.json per live keeper, cmd-*.json per command
COMMAND_PREFIX = "cmd-"
KEPT_PREFIX = "kept-"
READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class MountPlan:
    """How a VM mounts projects: its recorded mount type and (virtiofs) its QMP socket, enough to
    open a mount here or in a keeper process."""

    mount_type: str = "sshfs"
    qmp_socket: str = ""

    def open(self, conn, host_dir, guest_dir: str, confine: Optional[str] = None, note=None):
        """:func:`guest.open_mount` for this VM (a context manager, also ``start``/``stop``)."""
        qmp = _qmp_on(self.qmp_socket) if self.mount_type == "virtiofs" and self.qmp_socket else None

        # virtiofsd's socket goes beside QMP's (a folder whose path fits a unix socket's)
        runtime_dir = Path(self.qmp_socket).parent if self.qmp_socket else None
        return guest.open_mount(conn, host_dir, guest_dir, mount_type=self.mount_type, qmp=qmp,
                                runtime_dir=runtime_dir, confine=confine, note=note)


def _qmp_on(socket_path: str):
    """``qmp(command, arguments, timeout)`` on one VM's QMP socket (what virtiofs hot-plugs with)."""
    from .machine import process

    def qmp(command: str, arguments: Optional[dict] = None, timeout: float = 2.0):
        return process.qmp(socket_path, command, arguments, timeout)

    return qmp


def keeper_key(host_dir: Path, confine: str) -> str:
    """One keeper per VM, project and confinement mode."""
    import hashlib

    return hashlib.sha256(f"{host_dir}\0{confine}".encode("utf-8", "surrogateescape")).hexdigest()[:16]


def socket_path(target: Target, key: str) -> Path:
    """The keeper's socket: next to the VM's OpenSSH master socket (short, private, per VM)."""
    import hashlib

    from .guest.openssh import runtime_folder

    folder = runtime_folder()
    if folder is None:
        raise GuestError("no private folder for the mount keeper's socket ($XDG_RUNTIME_DIR or /tmp): "
                         "set vm.mount_idle_timeout to 0")
    vm = hashlib.sha256(str(target.vm_dir).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return folder / f"m-{vm}-{key}.sock"


def _records(vm_dir: Path) -> Path:
    return vm_dir / MOUNTS_DIR


def _ask(path: Path, request: str, timeout: float = 5.0) -> Optional[str]:
    """One request, one reply line; None when no keeper answers there."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(request.encode() + b"\n")
            return _readline(sock)
    except OSError:
        return None


def _readline(sock: socket.socket) -> Optional[str]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data.decode("utf-8", "replace").strip()


@contextlib.contextmanager
def announced(vm_dir: Path, project: Path) -> Iterator[None]:
    """Say in the VM's folder, for ``vm.status``, that this command has ``project`` mounted: a
    record locked for the block's life (a killed command's lock goes with it, so its record reads
    as gone). Nothing is written for a VM folder that does not exist."""
    import fcntl
    import secrets

    if not vm_dir.is_dir():
        yield
        return
    folder = _records(vm_dir)
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{COMMAND_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.json"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"project": str(project), "pid": os.getpid(), "kept": False,
                                 "since": round(time.time())}).encode() + b"\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _command_mount(record: Path) -> Optional[dict]:
    """A running command's mount (:func:`announced`), or None when its command is gone."""
    import fcntl

    try:
        fd = os.open(record, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: the command runs
            with contextlib.suppress(ValueError):
                return {**json.loads(record.read_text()), "leases": 1, "idle": 0, "ends_in": None}
            return None
        with contextlib.suppress(OSError):
            record.unlink()
        return None
    finally:
        os.close(fd)


def live_mounts(vm_dir: Path) -> list[dict]:
    """The VM's live project mounts: those of running commands (``kept`` false) and kept ones
    (``kept`` true) with ``project``, ``pid``, ``leases`` (commands using it now), ``idle``
    (seconds since the last one ended) and ``ends_in`` (seconds left; None while used). Stale
    records go."""
    found = []
    folder = _records(vm_dir)
    for record in sorted(folder.glob(f"{COMMAND_PREFIX}*.json")) if folder.is_dir() else []:
        mount = _command_mount(record)
        if mount is not None:
            found.append(mount)
    for record in sorted(folder.glob(f"{KEPT_PREFIX}*.json")) if folder.is_dir() else []:
        try:
            path = Path(json.loads(record.read_text())["socket"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        reply = _ask(path, "info", timeout=2.0)
        if reply is None:
            with contextlib.suppress(OSError):
                record.unlink()
            continue
        with contextlib.suppress(ValueError):
            found.append(json.loads(reply))
    return found


def stop_all(vm_dir: Path) -> None:
    """End every keeper of this VM (``vm.stop``)."""
    folder = _records(vm_dir)
    for record in sorted(folder.glob(f"{KEPT_PREFIX}*.json")) if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            _ask(Path(json.loads(record.read_text())["socket"]), "stop", timeout=30.0)
        with contextlib.suppress(OSError):
            record.unlink()


@contextlib.contextmanager
def lease(target: Target, host_dir: Path, idle_timeout: float, how: MountPlan = MountPlan(),
          guest_dir: str = "/app") -> Iterator[None]:
    """The project mounted at ``guest_dir`` for the ``with`` block, by this VM's keeper for it
    (started when there is none); the mount stays ``idle_timeout`` seconds after the last lease
    ends. The keeper's errors (e.g. /app busy with another project's live mount) are raised here."""
    import fcntl

    from .guest.sftp_server import confine_mode

    if target.vm_dir is None:
        raise GuestError("a kept mount needs the VM's folder")
    confine = confine_mode()
    key = keeper_key(host_dir, f"{confine}:{how.mount_type}")
    path = socket_path(target, key)
    records = _records(target.vm_dir)
    records.mkdir(mode=0o700, exist_ok=True)
    sock = None
    with open(records / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for attempt in range(2):
            sock = _lease(path)
            if sock is not None:
                break
            _retire_idle_keepers(target.vm_dir, path)
            _spawn(target, host_dir, guest_dir, confine, how, idle_timeout, path, records / f"{KEPT_PREFIX}{key}.json")
        if sock is None:
            raise GuestError(f"the mount keeper for {host_dir} did not answer at {path}")
    try:
        yield
    finally:
        sock.close()


def _lease(path: Path) -> Optional[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"lease\n")
        if _readline(sock) == "ok":
            sock.settimeout(None)
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _retire_idle_keepers(vm_dir: Path, keep: Path) -> None:
    """Ask the VM's other keepers to end if idle: /app holds one project at a time. A busy one
    stays (and the mount then says /app is busy)."""
    for record in sorted(_records(vm_dir).glob(f"{KEPT_PREFIX}*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            path = Path(json.loads(record.read_text())["socket"])
            if path != keep:
                _ask(path, "quit-if-idle", timeout=30.0)


def _spawn(target: Target, host_dir: Path, guest_dir: str, confine: str, how: MountPlan, idle_timeout: float,
           path: Path, record: Path) -> None:
    import select
    import subprocess

    spec = {
        "port": target.port, "identity": str(target.identity), "known_hosts": str(target.known_hosts),
        "host": target.host, "user": target.user, "vm_dir": str(target.vm_dir),
        "project": str(host_dir), "guest_dir": guest_dir, "confine": confine,
        "mount_type": how.mount_type, "qmp_socket": how.qmp_socket, "idle_timeout": idle_timeout,
        "socket": str(path), "record": str(record),
    }
    log = open(record.with_suffix(".log"), "ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "devops_tasks.mount_keeper"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, cwd="/", start_new_session=True)
    finally:
        log.close()
    proc.stdin.write(json.dumps(spec).encode() + b"\n")
    proc.stdin.close()
    deadline = time.monotonic() + READY_TIMEOUT
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            proc.kill()
            raise GuestError(f"the mount keeper for {host_dir} did not start within {READY_TIMEOUT:.0f} s")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        line += chunk
    proc.stdout.close()
    text = line.decode("utf-8", "replace").strip()
    if text != "ready":
        proc.wait()
        raise GuestError(text[len("error "):] if text.startswith("error ") else
                         f"the mount keeper for {host_dir} failed (exit status {proc.returncode}); "
                         f"see {record.with_suffix('.log')}")


# --------------------------------------------------------------------------- the keeper process


class Keeper:
    """Owns one mount, answers on its socket, and ends it when idle, stopped, or dead."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.project = spec["project"]
        self.idle_timeout = float(spec["idle_timeout"])
        self.socket = Path(spec["socket"])
        self.record = Path(spec["record"])
        target = Target(port=int(spec["port"]), identity=Path(spec["identity"]),
                        known_hosts=Path(spec["known_hosts"]), host=spec["host"], user=spec["user"],
                        vm_dir=Path(spec["vm_dir"]))
        how = MountPlan(mount_type=spec.get("mount_type") or "sshfs", qmp_socket=spec.get("qmp_socket") or "")
        self.mount = how.open(guest.MuxSession(target), self.project, spec["guest_dir"], confine=spec["confine"],
                              note=lambda line: print(line, file=sys.stderr, flush=True))
        self.leases: set[socket.socket] = set()
        self.leaving: list[socket.socket] = []  # asked us to end: told "bye" once the mount is gone
        self.idle_since = time.monotonic()
        self.started = time.time()

    def info(self) -> dict:
        idle = 0.0 if self.leases else time.monotonic() - self.idle_since
        return {"project": self.project, "pid": os.getpid(), "kept": True, "leases": len(self.leases),
                "idle": round(idle),
                "ends_in": None if self.leases else max(0, round(self.idle_timeout - idle)),
                "idle_timeout": self.idle_timeout, "since": round(self.started)}

    def run(self) -> int:
        try:
            self.mount.start()
        except GuestError as exc:
            print(f"error {exc}", flush=True)
            return 1
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()
            old = os.umask(0o177)
            try:
                listener.bind(str(self.socket))
            finally:
                os.umask(old)
            listener.listen(16)
            self.record.write_text(json.dumps({"socket": str(self.socket), "project": self.project,
                                               "pid": os.getpid()}) + "\n")
            print("ready", flush=True)
            sys.stdout.close()
            self._serve(listener)
        finally:
            listener.close()  # no new leases; the record goes once the share is gone
            with contextlib.suppress(OSError):
                self.socket.unlink()
            for sock in self.leases:
                sock.close()
            try:
                self.mount.stop()
            finally:
                with contextlib.suppress(OSError):
                    self.record.unlink()
            for sock in self.leaving:
                with contextlib.suppress(OSError):
                    sock.sendall(b"bye\n")
                sock.close()
        return 0

    def _serve(self, listener: socket.socket) -> None:
        import select

        while True:
            # leases first: a command that ended and then asks for info sees itself gone
            readable, _, _ = select.select([*self.leases, listener], [], [], 0.5)
            for sock in readable:
                if sock is listener:
                    if self._answer(*listener.accept()) == "quit":
                        return
                else:  # a lease ends when its command closes the connection (or dies)
                    with contextlib.suppress(OSError):
                        if sock.recv(4096):
                            continue
                    self.leases.discard(sock)
                    sock.close()
                    if not self.leases:
                        self.idle_since = time.monotonic()
            if not self.leases and time.monotonic() - self.idle_since >= self.idle_timeout:
                return
            chan = getattr(self.mount.inner, "_chan", None)
            if chan is not None and chan.exit_status_ready():  # the mount's guest side or the VM is gone
                return

    def _answer(self, conn: socket.socket, _addr) -> str:
        conn.settimeout(5)
        try:
            request = _readline(conn) or ""
        except OSError:
            conn.close()
            return ""
        if request in ("stop", "quit-if-idle") and (request == "stop" or not self.leases):
            self.leaving.append(conn)  # answered after the unmount, so /app is free then
            return "quit"
        reply = {"lease": "ok", "info": json.dumps(self.info()), "quit-if-idle": "busy"}.get(request, "")
        with contextlib.suppress(OSError):
            conn.sendall(reply.encode() + b"\n")
        if request == "lease":
            conn.settimeout(None)
            self.leases.add(conn)
        else:
            conn.close()
        return ""


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    return Keeper(spec).run()


if __name__ == "__main__":
    sys.exit(main())

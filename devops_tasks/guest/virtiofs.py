"""The project mount over virtiofs: a share hot-plugged into the running VM for one command.

Per command (:class:`VirtiofsMount`): the host starts QEMU's C ``virtiofsd`` for the project root
only, unprivileged (``unshare -r``: root in a user namespace of its own, so files the guest
creates belong to the host user), under a seccomp filter (:func:`seccomp_program`) that refuses
set-id modes and special files, in a bubblewrap wrapper that dies with the thread that started it
(``--die-with-parent``); QMP ``chardev-add`` + ``device_add vhost-user-fs-pci`` plug it into the
VM (ACPI PCI hot-plug), the guest mounts it at ``/app``. At the end the guest unmounts, virtiofsd is
killed (access ends even if the guest keeps the device), and ``device_del`` + ``chardev-remove``
unplug it. Nothing of the share outlives the command.

virtiofsd confines the guest to the shared folder itself (its namespace sandbox pivots into it:
``..`` and symlinks resolve inside, a hard link can only name files already in the share).
What it does not refuse, as root in its user namespace, is a set-id bit (``chmod 4755``, a
create or mkdir mode with 04000/02000) and a fifo or socket: the seccomp filter does.

A ``.git`` that must stay read-only (``inv claude --live``) is not possible with virtiofs (it
shares one tree with one set of rights): such mounts stay on sshfs (:func:`open_mount`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import platform
import queue
import secrets
import shlex
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional

from ..errors import GuestError
from .commands import capture
from .mux import open_channel, stderr_lines
from .sftp_server import SftpServerCommand, find_bwrap

if TYPE_CHECKING:  # pragma: no cover
    from fabric import Connection

VIRTIOFSD_CANDIDATES = (
    "/usr/lib/qemu/virtiofsd",  # Debian 12: qemu-system-common (C virtiofsd)
    "/usr/libexec/virtiofsd",  # Fedora, Debian 13 (Rust virtiofsd)
    "/usr/lib/virtiofsd",
)
MOUNT_TIMEOUT = 30.0
Qmp = Callable[..., object]  # qmp(command, arguments=None, timeout=2.0) -> the command's return value
UNPLUG_TIMEOUT = 5.0
USERS_DIR = "/run/devops-tasks/mount-users"  # shared with the sshfs mount: <owner>/<user> holds a PID
HOLDERS_DIR = "/run/devops-tasks/virtiofs"  # in the guest: <tag> holds the owner's PID
_MARK = "devops-tasks:"


class VirtiofsUnavailable(GuestError):
    """virtiofs cannot be used for this command (no virtiofsd or bubblewrap on the host, no
    virtiofs module in the guest); nothing was plugged, so the caller may fall back to sshfs."""


# -- host side: virtiofsd ------------------------------------------------------------------------

def find_virtiofsd(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """QEMU's virtiofsd (``$CORE_VIRTIOFSD`` overrides the usual places), or None."""
    environ = os.environ if environ is None else environ
    override = environ.get("CORE_VIRTIOFSD", "")
    for path in (override,) if override else VIRTIOFSD_CANDIDATES:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


# Linux syscall numbers, and which argument holds the mode: the calls a file server uses to set a
# mode or make a node. openat2 and fchmodat2 (their mode is out of a filter's reach, or new) get
# ENOSYS, so a caller falls back to the older call, which is checked.
_SYSCALLS = {
    "x86_64": {
        "arch": 0xC000003E,  # AUDIT_ARCH_X86_64
        "mode": {"open": (2, 2), "creat": (85, 1), "mkdir": (83, 1), "chmod": (90, 1), "fchmod": (91, 1),
                 "openat": (257, 3), "mkdirat": (258, 2), "fchmodat": (268, 2)},
        "node": {"mknod": (133, 1), "mknodat": (259, 2)},
        "nosys": {"openat2": 437, "fchmodat2": 452},
        "x32": 0x40000000,  # x32 syscalls share the arch: refused altogether
    },
    "aarch64": {
        "arch": 0xC00000B7,  # AUDIT_ARCH_AARCH64
        "mode": {"openat": (56, 3), "mkdirat": (34, 2), "fchmod": (52, 1), "fchmodat": (53, 2)},
        "node": {"mknodat": (33, 2)},
        "nosys": {"openat2": 437, "fchmodat2": 452},
        "x32": 0,
    },
}
SETID_BITS = 0o6000
S_IFMT, S_IFREG = 0o170000, 0o100000
# classic BPF
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _AND_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_ARCH_OFFSET, _NR_OFFSET = 4, 0


def _arg_offset(index: int) -> int:
    """struct seccomp_data: nr, arch, instruction_pointer (u64), args[6] (u64, low word first)."""
    return 16 + 8 * index


def seccomp_program(machine: Optional[str] = None) -> bytes:
    """A seccomp BPF program (``struct sock_filter[]``, for ``bwrap --seccomp FD``) that refuses
    with EPERM: setting a mode with a set-id bit (chmod, fchmod, fchmodat, open/openat/creat,
    mkdir/mkdirat) and mknod/mknodat of anything but a regular file (fifo, socket, device);
    openat2 and fchmodat2 get ENOSYS; another architecture (i386 calls, x32) kills the process.
    Everything else is allowed (virtiofsd's own filter narrows it further)."""
    machine = (machine or platform.machine()).lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    table = _SYSCALLS.get(machine)
    if table is None:
        raise VirtiofsUnavailable(f"no seccomp filter for this host's architecture ({machine})")
    eperm, enosys = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _ARCH_OFFSET),
        (_JEQ_K, 1, 0, table["arch"]),
        (_RET_K, 0, 0, RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _NR_OFFSET),
    ]
    if table["x32"]:
        prog += [(_JGE_K, 0, 1, table["x32"]), (_RET_K, 0, 0, RET_KILL_PROCESS)]
    for nr, index in sorted(table["mode"].values()):
        prog += [
            (_JEQ_K, 0, 4, nr),
            (_LD_W_ABS, 0, 0, _arg_offset(index)),
            (_JSET_K, 0, 1, SETID_BITS),
            (_RET_K, 0, 0, eperm),
            (_RET_K, 0, 0, RET_ALLOW),
        ]
    for nr, index in sorted(table["node"].values()):
        prog += [
            (_JEQ_K, 0, 7, nr),
            (_LD_W_ABS, 0, 0, _arg_offset(index)),
            (_JSET_K, 3, 0, SETID_BITS),
            (_AND_K, 0, 0, S_IFMT),
            (_JEQ_K, 2, 0, 0),  # mode 0: a regular file
            (_JEQ_K, 1, 0, S_IFREG),
            (_RET_K, 0, 0, eperm),
            (_RET_K, 0, 0, RET_ALLOW),
        ]
    for nr in sorted(table["nosys"].values()):
        prog += [(_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, enosys)]
    prog.append((_RET_K, 0, 0, RET_ALLOW))
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def virtiofsd_command(host_dir: Path, socket_path: Path, virtiofsd: str, bwrap: str,
                      machine: Optional[str] = None) -> SftpServerCommand:
    """bwrap (seccomp filter, dies with its parent, its own session) → ``unshare -r`` (root in a
    user namespace of its own: no privilege on the host, files owned by this user) → virtiofsd
    serving ``host_dir`` only on ``socket_path``. The environment is PATH alone."""
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    argv = [
        bwrap, "--die-with-parent", "--new-session",
        "--dev-bind", "/", "/",  # virtiofsd pivots into the project itself (its namespace sandbox)
        "--seccomp", "",
        "--", unshare, "-r", "--", virtiofsd,
        f"--socket-path={socket_path}",
        "-o", f"source={host_dir}",
        "-o", "cache=auto",
        "-o", "no_xattr",  # no security.capability or other xattrs from the guest
        "-o", "no_posix_lock", "-o", "no_flock",
    ]
    index = argv.index("--seccomp") + 1
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return SftpServerCommand(tuple(argv), confined=True, files=((index, seccomp_program(machine)),), env=env)


# -- QMP ------------------------------------------------------------------------------------------

def chardev_add_args(chardev_id: str, socket_path: Path | str) -> dict:
    """``chardev-add``: a unix socket client to virtiofsd's vhost-user socket."""
    return {"id": chardev_id, "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": str(socket_path)}}, "server": False}}}


def device_add_args(device_id: str, chardev_id: str, tag: str) -> dict:
    """``device_add``: the virtio-fs PCI device on that chardev, known to the guest by ``tag``."""
    return {"driver": "vhost-user-fs-pci", "chardev": chardev_id, "tag": tag, "id": device_id}


def tag_prefix(host_dir: Path) -> str:
    """The start of every tag of this project (a hash of the host path, never the path): a second
    command on the same project recognises a live share of it. Tags hold at most 36 bytes."""
    return "dt" + hashlib.sha256(os.fsencode(str(host_dir))).hexdigest()[:16] + "-"


# -- guest side -------------------------------------------------------------------------------------

def mount_script(guest_dir: str, prefix: str, token: str) -> str:
    """Guest script of a virtiofs mount's channel; it reports on stderr:

    * ``reuse``: ``guest_dir`` holds a live virtiofs share of this project (its owner's holder
      runs): registered as its user (the owner waits for its users) until stdin ends;
    * ``busy SOURCE TYPE``: a live mount of anything else there (refused);
    * ``nomodule``: the guest has no virtiofs (the host then falls back to sshfs);
    * ``ready``: the host may plug the share now; the script then reads one line (the tag) on
      stdin, mounts it (polling until the device is there), says ``mounted`` and holds until stdin
      ends (that shell is the owner's holder: its PID marks the mount live).
    Dead mounts (their holder gone) are lazily unmounted first.
    """
    d = shlex.quote(guest_dir)
    return f"""\
D={d}; P={shlex.quote(prefix)}; T={shlex.quote(token)}; U={USERS_DIR}; H={HOLDERS_DIR}
say() {{ echo "{_MARK} $*" >&2; }}
top() {{ awk -v d="$D" '$2 == d {{ s = $1 " " $3 }} END {{ print s }}' /proc/mounts; }}
held() {{ pid=; read -r pid <"$H/$1" 2>/dev/null && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \\
  && ! grep -qs '^State:[[:space:]]*Z' /proc/"$pid"/status; }}
tries=0
while :; do
  set -- $(top)
  [ -n "$1" ] || break
  if [ "$2" = virtiofs ]; then live=; held "$1" && live=1
  else live=; stat -f "$D" >/dev/null 2>&1 && live=1; fi
  if [ -n "$live" ]; then
    case "$1" in "$P"*) [ "$2" = virtiofs ] || {{ say "busy $1 $2"; exit 3; }};; *) say "busy $1 $2"; exit 3;; esac
    o="$U/${{1##*-}}"; was=$1
    if [ ! -e "$o/closing" ] && mkdir -p "$o" && echo $$ >"$o/$T" && [ ! -e "$o/closing" ] \\
        && set -- $(top) && [ "$1" = "$was" ] && held "$1"; then
      say "reuse"
      cat >/dev/null
      rm -f "$o/$T"
      exit 0
    fi
    rm -f "$o/$T"
    tries=$((tries+1)); [ $tries -le 1500 ] || {{ say "error: the mount at $D is being unmounted and stays"; exit 10; }}
    sleep 0.02
    continue
  fi
  # A dead virtiofs share (its command was killed: virtiofsd died with it) cannot be unmounted:
  # the kernel would wait for its server forever. The new share goes on top of it.
  [ "$2" = virtiofs ] && {{ say "stale $1"; break; }}
  if umount -l "$D" 2>/dev/null || fusermount3 -uz "$D" 2>/dev/null || fusermount -uz "$D" 2>/dev/null; then
    rm -rf "$U/${{1##*-}}" "$H/$1"
    say "stale $1"
  else
    tries=$((tries+1)); [ $tries -le 1500 ] || {{ say "error: cannot unmount the dead mount $1 at $D"; exit 11; }}
    sleep 0.02
  fi
done
grep -qw virtiofs /proc/filesystems || modprobe virtiofs 2>/dev/null
grep -qw virtiofs /proc/filesystems || {{ say nomodule; exit 4; }}
mkdir -p "$H" || {{ say "error: cannot create $H in the guest"; exit 6; }}
# (a stat of a dead share hangs: only a folder that is no mount point is made)
awk -v d="$D" '$2 == d {{ f = 1 }} END {{ exit !f }}' /proc/mounts || mkdir -p "$D" || {{ say "error: cannot create $D in the guest"; exit 6; }}
say ready
read -r tag || exit 0
case "$tag" in "$P"*) ;; *) say "error: bad tag"; exit 12;; esac
i=0
until err=$(mount -t virtiofs "$tag" "$D" 2>&1); do
  i=$((i+1)); [ $i -le 1500 ] || {{ say "error: the virtiofs device did not appear: $err"; exit 8; }}
  sleep 0.02
done
echo $$ >"$H/$tag"
say mounted
cat >/dev/null
"""


def unmount_script(guest_dir: str, tag: str, force: bool = False) -> str:
    """Unmount ``guest_dir`` when its top mount is this share and no other command uses it (else
    ``users N``, unless ``force``); a mount still held open by some process is detached (``-l``)."""
    d = shlex.quote(guest_dir)
    owner = shlex.quote(f"{USERS_DIR}/{tag.rsplit('-', 1)[-1]}")
    return (
        f"D={d}; F={shlex.quote(tag)}; o={owner}; h={shlex.quote(HOLDERS_DIR)}/{shlex.quote(tag)}; "
        f"FORCE={'1' if force else ''}\n"
        "top=$(awk -v d=\"$D\" '$2 == d { s = $1 } END { print s }' /proc/mounts)\n"
        "[ \"$top\" = \"$F\" ] || { rm -rf \"$o\" \"$h\"; exit 0; }\n"
        "mkdir -p \"$o\" && : >\"$o/closing\"\n"
        "n=0\n"
        "for f in \"$o\"/*; do\n"
        "  [ -f \"$f\" ] && [ \"${f##*/}\" != closing ] || continue\n"
        "  pid=; read -r pid <\"$f\"\n"
        "  if [ -n \"$pid\" ] && kill -0 \"$pid\" 2>/dev/null && ! grep -qs '^State:[[:space:]]*Z' /proc/\"$pid\"/status;"
        " then n=$((n+1)); else rm -f \"$f\"; fi\n"
        "done\n"
        "if [ $n -gt 0 ] && [ -z \"$FORCE\" ]; then rm -f \"$o/closing\"; echo \"users $n\"; exit 0; fi\n"
        "umount \"$D\" 2>/dev/null || umount -l \"$D\"\n"
        "rc=$?; rm -rf \"$o\" \"$h\"; exit $rc\n"
    )


@dataclass
class _Plug:
    chardev: str
    device: str
    socket: Path


class VirtiofsMount:
    """The project at ``guest_dir`` over virtiofs for the ``with`` block (same interface as
    :class:`~.mount.Mount`: ``start``/``stop``, a context manager, ``reused``, ``confined``).

    ``qmp``: runs one QMP command on the VM (``qmp(command, arguments, timeout)`` -> its return
    value; the caller's: this package knows no QEMU); ``runtime_dir``: a private host folder (the
    VM's) for virtiofsd's socket. :class:`VirtiofsUnavailable` from :meth:`start` means nothing was plugged.
    Start and stop it in one thread (virtiofsd dies with the thread that started it).
    """

    mount_type = "virtiofs"

    def __init__(self, conn: "Connection", host_dir: os.PathLike | str, qmp: "Qmp",
                 runtime_dir: os.PathLike | str, guest_dir: str = "/app", timeout: float = MOUNT_TIMEOUT,
                 virtiofsd: Optional[str] = None):
        self.conn = conn
        self.requested = host_dir
        self.qmp = qmp
        self.runtime_dir = Path(runtime_dir)
        self.guest_dir = guest_dir
        self.timeout = timeout
        self.virtiofsd = virtiofsd
        self.token = secrets.token_hex(4)
        self.host_dir: Optional[Path] = None
        self.tag = ""
        self.reused = False
        self.mounted = False
        self.confined = True
        self._proc: Optional[subprocess.Popen] = None
        self._plug: Optional[_Plug] = None
        self._chan = None
        self._threads: list[threading.Thread] = []
        self._messages: deque[str] = deque(maxlen=50)
        self._daemon_errors: deque[str] = deque(maxlen=20)
        self._outcomes: queue.Queue[str] = queue.Queue()

    def __enter__(self) -> "VirtiofsMount":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- public -------------------------------------------------------------------------------
    def start(self) -> None:
        from .mount import _host_dir

        self.host_dir = _host_dir(self.requested)
        virtiofsd = self.virtiofsd or find_virtiofsd()
        if virtiofsd is None:
            raise VirtiofsUnavailable("virtiofsd is not installed on this machine (Debian 12: qemu-system-common)")
        bwrap = find_bwrap()
        if bwrap is None:
            raise VirtiofsUnavailable("bubblewrap (bwrap) is not installed (apt-get install bubblewrap)")
        prefix = tag_prefix(self.host_dir)
        self.tag = prefix + self.token
        try:
            self._start(prefix, virtiofsd, bwrap)
        except BaseException:
            self._teardown()
            raise

    def stop(self) -> None:
        """Unmount in the guest (when this command made the mount and no other uses it), kill
        virtiofsd, unplug the device."""
        try:
            if self.mounted and not self.reused:
                self._unmount()
        finally:
            self.mounted = False
            self._teardown()

    # -- internals ----------------------------------------------------------------------------
    def _start(self, prefix: str, virtiofsd: str, bwrap: str) -> None:
        self._chan = open_channel(self.conn, mount_script(self.guest_dir, prefix, self.token), self.timeout)
        self._spawn(self._read_messages, self._chan)
        deadline = time.monotonic() + self.timeout
        outcome = self._next_outcome(deadline)
        if outcome == "ready":
            self._plug_in(virtiofsd, bwrap, deadline)
            self._chan.sendall((self.tag + "\n").encode())
            outcome = self._next_outcome(deadline)
        if outcome == "mounted":
            self.mounted = True
            return
        if outcome == "reuse":
            self.mounted = self.reused = True
            return
        if outcome == "nomodule":
            raise VirtiofsUnavailable("the guest image has no virtiofs kernel module")
        if outcome.startswith("busy"):
            raise GuestError(
                f"{self.guest_dir} in the VM already holds a live mount of another folder "
                f"({outcome[5:].strip()}); another test/serve/claude command is using it: stop it first"
            )
        raise GuestError(f"cannot mount {self.host_dir} at {self.guest_dir} in the VM over virtiofs" + self._why())

    def _plug_in(self, virtiofsd: str, bwrap: str, deadline: float) -> None:
        """Start virtiofsd, wait for its socket, then chardev-add + device_add."""
        qmp = self.qmp
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        sweep_stale_chardevs(qmp, self.runtime_dir)
        sock = self.runtime_dir / f"vfs{self.token}"  # 3 bytes longer than qmp.sock: fits where it does
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        command = virtiofsd_command(self.host_dir, sock, virtiofsd, bwrap)
        try:
            self._proc = command.start(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise VirtiofsUnavailable(f"cannot start {command.argv[0]}: {exc.strerror or exc}") from None
        self._spawn(self._read_daemon_errors, self._proc)
        while not sock.exists():
            if self._proc.poll() is not None:
                self._threads[-1].join(timeout=1)
                raise GuestError(f"virtiofsd exited with status {self._proc.returncode} before it listened"
                                 + self._why())
            if time.monotonic() > deadline:
                raise GuestError("virtiofsd did not create its socket in time" + self._why())
            time.sleep(0.01)
        plug = _Plug(chardev=f"vfsc-{self.token}", device=f"vfsd-{self.token}", socket=sock)
        qmp("chardev-add", chardev_add_args(plug.chardev, sock))
        self._plug = plug
        try:
            qmp("device_add", device_add_args(plug.device, plug.chardev, self.tag), 10.0)
        except Exception:
            self._plug = _Plug(chardev=plug.chardev, device="", socket=sock)
            raise

    def _next_outcome(self, deadline: float) -> str:
        while True:
            try:
                return self._outcomes.get(timeout=0.05)
            except queue.Empty:
                pass
            if time.monotonic() > deadline:
                raise GuestError(f"mounting {self.host_dir} at {self.guest_dir} timed out after "
                                 f"{self.timeout:.0f} s" + self._why())

    def _unmount(self) -> None:
        told = False
        try:
            while True:
                _, out, _ = capture(self.conn, unmount_script(self.guest_dir, self.tag), timeout=15)
                if not out.startswith("users "):
                    return
                if not told:
                    told = True
                    print(f"{self.guest_dir} in the VM is still used by another command on this project: "
                          "its mount stays until that ends (Ctrl-C: unmount now)", file=sys.stderr, flush=True)
                time.sleep(0.5)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                capture(self.conn, unmount_script(self.guest_dir, self.tag, force=True), timeout=15)
            raise
        except Exception:
            return

    def _teardown(self) -> None:
        """Kill virtiofsd first (the share ends whatever the guest does), then unplug."""
        chan, self._chan = self._chan, None
        proc, self._proc = self._proc, None
        plug, self._plug = self._plug, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()  # bwrap: --die-with-parent takes virtiofsd (and its sandboxed child) with it
            proc.wait()
        if plug is not None:
            if plug.device:
                with contextlib.suppress(Exception):
                    self.qmp("device_del", {"id": plug.device})
            _remove_chardev(self.qmp, plug.chardev, time.monotonic() + UNPLUG_TIMEOUT)
            with contextlib.suppress(OSError):
                plug.socket.unlink()
        if chan is not None:
            with contextlib.suppress(Exception):
                chan.shutdown_write()  # the guest script's cat ends
            deadline = time.monotonic() + 5
            while not chan.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            with contextlib.suppress(Exception):
                chan.close()
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads = []

    def _why(self) -> str:
        errors = [m[len("error:"):].strip() for m in self._messages if m.startswith("error:")]
        parts = errors + [f"virtiofsd: {line}" for line in self._daemon_errors]
        text = "; ".join(p for p in parts if p)[-800:]
        return f": {text}" if text else ""

    def _spawn(self, target: Callable[..., None], *args) -> None:
        thread = threading.Thread(target=target, args=args, name=f"virtiofs{target.__name__}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _read_messages(self, chan) -> None:
        stderr_lines(chan, self._message)
        self._outcomes.put("")

    def _message(self, line: str) -> None:
        line = line.rstrip("\r")
        if line.startswith(_MARK):
            text = line[len(_MARK):].strip()
            self._messages.append(text)
            if text in ("ready", "mounted", "reuse", "nomodule") or text.startswith(("busy", "error:")):
                self._outcomes.put(text)
        elif line.strip():
            self._messages.append(line.strip())

    def _read_daemon_errors(self, proc: subprocess.Popen) -> None:
        noise = ("fv_", "virtio_", "TODO")
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(proc.stderr.readline, b""):
                line = raw.decode("utf-8", "replace").strip()
                if line and not line.startswith(noise):
                    self._daemon_errors.append(line)


def _remove_chardev(qmp: "Qmp", chardev: str, deadline: float) -> bool:
    """``chardev-remove``, retried while the unplugged device still holds it (the guest's eject
    takes a moment); False when it is still there at ``deadline`` (a later command sweeps it)."""
    while True:
        try:
            qmp("chardev-remove", {"id": chardev})
            return True
        except Exception as exc:
            if "not found" in str(exc) or time.monotonic() >= deadline:
                return "not found" in str(exc)
        time.sleep(0.02)


def sweep_stale_chardevs(qmp: "Qmp", runtime_dir: Path) -> list[str]:
    """Remove the chardevs of earlier shares whose device is gone (their command could not wait
    for the guest's eject) and whose socket its command removed (a command between its
    chardev-add and device_add still has its socket); -> their ids."""
    removed = []
    with contextlib.suppress(Exception):
        for item in qmp("query-chardev"):
            label = item.get("label", "")
            if (label.startswith("vfsc-") and not item.get("frontend-open", True)
                    and not (runtime_dir / f"vfs{label[len('vfsc-'):]}").exists()):
                with contextlib.suppress(Exception):
                    qmp("chardev-remove", {"id": label})
                    removed.append(label)
    return removed

"""The project mount: a host folder in the guest (``/app``) the way Lima does it (reverse SSHFS).

The host's ``sftp-server`` (:mod:`.sftp_server`) talks to the guest's ``sshfs -o slave`` over an
SSH channel, so the host needs no SSH server. The host path is only ever an argv word on the host
(``sftp-server -d``); it never reaches a shell.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import secrets
import shlex
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from ..errors import GuestError
from .commands import capture
from .mux import open_channel, stderr_lines
from .sftp_filter import RefusedRequest, pump_requests
from .sftp_server import SftpServerCommand, sftp_server_command

if TYPE_CHECKING:  # pragma: no cover
    from fabric import Connection

GUEST_APP_DIR = "/app"
MOUNT_TIMEOUT = 30.0

# sshfs options. Correctness first: edits on the host must show in the guest promptly, so the
# kernel page cache is dropped on every open (no kernel_cache/auto_cache) and sshfs's own directory
# and stat cache lives 1 s instead of 20 s (about the same as the kernel's 1 s attribute cache).
# allow_other lets non-root users in the guest (e.g. a sandboxed agent) use the mount.
SSHFS_OPTIONS = ("dcache_timeout=1", "allow_other")

_MARK = "devops-tasks:"
VIRTIOFS_HOLDERS = "/run/devops-tasks/virtiofs"  # see .virtiofs.HOLDERS_DIR


def fsname_for(host_dir: Path) -> str:
    """The mount's source name in the guest's /proc/mounts: a hash of the host path (never the
    path itself, which may hold anything), so a repeated mount of the same folder is recognised."""
    digest = hashlib.sha256(os.fsencode(str(host_dir))).hexdigest()[:16]
    return f"devops-tasks:{digest}"


USERS_DIR = "/run/devops-tasks/mount-users"  # in the guest: <owner token>/<user token> holds a PID


def mount_source(fsname: str, token: str, confined: bool, guarded: bool = False) -> str:
    """The mount's name in the guest's /proc/mounts: project hash, how it is served (``guarded``:
    confined and ``.git`` read-only), whose it is."""
    kind = "unconfined" if not confined else "guarded" if guarded else "confined"
    return f"{fsname}:{kind}:{token}"


def mount_script(guest_dir: str, fsname: str, token: str, options: Sequence[str] = SSHFS_OPTIONS,
                 confined: bool = False, guarded: bool = False) -> str:
    """Guest script for the mount channel. Its stdin/stdout carry SFTP; it reports on stderr.

    * ``/app`` already holds a live mount of the same folder, at least as confined as this one
      (``confined``) would be → ``reuse``: the script registers as a user of that mount (its
      owner waits for its users before it unmounts) and holds until this channel's stdin ends.
    * such a mount, but unconfined while this one would be confined → ``unconfined`` (refuse:
      the VM already reaches every host file through it); writable ``.git`` while this one would be
      ``guarded`` → ``unguarded`` (refuse).
    * a live mount of something else → ``busy`` (refuse: another command is using ``/app``).
    * dead mounts (their sshfs gone) → lazily unmounted, then mounted afresh.
    * sshfs or FUSE missing → an ``error:`` line saying so.
    * otherwise ``serve`` (the host starts its sftp-server now), sshfs runs in the background on
      this channel's stdin/stdout, the script waits for ``/proc/mounts`` to list it (``mounted``),
      then for sshfs to end.

    An sshfs that knows ``contain_symlinks`` (on by default since Debian's 3.7.3-1.2~deb12u1) would
    refuse every symlink whose target holds ``..`` (npm's node_modules/.bin links, most relative
    links): it guards a client against its server, and here the server is the host's project,
    which the guest has no reason to distrust (the host is guarded by the sftp-server's sandbox).
    So it is switched off when that sshfs has it.
    """
    d = shlex.quote(guest_dir)
    source = mount_source(fsname, token, confined, guarded)
    opts = ",".join(["slave", f"fsname={source}", *options])
    need = "any" if not confined else "guarded" if guarded else "confined"
    return f"""\
D={d}; F={shlex.quote(source)}; P={shlex.quote(fsname + ":")}; T={shlex.quote(token)}; NEED={need}
U={USERS_DIR}
say() {{ echo "{_MARK} $*" >&2; }}
# the top mount at $D: its source and type (shell built-ins only: every exec costs under TCG)
top() {{ s=; while read -r src dir typ rest; do [ "$dir" = "$D" ] && s="$src $typ"; done </proc/mounts; echo "$s"; }}
has() {{ while read -r src dir rest; do [ "$dir" = "$D" ] && [ "$src" = "$F" ] && return 0; done </proc/mounts; return 1; }}
at() {{ while read -r src dir rest; do [ "$dir" = "$D" ] && return 0; done </proc/mounts; return 1; }}
# statfs always asks the file system's process (a stat may be answered from the kernel's cache);
# a virtiofs share is live while its owner's holder runs (a statfs of a dead one would hang)
live() {{ if [ "$2" = virtiofs ]; then pid=; read -r pid <"{VIRTIOFS_HOLDERS}/$1" 2>/dev/null && [ -n "$pid" ] \
  && kill -0 "$pid" 2>/dev/null; else stat -f "$D" >/dev/null 2>&1; fi; }}
tries=0
while :; do
  set -- $(top)
  [ -n "$1" ] || break
  if live "$1" "$2"; then
    case "$1" in "$P"*) ;; *) say "busy $1 $2"; exit 3;; esac
    case "$1" in "$P"guarded:*) kind=guarded;; "$P"confined:*) kind=confined;; *) kind=unconfined;; esac
    [ "$NEED" != any ] && [ "$kind" = unconfined ] && {{ say "unconfined $1"; exit 9; }}
    [ "$NEED" = guarded ] && [ "$kind" != guarded ] && {{ say "unguarded $1"; exit 12; }}
    o="$U/${{1##*:}}"; was=$1
    # Registered, then checked again: an owner that is unmounting marks itself closing first.
    if [ ! -e "$o/closing" ] && mkdir -p "$o" && echo $$ >"$o/$T" && [ ! -e "$o/closing" ] \\
        && set -- $(top) && [ "$1" = "$was" ] && live "$1" "$2"; then
      say "reuse $kind"
      cat >/dev/null
      rm -f "$o/$T"
      exit 0
    fi
    rm -f "$o/$T"
    tries=$((tries+1)); [ $tries -le 1500 ] || {{ say "error: the mount at $D is being unmounted and stays"; exit 10; }}
    sleep 0.02
    continue
  fi
  # dead virtiofs (its command was killed): it cannot be unmounted (the kernel would wait for its
  # server forever), so the new mount goes on top of it
  [ "$2" = virtiofs ] && {{ say "stale $1"; break; }}
  # dead: its sshfs is gone (or going: it unmounts itself then, and this umount may find nothing)
  if umount -l "$D" 2>/dev/null || fusermount3 -uz "$D" 2>/dev/null || fusermount -uz "$D" 2>/dev/null; then
    rm -rf "$U/${{1##*:}}"
    say "stale $1"
  else
    tries=$((tries+1)); [ $tries -le 1500 ] || {{ say "error: cannot unmount the dead mount $1 at $D"; exit 11; }}
    sleep 0.02
  fi
done
s=$(command -v sshfs 2>/dev/null)
[ -n "$s" ] && [ -f "$s" ] && [ -x "$s" ] || {{ say "error: sshfs is not installed in the guest image (it needs sshfs and fuse)"; exit 4; }}
[ -c /dev/fuse ] || modprobe fuse 2>/dev/null
[ -c /dev/fuse ] || {{ say "error: FUSE is not available in the guest (no /dev/fuse; is the fuse kernel module in the image?)"; exit 5; }}
# never stat a mount point here: a dead virtiofs share under it would hang the stat
at || [ -d "$D" ] || mkdir -p "$D" || {{ say "error: cannot create $D in the guest"; exit 6; }}
o={shlex.quote(opts)}
# whether this sshfs knows no_contain_symlinks, probed once per boot (/run is the boot's tmpfs)
k=/run/devops-tasks/sshfs-no-contain
[ -f "$k" ] || {{ mkdir -p /run/devops-tasks; if grep -qs no_contain_symlinks "$s"; then echo 1; else echo 0; fi >"$k"; }}
read -r nc <"$k" 2>/dev/null; [ "$nc" = 1 ] && o="$o,no_contain_symlinks"
say serve
exec 3<&0
sshfs : "$D" -f -o "$o" <&3 3<&- &
pid=$!
exec 3<&-
i=0
until has; do
  if ! kill -0 "$pid" 2>/dev/null; then wait "$pid"; say "error: sshfs exited with status $? before the mount was ready"; exit 7; fi
  i=$((i+1)); [ $i -le 2000 ] || {{ say "error: the mount did not appear"; kill "$pid"; exit 8; }}
  sleep 0.02
done
say mounted
wait "$pid"
"""


def unmount_script(guest_dir: str, fsname: str, token: str, confined: bool = False, force: bool = False,
                   guarded: bool = False) -> str:
    """Unmount ``guest_dir`` when its top mount is still this one (never someone else's) and no
    other command uses it: then it prints ``users N`` and leaves it (unless ``force``)."""
    d = shlex.quote(guest_dir)
    source = shlex.quote(mount_source(fsname, token, confined, guarded))
    owner = shlex.quote(f"{USERS_DIR}/{token}")
    return (
        f"D={d}; F={source}; o={owner}; FORCE={'1' if force else ''}\n"
        "top=; while read -r src dir rest; do [ \"$dir\" = \"$D\" ] && top=$src; done </proc/mounts\n"
        "[ \"$top\" = \"$F\" ] || { rm -rf \"$o\"; exit 0; }\n"
        "mkdir -p \"$o\" && : >\"$o/closing\"\n"
        "n=0\n"
        "for f in \"$o\"/*; do\n"
        "  [ -f \"$f\" ] && [ \"${f##*/}\" != closing ] || continue\n"
        "  pid=; read -r pid <\"$f\"\n"
        "  if [ -n \"$pid\" ] && kill -0 \"$pid\" 2>/dev/null && ! grep -qs '^State:[[:space:]]*Z' /proc/\"$pid\"/status;"
        " then n=$((n+1)); else rm -f \"$f\"; fi\n"
        "done\n"
        "if [ $n -gt 0 ] && [ -z \"$FORCE\" ]; then rm -f \"$o/closing\"; echo \"users $n\"; exit 0; fi\n"
        "umount \"$D\" 2>/dev/null || umount -l \"$D\" 2>/dev/null || fusermount3 -uz \"$D\" 2>/dev/null"
        " || fusermount -uz \"$D\"\n"
        "rc=$?; rm -rf \"$o\"; exit $rc\n"
    )


def _read_errors(lines: Sequence[str]) -> str:
    text = "; ".join(line.strip() for line in lines if line.strip())
    return text[-800:]


class Mount:
    """Mount a host folder in the guest (default ``/app``) for the ``with`` block.

    ``with Mount(conn, project_dir):`` — ready when the block starts, unmounted when it ends (also
    on Ctrl-C or an error). A second mount of the same folder while one is live reuses it when that
    one is at least as confined as this one would be (else an error), and its owner then waits for
    it before unmounting; a live mount of another folder at the same place is an error, and a dead
    one is cleaned up first.

    The host's sftp-server runs in a sandbox that sees only the project (:func:`sftp_server_command`;
    ``confine``: see :func:`confine_mode`), and the guest's requests reach it without set-id bits
    (:mod:`.sftp_filter`). Start and stop a mount in one thread that outlives it (the sandbox dies
    with the thread that started it: ``bwrap --die-with-parent``).
    """

    def __init__(
        self,
        conn: "Connection",
        host_dir: os.PathLike | str,
        guest_dir: str = GUEST_APP_DIR,
        timeout: float = MOUNT_TIMEOUT,
        options: Sequence[str] = SSHFS_OPTIONS,
        sftp_server: Optional[str] = None,
        confine: Optional[str] = None,
        read_only: Sequence[str] = (),
    ):
        self.conn = conn
        self.read_only = tuple(read_only)  # project paths no request may write (.git): see sftp_server_command
        self.requested = host_dir
        self.guest_dir = guest_dir
        self.timeout = timeout
        self.options = tuple(options)
        self.sftp_server = sftp_server
        self.confine = confine
        self.confined = False  # this mount's server, or (reused) the live mount's, is sandboxed
        self.token = secrets.token_hex(4)
        self.host_dir: Optional[Path] = None
        self.reused = False
        self.mounted = False
        self._server_confined = False
        self._proc: Optional[subprocess.Popen] = None
        self._chan = None
        self._threads: list[threading.Thread] = []
        self._messages: deque[str] = deque(maxlen=50)
        self._sftp_errors: deque[str] = deque(maxlen=20)
        self._outcomes: queue.Queue[str] = queue.Queue()

    # -- public -------------------------------------------------------------------------------
    def __enter__(self) -> "Mount":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def source(self) -> str:
        """This mount's name in the guest's /proc/mounts (when it made one)."""
        return mount_source(self.fsname, self.token, self._server_confined, self._guarded)

    @property
    def _guarded(self) -> bool:
        return bool(self.read_only) and self._server_confined

    def start(self) -> None:
        self.host_dir = _host_dir(self.requested)
        server = sftp_server_command(self.host_dir, self.sftp_server, self.confine, read_only=self.read_only)
        self.confined = self._server_confined = server.confined
        self.fsname = fsname_for(self.host_dir)
        try:
            self._start(server)
        except BaseException:
            self._teardown()
            raise

    def stop(self) -> None:
        """Unmount (when this mount made it, once no other command uses it) and end the channel
        and the host's sftp-server."""
        try:
            if self.mounted and not self.reused:
                self._unmount()
        finally:
            self.mounted = False
            self._teardown()

    # -- internals ----------------------------------------------------------------------------
    def _start(self, server: SftpServerCommand) -> None:
        script = mount_script(self.guest_dir, self.fsname, self.token, self.options, confined=server.confined,
                              guarded=self._guarded)
        self._chan = open_channel(self.conn, script, self.timeout)
        self._spawn(self._read_messages, self._chan)
        deadline = time.monotonic() + self.timeout
        outcome = self._next_outcome(deadline)
        if outcome == "serve":  # sshfs starts in the guest: its requests wait in the channel
            self._serve(server)
            outcome = self._next_outcome(deadline)
        if outcome == "mounted":
            self.mounted = True
            return
        if outcome.startswith("reuse"):
            # The channel stays open until stop(): it is this command's hold on the live mount.
            self.mounted = self.reused = True
            self.confined = outcome.split()[1:] in (["confined"], ["guarded"])
            return
        if outcome.startswith("busy"):
            raise GuestError(
                f"{self.guest_dir} in the VM already holds a live mount of another folder "
                f"({outcome[5:].strip()}); another test/serve/claude command is using it: stop it first"
            )
        if outcome.startswith("unguarded"):
            raise GuestError(
                f"{self.guest_dir} in the VM holds a mount of this project through which .git is writable "
                "(another test/serve command); this command needs .git read-only: stop that command first"
            )
        if outcome.startswith("unconfined"):
            raise GuestError(
                f"{self.guest_dir} in the VM holds an unconfined mount of this project (another command runs "
                "with CORE_MOUNT_CONFINE=off) through which the VM reaches every host file you can; this "
                "command needs the project confined: stop that command first"
            )
        raise GuestError(f"cannot mount {self.host_dir} at {self.guest_dir} in the VM" + self._why())

    def _next_outcome(self, deadline: float) -> str:
        """The guest script's next decision ("" when it ended without one)."""
        while True:
            try:
                return self._outcomes.get(timeout=0.05)
            except queue.Empty:
                pass
            if time.monotonic() > deadline:
                raise GuestError(
                    f"mounting {self.host_dir} at {self.guest_dir} timed out after {self.timeout:.0f} s"
                    + self._why()
                )

    def _serve(self, server: SftpServerCommand) -> None:
        """Start the host's sftp-server on the channel."""
        try:
            self._proc = server.start(
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                start_new_session=True,  # Ctrl-C in the terminal must not kill it mid-unmount
            )
        except OSError as exc:
            raise GuestError(f"cannot start {server.argv[0]}: {exc.strerror or exc}") from None
        proc, chan = self._proc, self._chan
        self._spawn(self._pump_up, proc, chan)
        self._spawn(self._pump_down, proc, chan)
        self._spawn(self._read_sftp_errors, proc)

    def _unmount(self) -> None:
        """Unmount; while another command uses the mount, say so once and wait (Ctrl-C: now)."""
        told = False
        try:
            while True:
                _, out, _ = capture(self.conn, unmount_script(self.guest_dir, self.fsname, self.token,
                                                              self._server_confined, guarded=self._guarded),
                                    timeout=15)
                if not out.startswith("users "):
                    return
                if not told:
                    told = True
                    print(f"{self.guest_dir} in the VM is still used by another command on this project: "
                          "its mount stays until that ends (Ctrl-C: unmount now)", file=sys.stderr, flush=True)
                time.sleep(0.5)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                capture(self.conn, unmount_script(self.guest_dir, self.fsname, self.token, self._server_confined,
                                                  force=True, guarded=self._guarded), timeout=15)
            raise
        except Exception:  # the connection is gone: so is the mount
            return

    def _why(self) -> str:
        errors = [m[len("error:"):].strip() for m in self._messages if m.startswith("error:")]
        other = [m for m in self._messages
                 if not m.startswith(("error:", "stale", "serve", "mounted", "reuse", "unconfined", "unguarded"))]
        parts = errors + other + [f"sftp-server: {line}" for line in self._sftp_errors]
        if self._chan is not None and self._chan.exit_status_ready():
            code = self._chan.recv_exit_status()
            if not errors and code not in (0, -1):
                parts.append(f"exit status {code}")
        text = _read_errors(parts)
        return f": {text}" if text else ""

    def _spawn(self, target: Callable[..., None], *args) -> None:
        thread = threading.Thread(target=target, args=args, name=f"mount{target.__name__}", daemon=True)
        thread.start()
        self._threads.append(thread)

    @staticmethod
    def _pump_up(proc: subprocess.Popen, chan) -> None:
        """sftp-server's replies → the guest's sshfs."""
        try:
            fd = proc.stdout.fileno()
            while True:
                data = os.read(fd, 1 << 16)
                if not data:
                    break
                chan.sendall(data)
        except (OSError, EOFError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                chan.shutdown_write()

    def _pump_down(self, proc: subprocess.Popen, chan) -> None:
        """The guest's sshfs requests → sftp-server, set-id bits dropped (:mod:`.sftp_filter`)."""
        try:
            pump_requests(chan.recv, proc.stdin.fileno())
        except RefusedRequest as exc:
            self._sftp_errors.append(f"refused the guest's request: {exc}")
        except (OSError, EOFError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()

    def _read_messages(self, chan) -> None:
        stderr_lines(chan, self._message)
        self._outcomes.put("")  # the script ended

    def _message(self, line: str) -> None:
        line = line.rstrip("\r")
        if line.startswith(_MARK):
            text = line[len(_MARK):].strip()
            self._messages.append(text)
            if text in ("serve", "mounted") or text.startswith(("reuse", "busy", "unconfined", "unguarded", "error:")):
                self._outcomes.put(text)
        elif line.strip():
            self._messages.append(line.strip())  # sshfs's own words (e.g. a bad option)

    def _read_sftp_errors(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(proc.stderr.readline, b""):
                self._sftp_errors.append(raw.decode("utf-8", "replace").strip())

    def _teardown(self) -> None:
        chan, self._chan = self._chan, None
        proc, self._proc = self._proc, None
        if chan is not None:
            with contextlib.suppress(Exception):
                chan.shutdown_write()  # sshfs reads EOF and ends
            deadline = time.monotonic() + 5
            while not chan.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            with contextlib.suppress(Exception):
                chan.close()
        if proc is not None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads = []


def _host_dir(path: os.PathLike | str) -> Path:
    raw = Path(path).expanduser()
    try:
        resolved = raw.resolve(strict=True)
    except FileNotFoundError:
        raise GuestError(f"cannot mount {raw}: no such directory") from None
    except (OSError, RuntimeError) as exc:
        raise GuestError(f"cannot mount {raw}: {getattr(exc, 'strerror', None) or exc}") from None
    if not resolved.is_dir():
        raise GuestError(f"cannot mount {raw}: not a directory")
    if not os.access(resolved, os.R_OK | os.X_OK):
        raise GuestError(f"cannot mount {raw}: permission denied")
    return resolved

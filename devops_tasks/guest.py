"""The guest part: SSH to a running VM. Knows nothing about QEMU.

* :func:`connect` is the one factory for Fabric connections to a VM: the VM's recorded port on
  127.0.0.1, strict host-key checking against ``~/.core/known_hosts`` only (never auto-add), the
  tool's own login key only (no agent keys, no ``~/.ssh`` keys), no ``~/.ssh/config`` or Fabric
  config files, timeouts, and agent forwarding only when asked for *and* a local agent exists.
* :func:`ssh_argv` builds the same policy for OpenSSH, used for ``shell``: OpenSSH gives the
  interactive terminal (resize, Ctrl-C, Ctrl-D, ``~.``) exactly as ``ssh`` does, and its connection
  multiplexing makes ``devops shell -- CMD`` cheaper than a plain ``ssh`` (see :func:`control_path`).
* :func:`run` runs one shell command with streamed output and returns its exit status; Ctrl-C
  reaches the guest (through the pty, or by killing the command's process group when there is none).
* :class:`Mount` mounts a host folder in the guest the way Lima does (reverse SSHFS): the host's
  ``sftp-server`` talks to the guest's ``sshfs -o slave`` over an SSH channel, so the host needs no
  SSH server. The host path is only ever an argv word on the host (``sftp-server -d``); it never
  reaches a shell. The sftp-server runs in a bubblewrap sandbox that sees only the project
  (:func:`sftp_server_command`).
* :class:`Forward` forwards 127.0.0.1:PORT on the host to a port in the guest.

Fabric and Paramiko are imported inside functions so ``import devops_tasks`` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import select
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator, Mapping, Optional, Sequence

from .errors import GuestError

if TYPE_CHECKING:  # pragma: no cover
    from fabric import Connection

LOOPBACK = "127.0.0.1"
GUEST_USER = "root"
GUEST_APP_DIR = "/app"
CONNECT_TIMEOUT = 15.0
CONTROL_PERSIST = 600  # seconds an idle OpenSSH master stays up (it dies with the VM anyway)
MOUNT_TIMEOUT = 30.0

# sshfs options. Correctness first: edits on the host must show in the guest promptly, so the
# kernel page cache is dropped on every open (no kernel_cache/auto_cache) and sshfs's own directory
# and stat cache lives 1 s instead of 20 s (about the same as the kernel's 1 s attribute cache).
# allow_other lets non-root users in the guest (e.g. a sandboxed agent) use the mount.
SSHFS_OPTIONS = ("dcache_timeout=1", "allow_other")

SFTP_SERVER_CANDIDATES = (
    "/usr/lib/openssh/sftp-server",  # Debian, Ubuntu
    "/usr/libexec/openssh/sftp-server",  # Fedora, RHEL
    "/usr/libexec/sftp-server",  # macOS, Alpine
    "/usr/lib/ssh/sftp-server",  # Arch
    "/usr/lib/sftp-server",
    "/usr/local/libexec/sftp-server",
    "/opt/homebrew/libexec/sftp-server",
)

_MARK = "devops-tasks:"


@dataclass(frozen=True)
class Target:
    """Where and how to reach one VM's SSH server."""

    port: int
    identity: Path  # the tool's private login key
    known_hosts: Path  # the only file guest host keys are trusted from
    host: str = LOOPBACK
    user: str = GUEST_USER
    vm_dir: Optional[Path] = None  # names the OpenSSH control socket (one master per VM)

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


# --------------------------------------------------------------------------- local checks


def agent_socket(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``$SSH_AUTH_SOCK`` when it names an existing socket, else None.

    Forwarding an agent that does not exist makes Paramiko's forwarding thread die and the command
    hang, so "forward the agent" always means "forward it if there is one".
    """
    environ = os.environ if environ is None else environ
    path = environ.get("SSH_AUTH_SOCK", "")
    if not path:
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return path if stat.S_ISSOCK(mode) else None


def check_target(target: Target) -> None:
    """The login key and known_hosts must exist: a clear error beats an SSH auth failure."""
    if not os.path.isfile(target.identity):
        raise GuestError(
            f"login key {target.identity} is missing (boot the VM again: 'inv vm.boot --fresh')"
        )
    if not os.path.isfile(target.known_hosts):
        raise GuestError(
            f"{target.known_hosts} is missing, so the VM's host key cannot be checked "
            "(boot the VM again: 'inv vm.boot --fresh')"
        )


# --------------------------------------------------------------------------- Fabric


def connect(
    target: Target,
    forward_agent: bool = False,
    connect_timeout: float = CONNECT_TIMEOUT,
    open: bool = True,
) -> "Connection":
    """The one factory for Fabric connections to a VM (opened unless ``open=False``).

    Strict: the host key must be in ``target.known_hosts`` (a wrong key raises, a missing entry
    raises, nothing is ever added); only ``target.identity`` is offered; no SSH or Fabric config
    file is read.
    """
    import logging

    import paramiko
    from fabric import Config, Connection

    # Paramiko logs refused forward channels and similar at ERROR; Python's last-resort handler
    # would print them on stderr. Errors that matter are raised and reported by this module.
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
    check_target(target)
    config = Config(
        lazy=True,  # no /etc/fabric.yaml, ~/.fabric.yaml
        ssh_config=paramiko.SSHConfig(),  # an explicit empty config: no ~/.ssh/config, no /etc/ssh
        overrides={"load_ssh_configs": False, "run": {"echo": False}},
    )
    conn = Connection(
        target.host,
        user=target.user,
        port=target.port,
        config=config,
        connect_timeout=int(max(1, connect_timeout)),
        forward_agent=bool(forward_agent and agent_socket() is not None),
        inline_ssh_env=True,
        connect_kwargs={
            "key_filename": [str(target.identity)],
            "look_for_keys": False,
            "allow_agent": False,
            "banner_timeout": connect_timeout,
            "auth_timeout": connect_timeout,
        },
    )
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        conn.client.load_host_keys(str(target.known_hosts))
    except OSError as exc:
        raise GuestError(f"cannot read {target.known_hosts}: {exc.strerror or exc}") from None
    if open:
        _open(conn, target)
    return conn


def _open(conn: "Connection", target: Target) -> None:
    import paramiko

    try:
        conn.open()
    except paramiko.BadHostKeyException:
        raise GuestError(
            f"the VM at {target.host}:{target.port} presented a host key that does not match "
            f"{target.known_hosts}; refusing to connect (if the VM was replaced, boot it again: "
            "'inv vm.boot --fresh')"
        ) from None
    except paramiko.AuthenticationException as exc:
        raise GuestError(
            f"the VM at {target.host}:{target.port} rejected the login key {target.identity} ({exc})"
        ) from None
    except paramiko.SSHException as exc:
        if "known_hosts" in str(exc):
            raise GuestError(
                f"no host key for [{target.host}]:{target.port} in {target.known_hosts}; refusing "
                "to connect to an unknown host (boot the VM with 'inv vm.boot')"
            ) from None
        raise GuestError(f"SSH to the VM at {target.host}:{target.port} failed: {exc}") from None
    except (OSError, EOFError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise GuestError(
            f"cannot reach the VM's SSH server at {target.host}:{target.port}: {reason} "
            "(is it running? 'inv vm.status')"
        ) from None


@contextlib.contextmanager
def session(target: Target, forward_agent: bool = False) -> Iterator["Connection"]:
    """An open connection for the ``with`` block, closed after it."""
    conn = connect(target, forward_agent=forward_agent)
    try:
        yield conn
    finally:
        conn.close()


# --------------------------------------------------------------------------- guest commands


def quote_words(words: Sequence[str]) -> str:
    """argv words → one shell command the guest's shell splits back into exactly these words."""
    if isinstance(words, (str, bytes)):
        raise TypeError("expected a list of words, not a string")
    return shlex.join(str(word) for word in words)


def env_exports(env: Optional[Mapping[str, str]]) -> str:
    """``export A='x' B='y'`` (values quoted), or "" for no env."""
    if not env:
        return ""
    parts = []
    for key, value in env.items():
        if not key.isidentifier() or not key.isascii():
            raise GuestError(f"invalid environment variable name {key!r}")
        parts.append(f"{key}={shlex.quote(str(value))}")
    return "export " + " ".join(parts)


# Guest shell functions over the process tree rooted at PID $p: a command started without a pty is
# not always a process-group leader (dropbear keeps its own group), so the tree is found with ps.
_TREE_FUNCS = (
    "tree() { for c in $(ps -o pid= -o ppid= 2>/dev/null | awk -v p=\"$1\" '$2 == p {print $1}'); "
    "do tree \"$c\"; done; echo \"$1\"; }\n"
    "sig() { kill -\"$1\" -- -\"$p\" 2>/dev/null || kill -\"$1\" $(tree \"$p\") 2>/dev/null; }\n"
    "alive() { kill -0 \"$p\" 2>/dev/null && ! grep -qs '^State:[[:space:]]*Z' /proc/\"$p\"/status; }\n"
)


def _end_tree(grace: float) -> str:
    steps = int(max(1, grace / 0.1))
    return (
        "sig TERM; i=0\n"
        f"while alive && [ $i -lt {steps} ]; do sleep 0.1; i=$((i+1)); done\n"
        "alive && sig KILL\n"
    )


def wrap_command(
    command: str,
    cwd: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    pidfile: str = "",
    watchdog: bool = False,
) -> str:
    """The guest command line: ``cd``, export the env, then run ``command`` in its own ``sh -c``
    (an ``exit`` inside it cannot skip the cleanup). The exit status is the command's.

    ``pidfile``: the wrapper's PID is written there, so :func:`kill_script` can end the command
    from another channel (Ctrl-C without a pty). ``watchdog`` (for commands without a pty): a
    background reader of the channel's stdin, which only reaches EOF when the client is gone
    (nothing is sent on it), ends the command's process tree then. Without it a server started by
    a killed ``serve`` would run on in the guest. (With a pty, the SSH server's hangup does that.)
    """
    steps = []
    if cwd:
        steps.append(f"cd {shlex.quote(cwd)}")
    exports = env_exports(env)
    if exports:
        steps.append(exports)
    steps.append(f"sh -c {shlex.quote(command)}" + (" </dev/null" if watchdog else ""))
    body = " && ".join(steps)
    if not pidfile and not watchdog:
        return body
    lines = []
    if pidfile:
        lines.append(f"echo $$ >{shlex.quote(pidfile)}")
    if watchdog:
        cleanup = f"rm -f {shlex.quote(pidfile)}; " if pidfile else ""
        lines += [
            "p=$$",
            _TREE_FUNCS.rstrip("\n"),
            "exec 3<&0",
            "( trap '' TERM; while read -r _; do :; done; " + cleanup + _end_tree(3.0).replace("\n", "; ")
            + ") <&3 >/dev/null 2>&1 &",
            "w=$!",
            "exec 3<&-",
        ]
    lines.append(body)
    lines.append("rc=$?")
    if watchdog:
        # Reaped with the shell's stderr closed for that step only: bash would otherwise print
        # "line N: PID Killed ( trap '' TERM; ... )" after the command's output.
        lines.append("{ kill -KILL $w; wait $w; } 2>/dev/null")
    if pidfile:
        lines.append(f"rm -f {shlex.quote(pidfile)}")
    lines.append("exit $rc")
    return "\n".join(lines) + "\n"


def kill_script(pidfile: str, grace: float = 3.0) -> str:
    """Guest script: end the command whose wrapper wrote ``pidfile`` and everything it started
    (TERM, up to ``grace`` seconds, then KILL)."""
    pf = shlex.quote(pidfile)
    return (
        f"[ -f {pf} ] || exit 0; p=$(cat {pf}); rm -f {pf}; [ -n \"$p\" ] || exit 0\n"
        + _TREE_FUNCS
        + _end_tree(grace)
        + "exit 0\n"
    )


def _stdin_interactive() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def run(
    conn: "Connection",
    command: str,
    cwd: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    pty: Optional[bool] = None,
    timeout: Optional[float] = None,
    hide: bool = False,
    out_stream: Optional[IO[str]] = None,
    err_stream: Optional[IO[str]] = None,
) -> int:
    """Run ``command`` (a shell command line) in the guest, stream its output, return its status.

    ``pty`` None means "like ssh": a pty when stdin and stdout are terminals. With a pty, stdin is
    forwarded and Ctrl-C reaches the guest as ^C (the program decides; its status is returned).
    Without one, stdin is not read, and Ctrl-C, SIGTERM or SIGHUP end the command's process tree in
    the guest, then raise KeyboardInterrupt here. (Invoke cannot be interrupted there itself: it
    waits for the remote output to end before it lets a KeyboardInterrupt through.)
    An exit without status (the connection dropped) is 255, as in ssh.
    """
    from invoke.exceptions import CommandTimedOut

    if pty is None:
        pty = _stdin_interactive()
    pidfile = f"/tmp/.devops-tasks-run.{secrets.token_hex(8)}.pid"
    line = wrap_command(command, cwd=cwd, env=env, pidfile=pidfile, watchdog=not pty)
    kwargs = dict(warn=True, pty=pty, hide=hide, echo=False, timeout=timeout)
    if not pty:
        kwargs["in_stream"] = False
    if out_stream is not None:
        kwargs["out_stream"] = out_stream
    if err_stream is not None:
        kwargs["err_stream"] = err_stream
    stopping = threading.Event()

    def stop(signum=None, frame=None) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=kill_remote, args=(conn, pidfile), daemon=True).start()

    signals = ["SIGTERM", "SIGHUP"] if pty else ["SIGINT", "SIGTERM", "SIGHUP"]
    try:
        with _signal_handlers(signals, stop):
            result = conn.run(line, **kwargs)
    except KeyboardInterrupt:  # with a pty, Invoke sends ^C itself and raises only when it gives up
        kill_remote(conn, pidfile)
        raise
    except CommandTimedOut:
        kill_remote(conn, pidfile)
        raise GuestError(f"command timed out after {timeout} s: {command}") from None
    if stopping.is_set():
        raise KeyboardInterrupt
    code = result.exited
    return 255 if code is None or code < 0 else int(code)


@contextlib.contextmanager
def _signal_handlers(names: Sequence[str], handler: Callable) -> Iterator[None]:
    """Install ``handler`` for these signals (main thread only; ignored signals stay ignored)."""
    import signal

    saved = {}
    if threading.current_thread() is threading.main_thread():
        for name in names:
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def kill_remote(conn: "Connection", pidfile: str, timeout: float = 15.0) -> None:
    """End the command that wrote ``pidfile`` (see :func:`kill_script`); errors are ignored.

    A channel of its own, so it works while another thread waits in ``conn.run``.
    """
    with contextlib.suppress(Exception):
        chan = conn.client.get_transport().open_session(timeout=timeout)
        try:
            chan.settimeout(timeout)
            chan.exec_command(kill_script(pidfile))
            chan.recv_exit_status()
        finally:
            chan.close()


def capture(conn: "Connection", command: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run a short command, return (status, stdout, stderr); nothing is printed."""
    result = conn.run(command, warn=True, hide=True, in_stream=False, timeout=timeout)
    return int(result.exited if result.exited is not None else 255), result.stdout, result.stderr


# --------------------------------------------------------------------------- OpenSSH


def control_path(target: Target, agent: Optional[str] = None) -> Optional[Path]:
    """The OpenSSH master socket for this VM, or None when no safe place exists.

    A master (``ControlMaster=auto``, ``ControlPersist``) keeps one authenticated connection per VM
    open, so each later ``shell -- CMD`` opens a channel on it instead of a new TCP + key exchange
    (Lima does the same). It dies with the VM, whose QEMU holds the TCP connection's other end.
    The socket lives in a private folder with a short name (a Unix socket path has ~100 bytes).
    A master forwards the agent it was started with, so ``agent`` (the socket to forward, or None)
    is part of the name: with and without an agent are two masters.
    """
    if os.environ.get("CORE_SSH_MULTIPLEX", "1").strip().lower() in ("0", "no", "false", "off"):
        return None
    key = f"{target.vm_dir or ''}|{target.known_hosts}|{target.host}|{target.port}|{target.user}|{agent or ''}"
    name = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".sock"
    for base in (os.environ.get("XDG_RUNTIME_DIR", ""), "/tmp"):
        folder = Path(base) / f"devops-tasks-{os.getuid()}" if base else None
        # OpenSSH adds a 17-character suffix while it sets the master up; sun_path is 104-108 bytes.
        if folder is None or len(str(folder / name)) + 17 >= 100:
            continue
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            info = os.lstat(folder)
        except OSError:
            return None
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            return None  # someone else's or a loose folder: do not multiplex through it
        return folder / name
    return None


def ssh_options(target: Target, forward_agent: bool = False, multiplex: bool = True) -> list[str]:
    """OpenSSH options with the same policy as :func:`connect`."""
    opts = [
        "-F", "/dev/null",  # no ~/.ssh/config, no /etc/ssh/ssh_config surprises
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={target.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", "CheckHostIP=no",
        "-o", "IdentitiesOnly=yes",
        "-o", f"IdentityFile={target.identity}",
        # IdentityAgent=none also unsets SSH_AUTH_SOCK in ssh, which would break -A: only without it.
        "-o", "IdentityAgent=none" if not forward_agent else "IdentityAgent=SSH_AUTH_SOCK",
        "-o", "BatchMode=yes",
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
        "-o", f"ConnectTimeout={int(CONNECT_TIMEOUT)}",
        "-o", "ServerAliveInterval=15",
        "-o", "LogLevel=ERROR",
        "-p", str(target.port),
    ]
    control = control_path(target, agent_socket() if forward_agent else None) if multiplex else None
    if control is not None:
        opts += [
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={control}",
            "-o", f"ControlPersist={CONTROL_PERSIST}",
        ]
    else:
        opts += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    if forward_agent:
        opts += ["-A"]
    else:
        opts += ["-a"]
    return opts


def ssh_argv(
    target: Target,
    command: Sequence[str] = (),
    forward_agent: bool = True,
    tty: Optional[bool] = None,
    multiplex: bool = True,
    ssh: str = "ssh",
) -> list[str]:
    """The ``ssh`` argv for a login shell (no ``command``) or for running ``command``'s words.

    The words are joined with :func:`shlex.join`, so the guest's shell splits them back into
    exactly these words: spaces, quotes, ``$`` and globs arrive as typed. ``tty`` None is ssh's
    own rule (a pty for a login shell on a terminal, none for a command). The agent is forwarded
    only when asked and a local agent exists.
    """
    agent = bool(forward_agent and agent_socket() is not None)
    argv = [ssh, *ssh_options(target, forward_agent=agent, multiplex=multiplex)]
    if tty is True:
        argv.append("-tt" if command else "-t")
    elif tty is False:
        argv.append("-T")
    argv.append(f"{target.user}@{target.host}")
    if command:
        argv += ["--", quote_words(command)]
    return argv


def close_master(target: Target) -> None:
    """Ask this VM's OpenSSH masters (with and without the current agent) to exit."""
    for agent in {None, agent_socket()}:
        control = control_path(target, agent)
        if control is None or not control.exists():
            continue
        argv = ["ssh", "-F", "/dev/null", "-o", f"ControlPath={control}", "-p", str(target.port),
                "-O", "exit", f"{target.user}@{target.host}"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)


def run_foreground(argv: Sequence[str]) -> int:
    """Run a program attached to this terminal and return its exit status, as a shell would.

    While it runs, SIGINT and SIGQUIT are ignored here: Ctrl-C belongs to the program (ssh puts the
    terminal in raw mode and passes it on; without a terminal ssh itself gets the signal).
    """
    import signal

    if shutil.which(argv[0]) is None:
        raise GuestError(f"{argv[0]} not found (install openssh-client)")
    in_main = threading.current_thread() is threading.main_thread()
    saved = {}
    if in_main:
        for sig in (signal.SIGINT, signal.SIGQUIT):
            saved[sig] = signal.signal(sig, signal.SIG_IGN)

    def restore_child() -> None:  # the child gets default dispositions back
        for sig in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)

    try:
        proc = subprocess.Popen(list(argv), preexec_fn=restore_child if in_main else None)
        code = proc.wait()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if code < 0:  # killed by a signal: the shell's 128+N
        return 128 - code
    return code


# --------------------------------------------------------------------------- the mount


def find_sftp_server(environ: Optional[Mapping[str, str]] = None) -> str:
    """The host's ``sftp-server`` (``$CORE_SFTP_SERVER`` overrides the usual places)."""
    environ = os.environ if environ is None else environ
    override = environ.get("CORE_SFTP_SERVER", "")
    candidates = (override,) if override else SFTP_SERVER_CANDIDATES
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    if override:
        raise GuestError(f"CORE_SFTP_SERVER={override} is not an executable file")
    raise GuestError(
        "sftp-server not found on this machine; it serves the project to the VM "
        "(Debian/Ubuntu: apt-get install openssh-sftp-server)"
    )


CONFINE_MODES = ("auto", "require", "off")
_BWRAP_FIX = "apt-get install bubblewrap"
_UNCONFINED = "the VM can read and write every host file you can, not only the project"
_probed: dict[tuple[str, ...], Optional[str]] = {}
_warned: set[str] = set()


def confine_mode(requested: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> str:
    """How strictly the mount's sftp-server is confined: ``auto`` (sandboxed when bubblewrap works,
    else unconfined with a warning), ``require`` (sandboxed or an error) or ``off``.

    ``$CORE_MOUNT_CONFINE`` decides, else the caller's ``requested`` mode, else ``auto``; a caller
    asking for ``require`` (``inv claude``) gets it unless ``CORE_MOUNT_CONFINE=off`` is set.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("CORE_MOUNT_CONFINE", "").strip().lower()
    if raw and raw not in CONFINE_MODES:
        raise GuestError(f"CORE_MOUNT_CONFINE={raw!r} is not one of {', '.join(CONFINE_MODES)}")
    if requested is not None and requested not in CONFINE_MODES:
        raise ValueError(f"confine must be one of {CONFINE_MODES}, not {requested!r}")
    if raw == "off":
        return "off"
    if "require" in (raw, requested):
        return "require"
    return raw or requested or "auto"


def find_bwrap(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """bubblewrap's ``bwrap`` on ``$PATH`` (or in /usr/bin), or None."""
    environ = os.environ if environ is None else environ
    found = shutil.which("bwrap", path=environ.get("PATH") or os.defpath)
    if found is None and os.access("/usr/bin/bwrap", os.X_OK):
        found = "/usr/bin/bwrap"
    return os.path.abspath(found) if found else None


@dataclass(frozen=True)
class SftpServerCommand:
    """How to start the host's sftp-server for one mount (see :func:`sftp_server_command`)."""

    argv: tuple[str, ...]
    confined: bool
    # (index in argv, content): that argv word becomes the number of a pipe holding the content
    # (bwrap's ``--file FD DEST``), so the sandbox's /etc/passwd and /etc/group are made up here.
    files: tuple[tuple[int, bytes], ...] = ()
    env: Optional[Mapping[str, str]] = None  # None: this process's environment

    def start(self, **popen) -> subprocess.Popen:
        """``subprocess.Popen`` of the command (``popen``: its stdin/stdout/stderr and so on)."""
        argv = list(self.argv)
        fds: list[int] = []
        try:
            for index, data in self.files:
                read_end, write_end = os.pipe()
                fds.append(read_end)
                with open(write_end, "wb") as pipe:  # a few hundred bytes: the pipe holds them
                    pipe.write(data)
                argv[index] = str(read_end)
            env = None if self.env is None else dict(self.env)
            return subprocess.Popen(argv, pass_fds=fds, env=env, **popen)
        finally:
            for fd in fds:
                os.close(fd)


def sftp_server_command(
    host_dir: Path,
    server: Optional[str] = None,
    confine: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> SftpServerCommand:
    """The command that serves ``host_dir`` to the guest's sshfs over stdin/stdout.

    ``sftp-server -d DIR`` only sets the starting directory: whoever speaks SFTP on the channel
    (the guest is root in the VM, and ``inv claude`` runs an agent there) could read and write
    every host file this user can, and a symlink in the project to a file outside is followed. So
    the server runs in a bubblewrap sandbox whose file system is the project (read-write, at its
    real path, so the guest's ``sshfs :`` path stays the same), /usr and the loader paths
    read-only, a minimal /dev, and an /etc holding only a one-user passwd and group file; no
    network, no other processes, no capabilities (also as root), no environment, its own session.

    ``confine`` (see :func:`confine_mode`): without a working ``bwrap`` ``auto`` falls back to the
    plain server with a one-line warning on stderr, ``require`` raises :class:`GuestError`.
    The one place that decides how the server runs: :class:`Mount` uses it, callers only ask.
    """
    environ = os.environ if environ is None else environ
    server = server or find_sftp_server(environ)
    host_dir = Path(host_dir)
    start_dir = str(host_dir).replace("%", "%%")  # sftp-server expands %d and %u
    plain = SftpServerCommand((server, "-e", "-d", start_dir), confined=False)
    mode = confine_mode(confine, environ)
    if mode == "off":
        return plain
    bwrap = find_bwrap(environ)
    if host_dir == Path("/"):  # it would hold the sandbox's own /etc and /dev: nothing to confine
        problem, fix = "the project is / (the whole file system)", "mount a project folder"
    elif bwrap is None:
        problem, fix = "bubblewrap (bwrap) is not installed", _BWRAP_FIX
    else:
        command = _bwrap_command(bwrap, host_dir, server, start_dir)
        problem = _probe(command)
        if problem is None:
            return command
        fix = "are user namespaces disabled? kernel.unprivileged_userns_clone, AppArmor, a container"
    if mode == "require":
        raise GuestError(
            f"refusing to mount the project unconfined: {problem} ({fix}); unconfined, {_UNCONFINED} "
            "(CORE_MOUNT_CONFINE=off allows that)"
        )
    warning = f"warning: {problem}, so {_UNCONFINED} ({fix}; CORE_MOUNT_CONFINE=off hides this)"
    if warning not in _warned:
        _warned.add(warning)
        print(warning, file=sys.stderr, flush=True)
    return plain


def _bwrap_command(bwrap: str, host_dir: Path, server: str, start_dir: str) -> SftpServerCommand:
    import grp
    import pwd

    uid, gid = os.getuid(), os.getgid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"u{uid}"
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = f"g{gid}"
    # sftp-server looks its user up ("No user found for uid N" otherwise): this user only, with the
    # project as its home. The host's own files (other users, NSS, LDAP) stay outside.
    passwd = f"{user}:x:{uid}:{gid}::{host_dir}:/bin/sh\n".encode("utf-8", "surrogateescape")
    group_file = f"{group}:x:{gid}:\n".encode("utf-8", "surrogateescape")
    argv = [
        bwrap,
        "--die-with-parent",  # killing bwrap (Mount's teardown) ends the server too
        "--unshare-all",  # no network (SFTP goes over stdin/stdout), pid, ipc, uts, user, cgroup
        "--new-session",
        "--cap-drop", "ALL",  # as root bwrap would keep the capabilities in the sandbox
        "--ro-bind", "/usr", "/usr",
    ]
    bound = ["/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = f"/{name}"
        if os.path.islink(path):  # merged /usr: /lib -> usr/lib
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):  # a separate /lib
            argv += ["--ro-bind", path, path]
            bound.append(path)
    if os.path.isfile("/etc/ld.so.cache"):
        argv += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    files = []
    for dest, data in (("/etc/passwd", passwd), ("/etc/group", group_file)):
        argv += ["--file", "", dest]
        files.append((len(argv) - 2, data))
    argv += ["--dev", "/dev"]  # null, zero, urandom...: "Couldn't open /dev/null" otherwise
    real_server = os.path.realpath(server)
    if not any(real_server.startswith(prefix + "/") for prefix in bound):
        argv += ["--ro-bind", real_server, real_server]
    project = str(host_dir)
    argv += ["--bind", project, project]  # last: a project under /usr is writable
    argv += ["--remount-ro", "/"]  # the sandbox's own root (a tmpfs) takes no writes either
    argv += ["--chdir", project, real_server, "-e", "-d", start_dir]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # the host's environment may hold tokens
    return SftpServerCommand(tuple(argv), confined=True, files=tuple(files), env=env)


def _probe(command: SftpServerCommand) -> Optional[str]:
    """Run the confined server once with no input (it ends at EOF): None when bwrap can build the
    sandbox here, else why not. Remembered for the process."""
    key = command.argv
    if key not in _probed:
        try:
            proc = command.start(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                _, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
                err = b"timed out"
            lines = [line.strip() for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
            reason = None if proc.returncode == 0 else (lines[-1] if lines else f"status {proc.returncode}")
        except OSError as exc:
            reason = f"{command.argv[0]}: {exc.strerror or exc}"
        _probed[key] = None if reason is None else f"bubblewrap cannot sandbox the sftp-server here ({reason})"
    return _probed[key]


def fsname_for(host_dir: Path) -> str:
    """The mount's source name in the guest's /proc/mounts: a hash of the host path (never the
    path itself, which may hold anything), so a repeated mount of the same folder is recognised."""
    digest = hashlib.sha256(os.fsencode(str(host_dir))).hexdigest()[:16]
    return f"devops-tasks:{digest}"


def mount_script(guest_dir: str, fsname: str, token: str, options: Sequence[str] = SSHFS_OPTIONS) -> str:
    """Guest script for the mount channel. Its stdin/stdout carry SFTP; it reports on stderr.

    * ``/app`` already holds a live mount of the same folder → ``reuse`` (nothing mounted).
    * a live mount of something else → ``busy`` (refuse: another command is using ``/app``).
    * a dead mount (its sshfs gone) → lazily unmounted, then mounted afresh.
    * sshfs or FUSE missing → an ``error:`` line saying so.
    * otherwise sshfs runs in the background on this channel's stdin/stdout and the script waits
      for ``/proc/mounts`` to list it (``mounted``), then for sshfs to end.
    """
    d = shlex.quote(guest_dir)
    mine = shlex.quote(f"{fsname}:{token}")
    prefix = shlex.quote(f"{fsname}:")
    opts = ",".join(["slave", f"fsname={fsname}:{token}", *options])
    return f"""\
D={d}; F={mine}; P={prefix}
say() {{ echo "{_MARK} $*" >&2; }}
top() {{ awk -v d="$D" '$2 == d {{ s = $1 " " $3 }} END {{ print s }}' /proc/mounts; }}
set -- $(top)
if [ -n "$1" ]; then
  if [ -d "$D/." ]; then
    case "$1" in "$P"*) say reuse; exit 0;; esac
    say "busy $1 $2"; exit 3
  fi
  umount -l "$D" 2>/dev/null || fusermount3 -uz "$D" 2>/dev/null || fusermount -uz "$D" 2>/dev/null
  say "stale $1"
fi
s=$(command -v sshfs 2>/dev/null)
[ -n "$s" ] && [ -f "$s" ] && [ -x "$s" ] || {{ say "error: sshfs is not installed in the guest image (it needs sshfs and fuse)"; exit 4; }}
[ -c /dev/fuse ] || modprobe fuse 2>/dev/null
[ -c /dev/fuse ] || {{ say "error: FUSE is not available in the guest (no /dev/fuse; is the fuse kernel module in the image?)"; exit 5; }}
mkdir -p "$D" || {{ say "error: cannot create $D in the guest"; exit 6; }}
exec 3<&0
sshfs : "$D" -f -o {shlex.quote(opts)} <&3 3<&- &
pid=$!
exec 3<&-
i=0
until awk -v d="$D" -v f="$F" '$2 == d && $1 == f {{ ok = 1 }} END {{ exit !ok }}' /proc/mounts; do
  if ! kill -0 "$pid" 2>/dev/null; then wait "$pid"; say "error: sshfs exited with status $? before the mount was ready"; exit 7; fi
  i=$((i+1)); [ $i -le 2000 ] || {{ say "error: the mount did not appear"; kill "$pid"; exit 8; }}
  sleep 0.02
done
say mounted
wait "$pid"
"""


def unmount_script(guest_dir: str, fsname: str, token: str) -> str:
    """Unmount ``guest_dir`` only when its top mount is still this one (never someone else's)."""
    d = shlex.quote(guest_dir)
    mine = shlex.quote(f"{fsname}:{token}")
    return (
        f"D={d}; F={mine}\n"
        "top=$(awk -v d=\"$D\" '$2 == d { s = $1 } END { print s }' /proc/mounts)\n"
        "[ \"$top\" = \"$F\" ] || exit 0\n"
        "umount \"$D\" 2>/dev/null || umount -l \"$D\" 2>/dev/null || fusermount3 -uz \"$D\" 2>/dev/null"
        " || fusermount -uz \"$D\"\n"
    )


def _read_errors(lines: Sequence[str]) -> str:
    text = "; ".join(line.strip() for line in lines if line.strip())
    return text[-800:]


class Mount:
    """Mount a host folder in the guest (default ``/app``) for the ``with`` block.

    ``with Mount(conn, project_dir):`` — ready when the block starts, unmounted when it ends (also
    on Ctrl-C or an error). A second mount of the same folder while one is live reuses it; a live
    mount of another folder at the same place is an error, and a dead one is cleaned up first.

    The host's sftp-server runs in a sandbox that sees only the project (:func:`sftp_server_command`;
    ``confine``: see :func:`confine_mode`). Start and stop a mount in one thread that outlives it
    (the sandbox dies with the thread that started it: ``bwrap --die-with-parent``).
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
    ):
        self.conn = conn
        self.requested = host_dir
        self.guest_dir = guest_dir
        self.timeout = timeout
        self.options = tuple(options)
        self.sftp_server = sftp_server
        self.confine = confine
        self.confined = False
        self.token = secrets.token_hex(4)
        self.host_dir: Optional[Path] = None
        self.reused = False
        self.mounted = False
        self._proc: Optional[subprocess.Popen] = None
        self._chan = None
        self._threads: list[threading.Thread] = []
        self._messages: deque[str] = deque(maxlen=50)
        self._sftp_errors: deque[str] = deque(maxlen=20)
        self._state = threading.Event()
        self._outcome = ""

    # -- public -------------------------------------------------------------------------------
    def __enter__(self) -> "Mount":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.host_dir = _host_dir(self.requested)
        server = sftp_server_command(self.host_dir, self.sftp_server, self.confine)
        self.confined = server.confined
        self.fsname = fsname_for(self.host_dir)
        try:
            self._start(server)
        except BaseException:
            self._teardown()
            raise

    def stop(self) -> None:
        """Unmount (when this mount made it) and end the channel and the host's sftp-server."""
        if self.mounted and not self.reused:
            with contextlib.suppress(Exception):
                capture(self.conn, unmount_script(self.guest_dir, self.fsname, self.token), timeout=15)
        self.mounted = False
        self._teardown()

    # -- internals ----------------------------------------------------------------------------
    def _start(self, server: SftpServerCommand) -> None:
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
        transport = self.conn.client.get_transport() if self.conn.is_connected else None
        if transport is None:
            self.conn.open()
            transport = self.conn.client.get_transport()
        self._chan = transport.open_session(timeout=self.timeout)
        self._chan.exec_command(mount_script(self.guest_dir, self.fsname, self.token, self.options))
        proc, chan = self._proc, self._chan
        self._spawn(self._pump_up, proc, chan)
        self._spawn(self._pump_down, proc, chan)
        self._spawn(self._read_messages, chan)
        self._spawn(self._read_sftp_errors, proc)
        deadline = time.monotonic() + self.timeout
        while not self._state.wait(0.05):
            if self._chan.exit_status_ready() and not self._state.is_set():
                self._state.wait(0.5)  # let the last stderr lines arrive
                break
            if time.monotonic() > deadline:
                raise GuestError(
                    f"mounting {self.host_dir} at {self.guest_dir} timed out after {self.timeout:.0f} s"
                    + self._why()
                )
        outcome = self._outcome
        if outcome == "mounted":
            self.mounted = True
            return
        if outcome == "reuse":
            self.mounted = self.reused = True
            self._teardown()
            return
        if outcome.startswith("busy"):
            raise GuestError(
                f"{self.guest_dir} in the VM already holds a live mount of another folder "
                f"({outcome[5:].strip()}); another test/serve/claude command is using it: stop it first"
            )
        raise GuestError(f"cannot mount {self.host_dir} at {self.guest_dir} in the VM" + self._why())

    def _why(self) -> str:
        errors = [m[len("error:"):].strip() for m in self._messages if m.startswith("error:")]
        other = [m for m in self._messages if not m.startswith(("error:", "stale", "mounted", "reuse"))]
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

    @staticmethod
    def _pump_down(proc: subprocess.Popen, chan) -> None:
        """The guest's sshfs requests → sftp-server."""
        try:
            fd = proc.stdin.fileno()
            while True:
                data = chan.recv(1 << 16)
                if not data:
                    break
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
        except (OSError, EOFError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()

    def _read_messages(self, chan) -> None:
        buffer = b""
        try:
            while True:
                data = chan.recv_stderr(4096)
                if not data:
                    break
                buffer += data
                while b"\n" in buffer:
                    raw, buffer = buffer.split(b"\n", 1)
                    self._message(raw.decode("utf-8", "replace"))
        except (OSError, EOFError):
            pass
        if buffer:
            self._message(buffer.decode("utf-8", "replace"))
        self._state.set()

    def _message(self, line: str) -> None:
        line = line.rstrip("\r")
        if line.startswith(_MARK):
            text = line[len(_MARK):].strip()
            self._messages.append(text)
            if text in ("mounted", "reuse") or text.startswith(("busy", "error:")):
                if not self._outcome:
                    self._outcome = text
                self._state.set()
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


# --------------------------------------------------------------------------- port forwards


def bind_local(port: int, host: str = LOOPBACK) -> socket.socket:
    """A listening socket on host:port, or a clear error when the port is taken."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise GuestError(f"invalid port {port!r} (use 1-65535)")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise GuestError(
                f"port {port} on {host} is already in use on this machine; choose another with --port"
            ) from None
        if exc.errno == errno.EACCES:
            raise GuestError(f"no permission to listen on {host}:{port}; choose a port above 1023") from None
        raise GuestError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class Forward:
    """Forward ``127.0.0.1:local_port`` on the host to ``remote_host:remote_port`` as the guest
    sees it, over the connection, for the ``with`` block (Ctrl-C safe).

    The listening socket is bound in the constructor, so a taken port fails before anything starts.
    """

    def __init__(
        self,
        conn: "Connection",
        local_port: int,
        remote_port: Optional[int] = None,
        remote_host: str = LOOPBACK,
        local_host: str = LOOPBACK,
        sock: Optional[socket.socket] = None,
    ):
        self.conn = conn
        self.local_port = local_port
        self.remote_port = remote_port or local_port
        self.remote_host = remote_host
        self.listener = sock if sock is not None else bind_local(local_port, local_host)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._open: set = set()

    def __enter__(self) -> "Forward":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        thread = threading.Thread(target=self._accept_loop, name="forward-accept", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            items = list(self._open)
        for item in items:
            with contextlib.suppress(Exception):
                item.close()
        for thread in self._threads:
            thread.join(timeout=2)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.listener], [], [], 0.2)
            except (OSError, ValueError):
                return
            if not ready:
                continue
            try:
                client, peer = self.listener.accept()
            except OSError:
                continue
            thread = threading.Thread(target=self._serve, args=(client, peer), daemon=True)
            thread.start()

    def _serve(self, client: socket.socket, peer) -> None:
        transport = self.conn.client.get_transport()
        try:
            chan = transport.open_channel(
                "direct-tcpip", (self.remote_host, self.remote_port), peer, timeout=10
            )
        except Exception:
            client.close()  # nothing listens in the guest yet: refuse like a closed port
            return
        with self._lock:
            self._open.update((client, chan))
        try:
            client_open = chan_open = True
            while (client_open or chan_open) and not self._stop.is_set():
                watch = [s for s, is_open in ((client, client_open), (chan, chan_open)) if is_open]
                ready, _, _ = select.select(watch, [], [], 0.5)
                if client in ready:
                    data = client.recv(1 << 16)
                    if data:
                        chan.sendall(data)
                    else:
                        client_open = False
                        chan.shutdown_write()
                if chan in ready:
                    data = chan.recv(1 << 16)
                    if data:
                        client.sendall(data)
                    else:
                        chan_open = False
                        client.shutdown(socket.SHUT_WR)
        except (OSError, EOFError):
            pass
        finally:
            with self._lock:
                self._open.discard(client)
                self._open.discard(chan)
            with contextlib.suppress(Exception):
                chan.close()
            with contextlib.suppress(OSError):
                client.close()

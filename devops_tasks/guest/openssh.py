"""The OpenSSH client: the one definition of how the host talks OpenSSH to a guest (options,
target, argv), with the same policy as :func:`~.connection.connect`, and connection multiplexing.

:func:`ssh_argv` is used for ``shell`` and ``claude``: OpenSSH gives the interactive terminal
(resize, Ctrl-C, Ctrl-D, ``~.``) exactly as ``ssh`` does, and its connection multiplexing makes
``devops shell -- CMD`` cheaper than a plain ``ssh`` (see :func:`control_path`).
:func:`run_foreground` runs it attached to this terminal.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import stat
import subprocess
import threading
from pathlib import Path
from typing import Optional, Sequence

from ..errors import GuestError
from ..signals import signal_handlers
from .commands import quote_words
from .connection import CONNECT_TIMEOUT, Target, agent_socket

CONTROL_PERSIST = 600  # seconds an idle OpenSSH master stays up (it dies with the VM anyway)


def control_path(target: Target) -> Optional[Path]:
    """The OpenSSH master socket for this VM, or None when no safe place exists.

    A master (``ControlMaster=auto``, ``ControlPersist``) keeps one authenticated connection per VM
    open, so each later ``shell -- CMD`` opens a channel on it instead of a new TCP + key exchange
    (Lima does the same). It dies with the VM, whose QEMU holds the TCP connection's other end.
    A master never forwards the agent (see :func:`ssh_options`).
    The socket lives in a private folder with a short name (a Unix socket path has ~100 bytes).
    """
    if os.environ.get("CORE_SSH_MULTIPLEX", "1").strip().lower() in ("0", "no", "false", "off"):
        return None
    key = f"{target.vm_dir or ''}|{target.known_hosts}|{target.host}|{target.port}|{target.user}"
    name = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".sock"
    # OpenSSH adds a 17-character suffix while it sets the master up; sun_path is 104-108 bytes.
    folder = runtime_folder(len(name) + 17)
    return folder / name if folder is not None else None


def runtime_folder(room: int = 40) -> Optional[Path]:
    """This user's private folder for sockets (``$XDG_RUNTIME_DIR`` or ``/tmp``, then
    ``devops-tasks-UID``, mode 0700) with ``room`` bytes left for a name in a socket path; None
    when there is none safe (someone else's or a loose folder is never used)."""
    for base in (os.environ.get("XDG_RUNTIME_DIR", ""), "/tmp"):
        folder = Path(base) / f"devops-tasks-{os.getuid()}" if base else None
        if folder is None or len(str(folder)) + 1 + room >= 100:
            continue
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            info = os.lstat(folder)
        except OSError:
            return None
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            return None
        return folder
    return None


def ssh_options(target: Target, forward_agent: bool = False, multiplex: bool = True,
                connect_timeout: float = CONNECT_TIMEOUT) -> list[str]:
    """How the host talks OpenSSH to a guest: the same policy as :func:`connect`.

    Strict host-key checking against the tool's known_hosts only (never updated from the server),
    the tool's login key only (no agent keys, no ``~/.ssh``), no user or system ssh_config, no
    passwords, and the agent forwarded only when asked.
    """
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
        "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
        "-o", "ServerAliveInterval=15",
        "-o", "LogLevel=ERROR",
        "-p", str(target.port),
    ]
    # A connection that forwards the agent is never shared or kept: the guest's root owns the
    # server end and may open agent channels at any time, so the connection (and with it the
    # agent) must end with the command that asked for it.
    control = control_path(target) if multiplex and not forward_agent else None
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
    connect_timeout: float = CONNECT_TIMEOUT,
    cwd: str = "",
) -> list[str]:
    """The ``ssh`` argv for a login shell (no ``command``) or for running ``command``'s words.

    The words are joined with :func:`shlex.join`, so the guest's shell splits them back into
    exactly these words: spaces, quotes, ``$`` and globs arrive as typed. ``tty`` None is ssh's
    own rule (a pty for a login shell on a terminal, none for a command). The agent is forwarded
    only when asked and a local agent exists. ``cwd``: the command (or the login shell, then
    ``$SHELL -l``) starts in that guest folder; give ``tty`` then, as there is always a command.
    """
    agent = bool(forward_agent and agent_socket() is not None)
    argv = [ssh, *ssh_options(target, forward_agent=agent, multiplex=multiplex, connect_timeout=connect_timeout)]
    line = quote_words(command) if command else ""
    if cwd:
        line = f"cd {shlex.quote(cwd)} && " + (line or 'exec "${SHELL:-/bin/sh}" -l')
    if tty is True:
        argv.append("-tt" if line else "-t")
    elif tty is False:
        argv.append("-T")
    argv.append(f"{target.user}@{target.host}")
    if line:
        argv += ["--", line]
    return argv


def close_master(target: Target) -> None:
    """Ask this VM's OpenSSH master to exit."""
    control = control_path(target)
    if control is not None and control.exists():
        argv = ["ssh", "-F", "/dev/null", "-o", f"ControlPath={control}", "-p", str(target.port),
                "-O", "exit", f"{target.user}@{target.host}"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)


def run_foreground(argv: Sequence[str], terminate_grace: Optional[float] = None,
                   timeout: Optional[float] = None) -> int:
    """Run a program attached to this terminal and return its exit status, as a shell would.

    While it runs, SIGINT and SIGQUIT are ignored here: Ctrl-C belongs to the program (ssh puts the
    terminal in raw mode and passes it on; without a terminal ssh itself gets the signal).
    ``terminate_grace``: when the wait here is interrupted (e.g. KeyboardInterrupt from
    ``signals.stop_as_interrupt``), end the program too (TERM, then KILL after that many seconds)
    before the exception goes on; None leaves it running. ``timeout``: after that many seconds the
    program is ended the same way and :class:`subprocess.TimeoutExpired` is raised.
    """
    if shutil.which(argv[0]) is None:
        raise GuestError(f"{argv[0]} not found (install openssh-client)")
    in_main = threading.current_thread() is threading.main_thread()

    def restore_child() -> None:  # the child gets default dispositions back
        for sig in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)

    proc = None
    with signal_handlers(("SIGINT", "SIGQUIT"), signal.SIG_IGN):
        try:
            proc = subprocess.Popen(list(argv), preexec_fn=restore_child if in_main else None)
            code = proc.wait(timeout=timeout)
        except BaseException as exc:
            if isinstance(exc, subprocess.TimeoutExpired) and terminate_grace is None:
                terminate_grace = 5.0
            if terminate_grace is not None and proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=terminate_grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            raise
    if code < 0:  # killed by a signal: the shell's 128+N
        return 128 - code
    return code


# -- a config block for other OpenSSH users (ssh -F, scp, rsync, ~/.ssh/config, editors) -------


def config_value(value: object) -> str:
    """A path or word as an ssh_config argument: double-quoted, ``%`` doubled (``IdentityFile``
    and ``UserKnownHostsFile`` expand ``%`` tokens). A double quote or a line break cannot be
    written in ssh_config at all: refused."""
    text = str(value)
    if any(ch in text for ch in '"\n\r\0'):
        raise GuestError(f"{text!r} holds a double quote or a line break, which an OpenSSH config "
                         "cannot hold: use a CORE_HOME without them")
    return '"' + text.replace("%", "%%") + '"'


def config_block(alias: str, target: Target, comment: Sequence[str] = ()) -> str:
    """An OpenSSH ``Host`` block reaching ``target`` as ``alias`` with the same policy as
    :func:`ssh_options`: strict host keys from ``target.known_hosts`` only, the tool's key only,
    no passwords, no agent forwarding (add ``-A`` on the command line for one session)."""
    if not alias or any(ch.isspace() or ch in '*?!,"#' for ch in alias):
        raise GuestError(f"{alias!r} cannot be an OpenSSH Host name")
    lines = [f"# {line}" for line in comment]
    lines += [
        f"Host {alias}",
        f"    HostName {target.host}",
        f"    Port {int(target.port)}",
        f"    User {target.user}",
        f"    IdentityFile {config_value(target.identity)}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {config_value(target.known_hosts)}",
        "    GlobalKnownHostsFile /dev/null",
        "    StrictHostKeyChecking yes",
        "    UpdateHostKeys no",
        "    CheckHostIP no",
        "    PasswordAuthentication no",
        "    KbdInteractiveAuthentication no",
        "    ForwardAgent no",
        f"    ConnectTimeout {int(CONNECT_TIMEOUT)}",
        "    ServerAliveInterval 15",
        "    LogLevel ERROR",
    ]
    return "\n".join(lines) + "\n"

"""The guest part: SSH to a running VM. Knows nothing about QEMU.

One concern a module; every public name is re-exported here, so callers write ``guest.X``:

* :mod:`.connection`: :class:`Target` and :func:`connect`, the one (strict) factory for Fabric
  connections to a VM.
* :mod:`.commands`: :func:`run` and :func:`capture` run shell commands in the guest; Ctrl-C and
  lost clients end the command's process tree there.
* :mod:`.openssh`: :func:`ssh_argv`, the same policy for OpenSSH (``shell``, ``claude``), with
  connection multiplexing, :func:`run_foreground`, and :func:`config_block` (that policy as an
  ssh_config ``Host`` block for ``ssh -F``, scp, rsync and editors).
* :mod:`.transfer`: :func:`copy_to_guest` and :func:`copy_from_guest` (a tar stream over SSH).
* :mod:`.sftp_server`: the host's ``sftp-server`` and the bubblewrap sandbox that confines it to
  the project.
* :mod:`.mount`: :class:`Mount`, a host folder in the guest (reverse SSHFS).
* :mod:`.virtiofs`: :class:`VirtiofsMount`, the project over virtiofs, hot-plugged per command.
* :mod:`.mounts`: :func:`open_mount`, the one factory that picks virtiofs or sshfs.
* :mod:`.forward`: :class:`Forward`, 127.0.0.1:PORT on the host to a port in the guest.

A test that replaces a module-level name must patch the module that looks it up (e.g.
``guest.sftp_server.find_bwrap``), not this package. Fabric and Paramiko are imported inside
functions so ``import devops_tasks`` stays fast.
"""

from .commands import (
    capture,
    env_exports,
    kill_remote,
    kill_script,
    quote_words,
    run,
    signal_handlers,
    stdin_interactive,
    wrap_command,
)
from .connection import CONNECT_TIMEOUT, GUEST_USER, LOOPBACK, Target, agent_socket, check_target, connect, session
from .forward import Forward, bind_local
from .mount import GUEST_APP_DIR, MOUNT_TIMEOUT, SSHFS_OPTIONS, Mount, fsname_for, mount_script, unmount_script
from .mounts import ProjectMount, open_mount
from .virtiofs import VirtiofsMount, VirtiofsUnavailable, find_virtiofsd, seccomp_program
from .openssh import (CONTROL_PERSIST, close_master, config_block, config_value, control_path, run_foreground,
                      ssh_argv, ssh_options)
from .sftp_server import (
    CONFINE_MODES,
    SFTP_SERVER_CANDIDATES,
    SftpServerCommand,
    confine_mode,
    find_bwrap,
    find_sftp_server,
    sftp_server_command,
)
from .transfer import CopyResult, CopySpec, copy_from_guest, copy_to_guest, parse_copy

__all__ = [
    "ProjectMount",
    "VirtiofsMount",
    "VirtiofsUnavailable",
    "find_virtiofsd",
    "open_mount",
    "seccomp_program",
    "CONFINE_MODES",
    "CONNECT_TIMEOUT",
    "CONTROL_PERSIST",
    "CopyResult",
    "CopySpec",
    "Forward",
    "GUEST_APP_DIR",
    "GUEST_USER",
    "LOOPBACK",
    "MOUNT_TIMEOUT",
    "Mount",
    "SFTP_SERVER_CANDIDATES",
    "SSHFS_OPTIONS",
    "SftpServerCommand",
    "Target",
    "agent_socket",
    "bind_local",
    "capture",
    "check_target",
    "close_master",
    "config_block",
    "config_value",
    "confine_mode",
    "connect",
    "control_path",
    "copy_from_guest",
    "copy_to_guest",
    "env_exports",
    "find_bwrap",
    "find_sftp_server",
    "fsname_for",
    "kill_remote",
    "kill_script",
    "mount_script",
    "parse_copy",
    "quote_words",
    "run",
    "run_foreground",
    "session",
    "sftp_server_command",
    "signal_handlers",
    "ssh_argv",
    "ssh_options",
    "stdin_interactive",
    "unmount_script",
    "wrap_command",
]

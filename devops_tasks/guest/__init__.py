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
* :mod:`.mux`: :class:`MuxSession`, commands and channels over the VM's OpenSSH master (no
  Paramiko), and :func:`openssh_session`, used where start-up time counts (``test``, ``shell``).
* :mod:`.mount`: :class:`Mount`, a host folder in the guest (reverse SSHFS).
* :mod:`.virtiofs`: :class:`VirtiofsMount`, the project over virtiofs, hot-plugged per command.
* :mod:`.mounts`: :func:`open_mount`, the one factory that picks virtiofs or sshfs.
* :mod:`.forward`: :class:`Forward`, 127.0.0.1:PORT on the host to a port in the guest.

A test that replaces a module-level name must patch the module that looks it up (e.g.
``guest.sftp_server.find_bwrap``), not this package. Fabric and Paramiko are imported inside
functions so ``import devops_tasks`` stays fast, and each name here is imported on first use
(:data:`_EXPORTS`), so a caller that needs one module (``hostkeys`` its loopback address,
``vm.status`` nothing of SSH) does not load the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

# each module of this package and the public names it defines
_MODULES = {
    "commands": (
        "capture", "env_exports", "kill_remote", "kill_script", "quote_words", "run", "signal_handlers",
        "stdin_interactive", "wrap_command",
    ),
    "connection": (
        "CONNECT_TIMEOUT", "GUEST_USER", "LOOPBACK", "Target", "agent_socket", "check_target", "connect", "session",
    ),
    "forward": ("Forward", "bind_local"),
    "mux": ("MuxSession", "openssh_session"),
    "mounts": ("ProjectMount", "open_mount"),
    "virtiofs": ("VirtiofsMount", "VirtiofsUnavailable", "find_virtiofsd", "seccomp_program"),
    "mount": (
        "GUEST_APP_DIR", "MOUNT_TIMEOUT", "SSHFS_OPTIONS", "Mount", "fsname_for", "mount_script", "unmount_script",
    ),
    "openssh": (
        "CONTROL_PERSIST", "close_master", "config_block", "config_value", "control_path", "run_foreground",
        "ssh_argv", "ssh_options",
    ),
    "sftp_server": (
        "CONFINE_MODES", "SFTP_SERVER_CANDIDATES", "SftpServerCommand", "confine_mode", "find_bwrap",
        "find_sftp_server", "sftp_server_command",
    ),
    "transfer": ("CopyResult", "CopySpec", "copy_from_guest", "copy_to_guest", "parse_copy"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
_SUBMODULES = frozenset({*_MODULES, "sftp_filter"})

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """``guest.X``: the name from its module, or a submodule (``guest.sftp_server``), imported now."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})

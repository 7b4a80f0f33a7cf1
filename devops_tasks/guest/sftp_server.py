"""The host's ``sftp-server`` that serves the project to the guest's sshfs, and its confinement.

``sftp-server -d DIR`` alone would let whoever speaks SFTP on the mount channel reach every host
file this user can, so :func:`sftp_server_command` runs it in a bubblewrap sandbox that sees only
the project (``confine``: see :func:`confine_mode`). The one place that decides how the server runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..errors import GuestError

SFTP_SERVER_CANDIDATES = (
    "/usr/lib/openssh/sftp-server",  # Debian, Ubuntu
    "/usr/libexec/openssh/sftp-server",  # Fedora, RHEL
    "/usr/libexec/sftp-server",  # macOS, Alpine
    "/usr/lib/ssh/sftp-server",  # Arch
    "/usr/lib/sftp-server",
    "/usr/local/libexec/sftp-server",
    "/opt/homebrew/libexec/sftp-server",
)


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
    read_only: Sequence[str] = (),
) -> SftpServerCommand:
    """The command that serves ``host_dir`` to the guest's sshfs over stdin/stdout.

    ``sftp-server -d DIR`` only sets the starting directory: whoever speaks SFTP on the channel
    (the guest is root in the VM, and ``inv claude`` runs an agent there) could read and write
    every host file this user can, and a symlink in the project to a file outside is followed. So
    the server runs in a bubblewrap sandbox whose file system is the project (read-write, at its
    real path, so the guest's ``sshfs :`` path stays the same), /usr and the loader paths
    read-only, a minimal read-only /dev, and an /etc holding only a one-user passwd and group file; no
    network, no other processes, no capabilities (also as root), no environment, its own session.

    ``confine`` (see :func:`confine_mode`): without a working ``bwrap`` ``auto`` falls back to the
    plain server with a one-line warning on stderr, ``require`` raises :class:`GuestError`.
    ``read_only``: paths in the project (``.git``) the sandbox binds read-only over the project, so
    no request reaches them for writing, whatever path or symlink it names; unconfined, that
    cannot hold (a warning says so).
    The one place that decides how the server runs: :class:`Mount` uses it, callers only ask.
    """
    environ = os.environ if environ is None else environ
    server = server or find_sftp_server(environ)
    host_dir = Path(host_dir)
    start_dir = str(host_dir).replace("%", "%%")  # sftp-server expands %d and %u
    plain = SftpServerCommand((server, "-e", "-d", start_dir), confined=False)
    mode = confine_mode(confine, environ)
    protected = _read_only_paths(host_dir, read_only)
    if mode == "off":
        _warn_writable(protected)
        return plain
    bwrap = find_bwrap(environ)
    if host_dir == Path("/"):  # it would hold the sandbox's own /etc and /dev: nothing to confine
        problem, fix = "the project is / (the whole file system)", "mount a project folder"
    elif bwrap is None:
        problem, fix = "bubblewrap (bwrap) is not installed", _BWRAP_FIX
    else:
        command = _bwrap_command(bwrap, host_dir, server, start_dir, protected)
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
    _warn(warning)
    _warn_writable(protected)
    return plain


def _warn(warning: str) -> None:
    if warning not in _warned:
        _warned.add(warning)
        print(warning, file=sys.stderr, flush=True)


def _warn_writable(protected: Sequence[str]) -> None:
    if protected:
        _warn(f"warning: the mount is unconfined, so {', '.join(protected)} in the project is writable from the VM")


def _read_only_paths(host_dir: Path, read_only: Sequence[str]) -> list[str]:
    """The existing ``read_only`` paths of the project, as absolute paths; a symlink is refused
    (the sandbox would bind where it points)."""
    found = []
    for rel in read_only:
        path = os.path.join(str(host_dir), rel)
        if os.path.islink(path):
            raise GuestError(f"cannot keep {path} read-only in the mount: it is a symlink")
        if os.path.exists(path):
            found.append(path)
    return found


def _bwrap_command(bwrap: str, host_dir: Path, server: str, start_dir: str,
                   read_only: Sequence[str] = ()) -> SftpServerCommand:
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
    argv += ["--remount-ro", "/dev"]  # a tmpfs: written to, it would fill this machine's memory
    real_server = os.path.realpath(server)
    if not any(real_server.startswith(prefix + "/") for prefix in bound):
        argv += ["--ro-bind", real_server, real_server]
    project = str(host_dir)
    argv += ["--bind", project, project]  # a project under /usr is writable
    for path in read_only:  # over the project: .git takes no writes, through any name
        argv += ["--ro-bind", path, path]
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

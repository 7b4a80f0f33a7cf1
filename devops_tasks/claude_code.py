"""``claude``: Claude Code in a :class:`~.lifecycle.VM`, with exactly the credentials asked for.

People run a coding agent in a VM so it can do what it likes to the VM and nothing else, so what
reaches the guest is exactly what was asked for, and the printed ``Auth forwarded:`` line is the
truth:

* ``ssh``: agent forwarding for this session only (and only when the host has an agent).
* ``gh``: the host's ``~/.config/gh`` (symlinked files followed, as dotfile managers make them)
  copied to the guest's tmpfs, ``GH_CONFIG_DIR`` pointing at it, as a tar stream on an SSH
  channel's stdin: never on the VM's disk, whose freed blocks a later run could read back.
* ``anthropic``: ``ANTHROPIC_API_KEY`` and/or ``CLAUDE_CODE_OAUTH_TOKEN`` (a subscription's token),
  and ``ANTHROPIC_BASE_URL`` when the host sets one; ``git``: ``GIT_AUTHOR_*``/``GIT_COMMITTER_*`` from the host's
  ``git config user.name/user.email``. These reach the environment of the claude process only.

Secrets never travel in an argv (the host's ``ssh`` command line and the guest's ``sh -c`` line are
visible in ``ps``): the values go over an SSH channel's stdin into a mode-600 file on the guest's
tmpfs (``/run``), which the wrapper sources and deletes before it ``exec``s claude. The whole
tmpfs folder is removed after the run on every exit path and at the start of the next one, and one
claude session runs per VM at a time (a lock in the VM's folder), so runs never share or delete
each other's credentials. Nothing here prints or logs a value.

The session itself is OpenSSH (like ``shell``): a real terminal (``-t``) when stdin and stdout are
terminals, otherwise a non-interactive run.

The agent works on a copy of the project at ``/app`` (:class:`.review.ProjectCopy`): the host
project is not writable from the VM, and what the agent changed comes back as a review that
reaches the project only when the user applies it (asked on a terminal). ``--live`` mounts the
project at ``/app`` instead, for as long as claude runs, with ``.git`` read-only through the mount.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shlex
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from . import egress, guest, review
from .errors import DevopsError, GuestError
from .fsutil import try_file_lock
from .lifecycle import VM
from .options import ClaudeOptions
from .project import GUEST_APP_DIR, project_root
from .signals import INTERRUPTED, stop_as_interrupt

if TYPE_CHECKING:  # pragma: no cover
    from fabric import Connection

AUTH_KINDS = ("ssh", "gh", "anthropic", "git")
LABELS = {"ssh": "SSH agent", "gh": "gh", "anthropic": "anthropic", "git": "git"}

GUEST_SECRETS_DIR = "/run/devops-tasks-claude"  # tmpfs in the guest: never on the VM's disk
GUEST_GH_DIR = f"{GUEST_SECRETS_DIR}/gh"
NOT_INSTALLED_STATUS = 42
MOUNT_CONFINE = "require"  # the project mount's sftp-server must be sandboxed (guest.confine_mode)
LIVE_READ_ONLY = (".git",)  # --live: git's config and hooks run on the host, so the mount cannot write them

AGENT_USER = "dev"  # the guest's unprivileged user (every recipe has it): claude never runs as root
ANTHROPIC_VARS = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_BASE_URL")
TIMED_OUT = 124  # what coreutils' timeout returns
# Claude Code's version is the image's: no self-update, no traffic the run does not need.
RUN_ENV = {"DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}

NOT_INSTALLED = (
    "claude is not installed in the VM image: build the image with Claude Code "
    "('inv image.build --recipe claude', or images.build.recipe: claude in ~/.core/config.yaml)"
)

GitConfigReader = Callable[[str], str]


class AuthError(DevopsError):
    """Bad ``--auth`` input."""


class SessionBusyError(DevopsError):
    """Another claude session holds the VM."""


# --------------------------------------------------------------------------- pure part


def split_auth(values: Iterable[str] | str | None) -> list[str]:
    """``--auth`` values (the flag repeated, each maybe a comma list) → kind words, in order."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    words: list[str] = []
    for value in values:
        for word in str(value).split(","):
            word = word.strip().lower()
            if word:
                words.append(word)
    return words


def resolve_auth(opts: ClaudeOptions) -> list[str]:
    """The kinds to forward, in :data:`AUTH_KINDS` order: all by default, none with ``no_auth``.

    An unknown kind is an error naming the valid ones; ``no_auth`` with ``auth`` is a contradiction.
    """
    words = split_auth(opts.auth)
    unknown = [w for w in words if w not in AUTH_KINDS]
    if unknown:
        raise AuthError(
            f"unknown auth kind{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(w) for w in dict.fromkeys(unknown))} (valid: {', '.join(AUTH_KINDS)})"
        )
    if opts.no_auth:
        if words:
            raise AuthError("--no-auth forwards nothing: do not combine it with --auth")
        return []
    if not words:
        return list(AUTH_KINDS)
    return [kind for kind in AUTH_KINDS if kind in words]


@dataclass
class Credentials:
    """What one run forwards. ``env`` holds secrets: never print it or put it in an argv."""

    kinds: list[str] = field(default_factory=list)  # forwarded, AUTH_KINDS order
    env: dict[str, str] = field(default_factory=dict, repr=False)
    gh_tar: bytes = field(default=b"", repr=False)  # the gh config as a tar stream (empty: none)
    agent: bool = False
    notes: list[str] = field(default_factory=list)  # one per requested kind the host had nothing for

    def summary(self) -> str:
        return "Auth forwarded: " + (", ".join(LABELS[k] for k in self.kinds) or "(none)")


def host_git_config(key: str, cwd: Optional[Path] = None) -> str:
    """``git config --get KEY`` on the host ("" when unset or git is missing)."""
    try:
        result = subprocess.run(
            ["git", "config", "--get", key], cwd=cwd, capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=15,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def gather_credentials(
    kinds: Sequence[str],
    environ: Mapping[str, str],
    home: Path,
    git_config_reader: GitConfigReader,
) -> Credentials:
    """Read on the host what ``kinds`` ask for; a kind the host has nothing for gets a note instead."""
    creds = Credentials()
    for kind in kinds:
        if kind == "ssh":
            if guest.agent_socket(environ) is not None:
                creds.agent = True
                creds.kinds.append(kind)
            else:
                creds.notes.append("SSH agent: no agent on this machine (SSH_AUTH_SOCK is not a socket)")
        elif kind == "gh":
            folder = Path(home) / ".config" / "gh"
            data, files = gh_tar(folder) if folder.is_dir() else (b"", 0)
            if files:
                creds.gh_tar = data
                creds.kinds.append(kind)
            else:
                creds.notes.append(f"gh: no gh config on this machine ({folder})")
        elif kind == "anthropic":
            found = {name: environ[name] for name in ANTHROPIC_VARS if environ.get(name)}
            if "ANTHROPIC_API_KEY" in found or "CLAUDE_CODE_OAUTH_TOKEN" in found:
                creds.env.update(found)
                creds.kinds.append(kind)
            else:
                creds.notes.append("anthropic: neither ANTHROPIC_API_KEY nor CLAUDE_CODE_OAUTH_TOKEN is set")
        elif kind == "git":
            name = git_config_reader("user.name")
            email = git_config_reader("user.email")
            if name:
                creds.env["GIT_AUTHOR_NAME"] = creds.env["GIT_COMMITTER_NAME"] = name
            if email:
                creds.env["GIT_AUTHOR_EMAIL"] = creds.env["GIT_COMMITTER_EMAIL"] = email
            if name or email:
                creds.kinds.append(kind)
            else:
                creds.notes.append("git: no user.name or user.email in the host's git config")
        else:  # pragma: no cover - resolve_auth validated
            raise AuthError(f"unknown auth kind {kind!r} (valid: {', '.join(AUTH_KINDS)})")
    return creds


def env_file_text(env: Mapping[str, str]) -> str:
    """``export NAME='value'`` lines for ``.`` in the guest's sh (values shell-quoted)."""
    lines = []
    for key, value in env.items():
        if not key.isidentifier() or not key.isascii():
            raise GuestError(f"invalid environment variable name {key!r}")
        if "\0" in value:
            raise GuestError(f"the value of {key} holds a NUL byte and cannot be forwarded")
        lines.append(f"export {key}={shlex.quote(value)}")
    return "".join(line + "\n" for line in lines)


def gh_tar(folder: Path) -> tuple[bytes, int]:
    """``folder`` as a tar stream whose entries are ``gh/...`` owned by root, modes kept; and the
    number of files in it.

    Symlinks are followed (dotfile managers link ``hosts.yml`` into place) and stored as the
    regular files or folders they point at; a folder reached twice is stored once, and anything
    that is neither is left out.
    """
    buffer = io.BytesIO()
    files = 0
    seen: set[tuple[int, int]] = set()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(path: Path, arcname: str) -> None:
            nonlocal files
            try:
                info = os.stat(path)
            except FileNotFoundError:  # a dangling link
                return
            entry = tarfile.TarInfo(arcname)
            entry.mode = stat.S_IMODE(info.st_mode)
            entry.mtime = int(info.st_mtime)
            entry.uid = entry.gid = 0
            entry.uname = entry.gname = "root"
            if stat.S_ISDIR(info.st_mode):
                if (info.st_dev, info.st_ino) in seen:
                    return
                seen.add((info.st_dev, info.st_ino))
                entry.type = tarfile.DIRTYPE
                tar.addfile(entry)
                for child in sorted(os.listdir(path)):
                    add(path / child, f"{arcname}/{child}")
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    data = handle.read()
                entry.size = len(data)
                tar.addfile(entry, io.BytesIO(data))
                files += 1

        try:
            add(Path(folder), "gh")
        except OSError as exc:
            raise GuestError(f"cannot read {exc.filename or folder}: {exc.strerror or exc}") from None
    return buffer.getvalue(), files


def claude_words(model: str = "", args: Sequence[str] = ()) -> list[str]:
    """``claude [--model M] ARGS...``: each word reaches claude intact."""
    words = ["claude"]
    if model:
        words += ["--model", model]
    return words + [str(word) for word in args]


def wrapper_script(env_file: str, model: str = "", workdir: str = GUEST_APP_DIR, gh: bool = False,
                   args: Sequence[str] = (), user: str = AGENT_USER) -> str:
    """The guest ``sh`` script, run as root: load and delete the env file (when given), point gh at
    its copy on tmpfs (``gh``), hand the session's agent socket and terminal to ``user``, cd, and
    exec claude as ``user`` (busybox ``su`` keeps the environment and sets HOME to theirs).

    Holds the file's name, never a value. ``user`` empty runs claude as root.
    """
    lines = []
    if gh:
        lines.append(f"export GH_CONFIG_DIR={shlex.quote(GUEST_GH_DIR)}")
    if env_file:
        f = shlex.quote(env_file)
        lines.append(f"if [ -f {f} ]; then . {f}; rm -f {f}; fi")
    lines += [f"export {key}={shlex.quote(value)}" for key, value in RUN_ENV.items()]
    lines.append(f"cd {shlex.quote(workdir)} || exit 1")
    words = claude_words(model, args)
    if not user:
        lines.append("exec " + shlex.join(words))
        return "\n".join(lines) + "\n"
    u = shlex.quote(user)
    lines += [
        f'[ -n "$SSH_AUTH_SOCK" ] && chown {u} "$SSH_AUTH_SOCK" "${{SSH_AUTH_SOCK%/*}}" 2>/dev/null',
        f't=$(tty 2>/dev/null) && chown {u} "$t" 2>/dev/null',
        # "--": without it busybox su takes claude's own options (--version) as its own
        f"exec su -s /bin/sh {u} -c 'exec \"$@\"' -- sh " + shlex.join(words),
    ]
    return "\n".join(lines) + "\n"


def prepare_script() -> str:
    """Guest script before a run: nothing of an earlier run lingers; is claude there?"""
    return cleanup_script() + f"command -v claude >/dev/null 2>&1 || exit {NOT_INSTALLED_STATUS}\n"


def cleanup_script(user: str = AGENT_USER) -> str:
    """Guest script after a run: nothing the agent started runs on (one session per VM: every
    process of ``user`` is the run's; the copy is read back only then), and every credential of it
    (all live in one tmpfs folder) is gone."""
    kill = f"su -s /bin/sh {shlex.quote(user)} -c 'kill -KILL -1' 2>/dev/null; " if user else ""
    return f"{kill}rm -rf {shlex.quote(GUEST_SECRETS_DIR)}\n"


# --------------------------------------------------------------------------- guest part


def run_session(argv: Sequence[str], grace: float = 5.0, timeout: Optional[float] = None) -> int:
    """``guest.run_foreground`` that also ends ssh when this process is told to stop or when
    ``timeout`` seconds have passed (then :data:`TIMED_OUT`).

    Ctrl-C belongs to claude (ssh passes it on); SIGTERM/SIGHUP here (KeyboardInterrupt, see
    ``signals.stop_as_interrupt``) end the ssh session too (TERM, then KILL after ``grace`` s), so
    claude never runs on in the VM after its mount and credentials are gone (the cleanup ends what
    it left in the guest).
    """
    try:
        return guest.run_foreground(argv, terminate_grace=grace, timeout=timeout)
    except subprocess.TimeoutExpired:
        return TIMED_OUT


def feed(conn: "Connection", command: str, data: bytes, timeout: float = 60.0) -> tuple[int, str]:
    """Run ``command`` in the guest with ``data`` on its stdin; (status, stderr).

    The data never appears in an argv, a log or a message.
    """
    transport = conn.client.get_transport()
    if transport is None:  # pragma: no cover - the session is open
        raise GuestError("the SSH connection to the VM is closed")
    chan = transport.open_session(timeout=timeout)
    try:
        chan.settimeout(timeout)
        chan.exec_command(command)
        chan.sendall(data)
        chan.shutdown_write()
        errors = b""
        while True:
            chunk = chan.recv_stderr(4096)
            if not chunk:
                break
            errors += chunk[: max(0, 2000 - len(errors))]
        while chan.recv(4096):
            pass
        code = chan.recv_exit_status()
    except OSError as exc:  # socket.timeout included
        raise GuestError(f"talking to the VM failed: {exc.strerror or exc or type(exc).__name__}") from None
    finally:
        chan.close()
    return code, errors.decode("utf-8", "replace").strip()


def install_gh(conn: "Connection", data: bytes) -> None:
    """Unpack the gh tar stream into :data:`GUEST_GH_DIR` (tmpfs)."""
    secrets_dir, gh, user = shlex.quote(GUEST_SECRETS_DIR), shlex.quote(GUEST_GH_DIR), shlex.quote(AGENT_USER)
    # the folder: traversable only; the gh copy: the agent user's alone
    command = (f"umask 077; mkdir -p {secrets_dir} && chmod 711 {secrets_dir} && tar -x -p -f - -C {secrets_dir}"
               f" && chown -R {user}:{user} {gh}")
    code, errors = feed(conn, command, data)
    if code != 0:
        raise GuestError(f"copying the gh config to {GUEST_GH_DIR} in the VM failed: {errors or f'status {code}'}")


def new_env_file() -> str:
    """A fresh name for the env file on the guest's tmpfs."""
    return f"{GUEST_SECRETS_DIR}/{secrets.token_hex(8)}.env"


def install_env(conn: "Connection", env: Mapping[str, str], path: str) -> None:
    """Write ``env`` to ``path``, a fresh mode-600 file on the guest's tmpfs."""
    command = (
        f"umask 077; mkdir -p {shlex.quote(GUEST_SECRETS_DIR)} && chmod 711 {shlex.quote(GUEST_SECRETS_DIR)}"
        f" && cat > {shlex.quote(path)}"
    )
    code, errors = feed(conn, command, env_file_text(env).encode("utf-8"))
    if code != 0:
        raise GuestError(f"passing the credentials to the VM failed: {errors or f'status {code}'}")


@contextlib.contextmanager
def one_session(vm: VM) -> Iterator[None]:
    """One claude session per VM at a time: they would share the guest's credential folder."""
    vm.dir.ensure()
    with try_file_lock(vm.dir.path / "claude.lock") as locked:
        if not locked:
            raise SessionBusyError(
                f"a claude session is already running on VM '{vm.name}' (one at a time: wait for it, "
                "or run this one in another VM with --vm NAME)")
        yield


def claude(
    vm: VM,
    project_dir: Path | str,
    opts: ClaudeOptions,
    environ: Optional[Mapping[str, str]] = None,
    home: Optional[Path] = None,
    git_config_reader: Optional[GitConfigReader] = None,
    interactive: Optional[bool] = None,
) -> int:
    """Run claude in the VM in ``/app`` (a copy of the project, or with ``live`` the project
    mounted) with the asked-for credentials; then offer the copy's changes as a review.

    Boots the VM when it is not running. Returns claude's exit status.
    """
    kinds = resolve_auth(opts)  # bad input fails before anything starts
    network = egress.check(vm, opts)  # restricted only, unless --network open
    root = project_root(project_dir)
    if opts.live:
        # The agent must not reach the host's files through the mount: no sandboxed sftp-server, no
        # claude (unless CORE_MOUNT_CONFINE=off), said before a VM is booted for nothing.
        guest.sftp_server_command(root, confine=MOUNT_CONFINE, read_only=LIVE_READ_ONLY)
    environ = os.environ if environ is None else environ
    home = Path(environ.get("HOME") or Path.home()) if home is None else Path(home)
    reader = git_config_reader or (lambda key: host_git_config(key, cwd=root))
    vm.ensure_running(network=network)
    creds = gather_credentials(kinds, environ, home, reader)
    where = vm.target()
    guest.check_target(where)
    tty = guest.stdin_interactive() if interactive is None else interactive
    copy = None if opts.live else review.ProjectCopy(root, vm.name, include_ignored=opts.include_ignored,
                                                      echo=vm.echo, guest_dir=GUEST_APP_DIR, agent_user=AGENT_USER,
                                                      target=where)
    code = run_in_vm(vm, root, opts, creds, where, tty, copy)
    notify(opts.notify, code, vm, root, bell=tty)
    if copy is not None and copy.review is not None:
        review.offer(copy.review, tty=tty and code != INTERRUPTED, echo=vm.echo)
    return code


def project_at_app(conn: "Connection", root: Path, copy: Optional["review.ProjectCopy"]):
    """The project at ``/app`` for the run: the copy (read back as a review once the agent's
    processes and credentials are gone), or with ``--live`` the mount, ``.git`` read-only."""
    if copy is None:
        return guest.Mount(conn, root, GUEST_APP_DIR, confine=MOUNT_CONFINE, read_only=LIVE_READ_ONLY)
    return copy.attached(conn, stop_agent=lambda: guest.capture(conn, cleanup_script(), timeout=15))


def run_in_vm(vm: VM, root: Path, opts: ClaudeOptions, creds: Credentials, where: guest.Target, tty: bool,
              copy: Optional["review.ProjectCopy"] = None) -> int:
    """The run itself: prepare the guest, put the project at /app, hand over the credentials, run
    claude, clean up (and read the copy back)."""
    try:
        with stop_as_interrupt(), one_session(vm), egress.proxy(vm, opts, creds.env) as net, \
                guest.session(where) as conn:
            try:
                code, _, _ = guest.capture(conn, prepare_script(), timeout=30)
                if code == NOT_INSTALLED_STATUS:
                    raise GuestError(NOT_INSTALLED)
                if code != 0:
                    raise GuestError(f"preparing the VM for claude failed (status {code})")
                with project_at_app(conn, root, copy):
                    if creds.gh_tar:
                        install_gh(conn, creds.gh_tar)
                    env = net.guest_env(creds.env)  # restricted: placeholders, the proxy adds the secrets
                    env_file = new_env_file() if env else ""
                    if env_file:
                        install_env(conn, env, env_file)
                    vm.echo(creds.summary())
                    for note in creds.notes:
                        vm.echo(f"Not forwarded: {note}")
                    script = wrapper_script(env_file, opts.model, gh=bool(creds.gh_tar), args=opts.args)
                    argv = guest.ssh_argv(where, ["sh", "-c", script], forward_agent=creds.agent, tty=tty)
                    code = run_session(argv, timeout=opts.timeout)
                    if code == TIMED_OUT:
                        vm.echo(f"claude ran out of time ({format_seconds(opts.timeout)}, --timeout)")
                    return code
            finally:
                with contextlib.suppress(Exception):
                    guest.capture(conn, cleanup_script(), timeout=15)
    except KeyboardInterrupt:
        vm.echo("Interrupted")
        return INTERRUPTED


def format_seconds(seconds: Optional[float]) -> str:
    seconds = int(seconds or 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n) or "0s"


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1h30m`` → seconds (> 0); a one-line error naming the value."""
    import re

    value = str(text).strip().lower()
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", value)
    if not value or match is None:
        raise DevopsError(f"--timeout {text!r} is not a duration (e.g. 90s, 30m, 1h30m)")
    hours, minutes, secs = (int(group or 0) for group in match.groups())
    total = hours * 3600 + minutes * 60 + secs
    if total <= 0:
        raise DevopsError(f"--timeout {text!r} must be longer than 0 seconds")
    return float(total)


def notify(command: str, code: int, vm: VM, project: Path, bell: bool) -> None:
    """Signal the end of a run on the host: the terminal bell, and the user's own ``--notify``
    command (run by ``sh -c`` with ``CLAUDE_EXIT_STATUS``, ``CLAUDE_VM`` and ``CLAUDE_PROJECT``)."""
    if bell:
        import sys

        sys.stderr.write("\a")
        sys.stderr.flush()
    if command:
        env = dict(os.environ, CLAUDE_EXIT_STATUS=str(code), CLAUDE_VM=vm.name, CLAUDE_PROJECT=str(project))
        try:
            subprocess.run(["sh", "-c", command], env=env, stdin=subprocess.DEVNULL, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            vm.echo(f"Warning: the --notify command failed: {exc}")

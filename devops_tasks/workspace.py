"""Working in the VM: ``shell``, ``test`` and ``serve`` (what :class:`DevOps` delegates to).

* ``shell`` runs OpenSSH in this terminal: it *is* ``ssh`` for the user (resize, Ctrl-C, Ctrl-D,
  ``~.``), and its multiplexed master connection makes ``shell -- CMD`` as quick as a plain ``ssh``.
* ``test`` and ``serve`` open one Fabric connection (:func:`guest.connect`), mount the project at
  ``/app`` over it (:class:`guest.Mount`), and run the command in the guest with its output streamed;
  ``serve`` also forwards ``127.0.0.1:PORT`` to the server for as long as it runs.

Each returns the guest command's exit status. Errors are :class:`DevopsError` subclasses.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ContextManager, Optional

from . import guest
from .errors import GuestError, NotRunningError, ProjectError
from .options import ServeOptions, ShellOptions, TestOptions

if TYPE_CHECKING:  # pragma: no cover
    from .devops import DevOps

NOT_RUNNING = "dev environment not running (run 'inv vm.boot' first)"
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C


# --------------------------------------------------------------------------- the VM's address


def target(devops: "DevOps") -> guest.Target:
    """The running VM's SSH target; :class:`NotRunningError` when it is not running.

    Adapter over the VM engineer's ``hostkeys.ssh_target`` (record + PID-safe liveness), adding
    the VM's folder so each VM gets its own OpenSSH master socket.
    """
    from . import hostkeys

    try:
        found = hostkeys.ssh_target(devops.name)
    except NotRunningError:
        raise NotRunningError(NOT_RUNNING) from None
    vm_dir: Optional[Path]
    try:
        from .machine.records import VMDir

        vm_dir = VMDir(devops.name).path
    except Exception:  # pragma: no cover - only names the control socket
        vm_dir = None
    return guest.Target(
        port=int(found.port),
        identity=Path(found.identity),
        known_hosts=Path(found.known_hosts),
        host=found.host,
        user=found.user,
        vm_dir=vm_dir,
    )


def stop_signals() -> ContextManager[None]:
    """SIGTERM and SIGHUP end ``test``/``serve`` the way Ctrl-C does (KeyboardInterrupt), so the
    guest command, the forward and the mount are cleaned up rather than left running."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return guest.signal_handlers(("SIGTERM", "SIGHUP"), interrupt)


# --------------------------------------------------------------------------- shell


def shell(devops: "DevOps", opts: ShellOptions) -> int:
    """An interactive login shell (no command) or ``opts.command`` run with its exit status.

    ``console`` attaches to the serial console instead (the VM part owns it).
    """
    if opts.console:
        if opts.command:
            raise GuestError("--console takes no command (the serial console is interactive)")
        devops.console()
        return 0
    where = target(devops)
    guest.check_target(where)
    argv = guest.ssh_argv(where, opts.command, forward_agent=opts.forward_agent)
    return guest.run_foreground(argv)


def fast_shell(argv: list[str]) -> Optional[int]:
    """``devops shell [--name N] [--no-agent] [-- CMD ...]`` without loading Invoke, or None.

    For the console program's entry point: ``shell -- CMD`` is mostly Python start-up, so the
    plain forms skip Invoke and its config layers (about 0.15-0.2 s of imports). Anything else
    (other tasks, ``--console``, help, Invoke's own flags or config files and ``INVOKE_*``
    variables that could change ``core.vm.name``) returns None: let Invoke handle it.
    """
    import os
    import sys

    if not argv or argv[0] not in ("shell", "shell.shell"):
        return None
    if any(key.startswith("INVOKE_") for key in os.environ):
        return None
    if any(os.path.exists(os.path.expanduser(f"{base}.{ext}")) for base in ("/etc/invoke", "~/.invoke")
           for ext in ("yaml", "yml", "json", "py")):
        return None
    words: list[str] = []
    rest = list(argv[1:])
    if "--" in rest:
        index = rest.index("--")
        rest, words = rest[:index], rest[index + 1:]
    name, agent = "", True
    while rest:
        flag = rest.pop(0)
        if flag == "--no-agent":
            agent = False
        elif flag in ("--name", "-n") and rest:
            name = rest.pop(0)
        elif flag.startswith("--name="):
            name = flag.split("=", 1)[1]
        else:
            return None
    from .errors import DevopsError

    try:
        if not name:
            from .config import load_config
            from .paths import config_path

            name = load_config().vm.name if config_path().exists() else "core-dev"
        from types import SimpleNamespace

        return shell(SimpleNamespace(name=name), ShellOptions(command=words, forward_agent=agent))
    except DevopsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------- test


def _project_dir(project_dir: Path | str) -> Path:
    path = Path(project_dir).expanduser()
    if not path.is_dir():
        raise ProjectError(f"project directory {path} does not exist")
    return path.resolve()


def test(devops: "DevOps", project_dir: Path | str, opts: TestOptions) -> int:
    """Run the project's tests in the VM, in ``/app`` with the project mounted; their exit status.

    The command: ``opts.command`` words > ``opts.name`` from ``.core/test.yaml`` > detection, with
    test.yaml's ``env`` applied (see :func:`project.resolve_test_command`).
    """
    from .project import GUEST_APP_DIR, resolve_test_command

    root = _project_dir(project_dir)
    command, env = resolve_test_command(root, opts.name, opts.command)
    where = target(devops)
    devops.echo(f"Running tests: {command}")
    try:
        with stop_signals(), guest.session(where) as conn, guest.Mount(conn, root, GUEST_APP_DIR):
            return guest.run(conn, command, cwd=GUEST_APP_DIR, env=env)
    except KeyboardInterrupt:
        devops.echo("Interrupted")
        return INTERRUPTED


test.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


# --------------------------------------------------------------------------- serve


def serve(devops: "DevOps", project_dir: Path | str, opts: ServeOptions) -> int:
    """Mount the project at ``/app``, run its dev server in ``/app/<path>`` and forward
    ``127.0.0.1:PORT`` to it until it ends or Ctrl-C; the server's exit status.

    The host port is claimed first, so a taken port fails before anything starts in the guest.
    ``PORT`` is set for the server (the npm and ``go run`` commands read it).
    """
    from .project import GUEST_APP_DIR, detect_serve_command, resolve_serve_dir

    root = _project_dir(project_dir)
    port = opts.port
    command = detect_serve_command(root, port)
    workdir = resolve_serve_dir(root, opts.path)
    where = target(devops)
    listener = guest.bind_local(port)
    try:
        with stop_signals(), guest.session(where) as conn, guest.Mount(conn, root, GUEST_APP_DIR), \
                guest.Forward(conn, port, sock=listener):
            listener = None  # the Forward owns it now
            devops.echo(f"Serving {workdir} with: {command}")
            devops.echo(f"http://localhost:{port}")
            return guest.run(conn, command, cwd=workdir, env={"PORT": str(port)})
    except KeyboardInterrupt:
        devops.echo("Stopped")
        return 0
    finally:
        if listener is not None:
            listener.close()

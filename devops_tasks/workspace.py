"""Working in a VM: ``shell``, ``test`` and ``serve``, each given the :class:`~.lifecycle.VM`.

* ``shell`` runs OpenSSH in this terminal: it *is* ``ssh`` for the user (resize, Ctrl-C, Ctrl-D,
  ``~.``), and its multiplexed master connection makes ``shell -- CMD`` as quick as a plain ``ssh``.
* ``test`` and ``serve`` open one Fabric connection (:func:`guest.session`), mount the project at
  ``/app`` over it (:class:`guest.Mount`), and run the command in the guest with its output streamed;
  ``serve`` also forwards ``127.0.0.1:PORT`` to the server for as long as it runs.

``test`` and ``serve`` boot the VM when it is not running (saying so). ``copy`` is ``vm.cp``.
Each returns the guest command's exit status. Errors are :class:`DevopsError` subclasses.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from . import dependencies, guest
from .errors import GuestError
from .lifecycle import VM
from .options import ServeOptions, ShellOptions, TestOptions
from .project import GUEST_APP_DIR, Fallback, is_project, project_root
from .signals import INTERRUPTED, stop_as_interrupt


def shell(vm: VM, opts: ShellOptions) -> int:
    """An interactive login shell (no command) or ``opts.command`` run with its exit status.

    In a project (:func:`shell_project`) the project is mounted at ``/app`` for as long as the shell
    runs (over a Fabric session of its own, confined as for ``test``) and the shell or command
    starts there. ``console`` attaches to the serial console instead.
    """
    if opts.console:
        if opts.command:
            raise GuestError("--console takes no command (the serial console is interactive)")
        vm.console()
        return 0
    root = shell_project(opts)
    where = vm.target()
    guest.check_target(where)
    if root is None:
        argv = guest.ssh_argv(where, opts.command, forward_agent=opts.forward_agent)
        return guest.run_foreground(argv)
    tty = None if opts.command else guest.stdin_interactive()
    argv = guest.ssh_argv(where, opts.command, forward_agent=opts.forward_agent, tty=tty, cwd=GUEST_APP_DIR)
    try:
        with stop_as_interrupt(), guest.openssh_session(where) as conn, _shell_mount(vm, conn, root):
            return guest.run_foreground(argv, terminate_grace=5.0)
    except KeyboardInterrupt:
        return INTERRUPTED


def project_mount(vm: VM, conn, root: Path) -> contextlib.AbstractContextManager:
    """The project at ``/app`` for a command, the way the VM was booted for (``vm.mount_type``:
    virtiofs hot-plugged for the command, or sshfs; :func:`guest.open_mount`): for the command
    alone, or with ``vm.mount_idle_timeout`` > 0 a lease on the VM's kept mount of it
    (:func:`mount_keeper.lease`), which outlives the command by that many idle seconds."""
    from . import mount_keeper

    how = mount_keeper.MountPlan(mount_type=vm.mount_type() or "sshfs",
                                 qmp_socket=vm.qmp_socket() if vm.mount_type() == "virtiofs" else "")
    idle = vm.config.vm.mount_idle_timeout
    if idle > 0:
        return mount_keeper.lease(vm.target(), root, idle, how)
    return _command_mount(vm, conn, root, how)


@contextlib.contextmanager
def _command_mount(vm: VM, conn, root: Path, how):
    """The mount for this command alone, announced for ``vm.status`` while it lives."""
    from . import mount_keeper

    with how.open(conn, root, GUEST_APP_DIR, note=vm.echo) as mount, mount_keeper.announced(vm.dir.path, root):
        yield mount


@contextlib.contextmanager
def _shell_mount(vm: VM, conn, root: Path):
    """The project at /app for a shell; a mount that fails says how to get a shell anyway."""
    mount = project_mount(vm, conn, root)
    try:
        mount.__enter__()
    except GuestError as exc:
        raise GuestError(f"{exc} (inv shell --no-mount gives a shell without it)") from None
    try:
        yield mount
    finally:
        mount.__exit__(None, None, None)


def shell_project(opts: ShellOptions) -> Path | None:
    """The folder ``shell`` mounts at ``/app``: ``opts.project``, else the current folder when it
    is a project (:func:`project.is_project`); None with ``mount`` off or outside a project."""
    if not opts.mount:
        if opts.project:
            raise GuestError("--project and --no-mount contradict each other")
        return None
    if opts.project:
        return project_root(opts.project)
    here = Path.cwd()
    return here.resolve() if is_project(here) else None


def copy(vm: VM, source: str, dest: str) -> guest.CopyResult:
    """``vm.cp``: copy a file or folder between this machine and the VM (the VM's side ``:PATH``)."""
    spec = guest.parse_copy(source, dest)
    where = vm.target()
    with guest.session(where) as conn:
        if spec.to_guest:
            return guest.copy_to_guest(conn, spec.source, spec.dest)
        return guest.copy_from_guest(conn, spec.source, spec.dest)


def test(vm: VM, project_dir: Path | str, opts: TestOptions) -> int:
    """Run the project's tests in the VM, in ``/app`` with the project mounted; their exit status.

    The command: ``opts.command`` words > ``opts.name`` from ``.core/test.yaml`` > detection, with
    test.yaml's ``env`` applied (see :func:`project.resolve_test_command`). The project's
    dependencies are installed first when needed (:mod:`.dependencies`). SIGTERM and SIGHUP end
    it as Ctrl-C does, so the guest command and the mount are cleaned up.
    """
    from .project import resolve_test_command, test_config_or_none, test_fallback

    root = project_root(project_dir)
    command, env = resolve_test_command(root, opts.name, opts.command)
    plan = dependencies.plan(root, test_config_or_none(root), command)
    fallback = None if opts.command else test_fallback(root, command)
    vm.ensure_running()
    where = vm.target()
    vm.echo(f"Running tests: {command}")
    try:
        with stop_as_interrupt(), guest.openssh_session(where) as conn, project_mount(vm, conn, root):
            command, code = _prepare(vm, conn, root, plan, command, fallback, opts.setup)
            if code:
                return code
            return guest.run(conn, command, cwd=GUEST_APP_DIR, env={**plan.env(), **env})
    except KeyboardInterrupt:
        vm.echo("Interrupted")
        return INTERRUPTED


def _prepare(vm: VM, conn, root: Path, plan: dependencies.Plan, command: str, fallback: Fallback | None,
             force: bool = False) -> tuple[str, int]:
    """Before the command: one look into the guest (which programs it has, which setup keys it
    kept), the fallback when the detected command's program is missing, then the setup steps that
    must run. -> (the command to run, 0) or (command, the failed step's exit status)."""
    if fallback is not None and not fallback.program:
        vm.echo(f"Note: {fallback.note}")
        command, fallback = fallback.command, None
    if not plan.steps and fallback is None:
        return command, 0
    status, out, err = guest.capture(conn, dependencies.probe_script(plan, [fallback.program] if fallback else []))
    if status != 0:
        raise GuestError(f"cannot inspect the guest before running the command: {err.strip() or status}")
    facts = dependencies.Facts.parse(out)
    if fallback is not None and fallback.program not in facts.have:
        vm.echo(f"Note: {fallback.note}")
        command = fallback.command
    for decision in dependencies.decide(root, plan, facts, force):
        if decision.message:
            vm.echo(decision.message)
        if decision.run:
            code = guest.run(conn, dependencies.run_script(decision.step, plan), cwd=GUEST_APP_DIR)
            if code:
                vm.echo(f"Installing dependencies failed (exit status {code}); the command did not run")
                return command, code
    return command, 0


test.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def serve(vm: VM, project_dir: Path | str, opts: ServeOptions) -> int:
    """Mount the project at ``/app``, run its dev server in ``/app/<path>`` and forward
    ``127.0.0.1:PORT`` to it until it ends or Ctrl-C; the server's exit status.

    The host port is claimed first, so a taken port fails before anything starts in the guest.
    ``PORT`` is set for the server (the npm and ``go run`` commands read it).
    """
    from .project import detect_serve_command, resolve_serve_dir, serve_fallback, test_config_or_none

    root = project_root(project_dir)
    port = opts.port
    command = detect_serve_command(root, port)
    workdir = resolve_serve_dir(root, opts.path)
    plan = dependencies.plan(root, test_config_or_none(root), command)
    fallback = serve_fallback(root, command, port)
    listener = guest.bind_local(port)  # a taken port fails before a VM is booted for nothing
    try:
        vm.ensure_running()
        where = vm.target()
        with stop_as_interrupt(), guest.session(where) as conn, project_mount(vm, conn, root), \
                guest.Forward(conn, port, sock=listener):
            listener = None  # the Forward owns it now
            command, code = _prepare(vm, conn, root, plan, command, fallback)
            if code:
                return code
            vm.echo(f"Serving {workdir} with: {command}")
            vm.echo(f"http://localhost:{port}")
            return guest.run(conn, command, cwd=workdir, env={**plan.env(), "PORT": str(port)})
    except KeyboardInterrupt:
        vm.echo("Stopped")
        return 0
    finally:
        if listener is not None:
            listener.close()

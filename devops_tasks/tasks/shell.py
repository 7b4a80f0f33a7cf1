"""The ``shell`` collection: ``inv shell`` (a login shell in the VM) or ``inv shell -- CMD ...``; in a project,
in ``/app`` with the project mounted."""

from invoke import Collection

from ..options import ShellOptions
from .common import configure, devops, exit_with, remainder_words, task


@task(
    default=True,
    help={
        "name": "VM name (default: core.vm.name, 'core-dev')",
        "console": "attach to the VM's serial console instead of SSH (detach with Ctrl-])",
        "no_agent": "do not forward the local SSH agent (forwarded by default when one runs)",
        "mount": "in a project, mount it at /app and start there (default); --no-mount: a plain shell",
        "project": "mount this project folder at /app (default: the current folder when it is a project)",
    },
)
def shell(c, name=None, console=False, no_agent=False, mount=True, project=None):
    """Open a shell in the VM (in /app, the project mounted), or run `-- CMD ...` there and exit with its status."""
    opts = ShellOptions(console=console, command=remainder_words(), forward_agent=not no_agent,
                        mount=bool(mount), project=project or "")
    exit_with(devops(c, name).shell(opts))


ns = configure(Collection("shell"))
ns.add_task(shell)

"""The ``claude`` collection: ``inv claude [--no-auth] [--auth KINDS] [--model M]``."""

from invoke import Collection

from ..options import ClaudeOptions
from .common import configure, devops, exit_with, task


@task(
    default=True,
    iterable=["auth"],
    help={
        "no_auth": "forward no credential at all (not even the SSH agent)",
        "auth": "forward only these: ssh, gh, anthropic, git (comma list or repeat the flag; default all)",
        "model": "the model claude uses (passed as --model)",
        "vm": "VM name (default: core.vm.name, 'core-dev')",
        "project": "project directory mounted at /app (default: the current directory)",
    },
)
def claude(c, no_auth=False, auth=None, model=None, vm=None, project=None):
    """Run Claude Code in the VM on the project, with only the credentials asked for."""
    from ..claude_code import split_auth  # here: every other task starts without it

    opts = ClaudeOptions(no_auth=no_auth, auth=split_auth(auth), model=model or "")
    exit_with(devops(c, vm).claude(project or ".", opts))


ns = configure(Collection("claude"))
ns.add_task(claude)

"""The ``claude`` collection: ``inv claude [--no-auth] [--auth KINDS] [--model M] [-- CLAUDE ARGS]``."""

from invoke import Collection

from ..options import ClaudeOptions
from .common import configure, devops, exit_with, remainder_words, task


@task(
    default=True,
    iterable=["auth"],
    help={
        "no_auth": "forward no credential at all (not even the SSH agent)",
        "auth": "forward only these: ssh, gh, anthropic, git (comma list or repeat the flag; default all)",
        "model": "the model claude uses (passed as --model)",
        "vm": "VM name (default: core.vm.name, 'core-dev')",
        "project": "project directory mounted at /app (default: the current directory)",
        "timeout": "end the run from the host after this long (90s, 30m, 1h30m); exit status 124",
        "notify": "a host command run when claude ends ($CLAUDE_EXIT_STATUS, $CLAUDE_VM, $CLAUDE_PROJECT)",
    },
)
def claude(c, no_auth=False, auth=None, model=None, vm=None, project=None, timeout=None, notify=None):
    """Run Claude Code in the VM on the project (`-- ARGS` go to claude intact), with only the credentials asked for."""
    from ..claude_code import parse_duration, split_auth  # here: inv --list and other tasks skip its imports

    opts = ClaudeOptions(no_auth=no_auth, auth=split_auth(auth), model=model or "", args=remainder_words(),
                         timeout=parse_duration(timeout) if timeout else None, notify=notify or "")
    exit_with(devops(c, vm).claude(project or ".", opts))


ns = configure(Collection("claude"))
ns.add_task(claude)

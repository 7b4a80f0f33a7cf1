"""The ``claude`` collection: ``inv claude [--no-auth] [--auth KINDS] [--model M] [--network open]
[--allow HOST[:PORT]] [-- CLAUDE ARGS]`` and ``inv claude.log``."""

import json as _json

from invoke import Collection

from ..options import ClaudeOptions
from .common import configure, devops, exit_with, remainder_words, task


@task(
    default=True,
    iterable=["auth", "allow"],
    help={
        "no_auth": "forward no credential at all (not even the SSH agent)",
        "auth": "forward only these: ssh, gh, anthropic, git (comma list or repeat the flag; default all)",
        "model": "the model claude uses (passed as --model)",
        "vm": "VM name (default: core.vm.name, 'core-dev')",
        "project": "project directory mounted at /app (default: the current directory)",
        "timeout": "end the run from the host after this long (90s, 30m, 1h30m); exit status 124",
        "notify": "a host command run when claude ends ($CLAUDE_EXIT_STATUS, $CLAUDE_VM, $CLAUDE_PROJECT)",
        "network": "open: also run on a VM with open networking (default: restricted only; a VM booted "
                   "for claude is restricted)",
        "allow": "HOST[:PORT] the restricted VM may reach through the proxy, besides core.claude.allow "
                 "(repeat the flag; *.domain for its subdomains)",
    },
)
def claude(c, no_auth=False, auth=None, model=None, vm=None, project=None, timeout=None, notify=None,
           network=None, allow=None):
    """Run Claude Code in the VM on the project (`-- ARGS` go to claude intact), with only the credentials asked for."""
    from ..claude_code import parse_duration, split_auth  # here: inv --list and other tasks skip its imports

    opts = ClaudeOptions(no_auth=no_auth, auth=split_auth(auth), model=model or "", args=remainder_words(),
                         timeout=parse_duration(timeout) if timeout else None, notify=notify or "",
                         network=network or "", allow=list(allow or []))
    exit_with(devops(c, vm).claude(project or ".", opts))


def event_line(event: dict) -> str:
    """``2026-01-01T10:00:00Z  deny   CONNECT evil.example:443  0 B  not on the allowlist ...``"""
    host = str(event.get("host", ""))
    where = (f"[{host}]:{event.get('port')}" if ":" in host else f"{host}:{event.get('port')}") if host else "-"
    return (f"{event.get('time', '')}  {str(event.get('decision', '')):<5}  {event.get('method') or '-'} {where}  "
            f"{event.get('bytes', 0)} B  {event.get('rule', '')}")


@task(help={
    "vm": "VM name (default: core.vm.name, 'core-dev')",
    "json": "print the log's JSON lines as they are",
    "blocked": "only what was refused or failed",
})
def log(c, vm=None, json=False, blocked=False):
    """Show the host proxy's log of a restricted VM: every request claude's VM made, allowed or not."""
    from ..egress import events

    for event in events(devops(c, vm).vm):
        if blocked and event.get("decision") == "allow":
            continue
        print(_json.dumps(event, sort_keys=True) if json else event_line(event))


ns = configure(Collection("claude"))
ns.add_task(claude)
ns.add_task(log)

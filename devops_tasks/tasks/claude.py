"""The ``claude`` collection: ``inv claude [--no-auth] [--auth KINDS] [--model M] [--network open]
[--allow HOST[:PORT]] [--live] [-- CLAUDE ARGS]`` (the default task), the reviews its runs leave
(``claude.diff``, ``claude.apply``, ``claude.discard``) and the proxy's log (``claude.log``)."""

import json as _json

from invoke import Collection

from ..options import ClaudeOptions
from .common import configure, devops, exit_with, remainder_words, task

REVIEW_HELP = "the review's id, or the start of it (default: the latest pending review of --project)"
PROJECT_HELP = "the project whose latest pending review is meant (default: the current directory)"


@task(
    default=True,
    iterable=["auth", "allow"],
    help={
        "no_auth": "forward no credential at all (not even the SSH agent)",
        "auth": "forward only these: ssh, gh, anthropic, git (comma list or repeat the flag; default all)",
        "model": "the model claude uses (passed as --model)",
        "vm": "VM name (default: core.vm.name, 'core-dev')",
        "project": "project directory copied to /app (default: the current directory)",
        "timeout": "end the run from the host after this long (90s, 30m, 1h30m); exit status 124",
        "notify": "a host command run when claude ends ($CLAUDE_EXIT_STATUS, $CLAUDE_VM, $CLAUDE_PROJECT)",
        "network": "open: also run on a VM with open networking (default: restricted only; a VM booted "
                   "for claude is restricted)",
        "allow": "HOST[:PORT] the restricted VM may reach through the proxy, besides core.claude.allow "
                 "(repeat the flag; *.domain for its subdomains)",
        "live": "mount the project at /app instead of copying it (writes reach it at once; .git stays read-only)",
        "include_ignored": "copy git-ignored files too (and review the ignored files the agent makes)",
    },
)
def claude(c, no_auth=False, auth=None, model=None, vm=None, project=None, timeout=None, notify=None,
           network=None, allow=None, live=False, include_ignored=False):
    """Run Claude Code in the VM on a copy of the project (`-- ARGS` go to claude intact); its changes become a review."""
    from ..claude_code import parse_duration, split_auth  # here: inv --list and other tasks skip its imports

    opts = ClaudeOptions(no_auth=no_auth, auth=split_auth(auth), model=model or "", args=remainder_words(),
                         timeout=parse_duration(timeout) if timeout else None, notify=notify or "",
                         network=network or "", allow=list(allow or []), live=live,
                         include_ignored=include_ignored)
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


def _find(review, project):
    from .. import review as reviews

    return reviews.find(reviews.all_reviews(), review or "", None if review else reviews.project_of(project))


@task(help={"review": REVIEW_HELP, "list": "list every review of every VM instead", "project": PROJECT_HELP})
def diff(c, review=None, list_=False, project=None):
    """Show a review of an agent's changes: its summary and patch (--list: all reviews)."""
    from .. import review as reviews

    if list_:
        for line in reviews.list_lines(reviews.all_reviews()):
            print(line)
        return
    reviews.show(_find(review, project), lambda line: print(line, flush=True))


@task(name="apply", help={"review": REVIEW_HELP, "project": PROJECT_HELP})
def apply_(c, review=None, project=None):
    """Apply a review to its project: all of it, or on a conflict with the host's own edits nothing."""
    from .. import review as reviews

    reviews.apply_and_report(_find(review, project), lambda line: print(line, flush=True))


@task(help={"review": REVIEW_HELP, "project": PROJECT_HELP})
def discard(c, review=None, project=None):
    """Drop a review (and its branch, unless it moved)."""
    from .. import review as reviews

    reviews.discard(_find(review, project), lambda line: print(line, flush=True))


ns = configure(Collection("claude"))
ns.add_task(claude)
ns.add_task(log)
ns.add_task(diff)
ns.add_task(apply_)
ns.add_task(discard)

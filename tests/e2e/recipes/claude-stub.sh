#!/bin/sh
# Stand-in for Claude Code in the e2e tests: records what it received, inside the guest, on tmpfs in
# /dev/shm/claude-stub.txt (written whole when the run ends; it runs as the agent user, not root).
# Plays the agent: when /app/.claude-stub-script exists it runs it with sh in /app (its output goes to
# /dev/shm/claude-stub-script.log, its status to the record's "script-rc:" line).
# When /app/.claude-stub-wait exists it then waits (up to 60 s) for /dev/shm/claude-stub-go (made by
# the test in the guest) or /app/.claude-stub-go (made on the host, seen through a --live mount), so
# the test can look at the host meanwhile.
# Exits with the number in /app/.claude-stub-exit when that exists, else 0.
# When /app/.claude-stub-run exists it runs it (sh, as the agent, with claude's environment) and
# records its output as run: lines.
out=/dev/shm/claude-stub.txt
{
    echo "== args"
    for a in "$@"; do echo "arg:$a"; done
    echo "== user"
    echo "user:$(id -un)"
    echo "== pwd"
    echo "pwd:$(pwd)"
    echo "== tty"
    if [ -t 0 ]; then echo "tty:yes"; else echo "tty:no"; fi
    echo "== agent"
    ssh-add -l >/dev/null 2>&1
    echo "agent-rc:$?"
    echo "== gh"
    if [ -n "$GH_CONFIG_DIR" ] && [ -e "$GH_CONFIG_DIR" ]; then
        find "$GH_CONFIG_DIR" | sort | while read -r f; do echo "gh:$(stat -c '%a %u' "$f") $f"; done
    fi
    echo "== run"
    [ -f /app/.claude-stub-run ] && sh /app/.claude-stub-run 2>&1 | sed 's/^/run:/'
    echo "== env"
    env | sort | sed 's/^/env:/'
} > "$out.tmp" 2>&1
if [ -f /app/.claude-stub-script ]; then
    (cd /app && sh /app/.claude-stub-script) > /dev/shm/claude-stub-script.log 2>&1
    echo "script-rc:$?" >> "$out.tmp"
fi
if [ -e /app/.claude-stub-wait ]; then
    i=0
    while [ ! -e /dev/shm/claude-stub-go ] && [ ! -e /app/.claude-stub-go ] && [ "$i" -lt 600 ]; do
        sleep 0.1
        i=$((i + 1))
    done
fi
mv "$out.tmp" "$out"
[ -f /app/.claude-stub-exit ] && exit "$(cat /app/.claude-stub-exit)"
exit 0

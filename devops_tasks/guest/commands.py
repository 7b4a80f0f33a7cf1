"""Running shell commands in the guest over a Fabric connection, and ending them.

:func:`run` runs one shell command with streamed output and returns its exit status; Ctrl-C
reaches the guest (through the pty, or by killing the command's process group when there is none).
The command line is built by :func:`wrap_command` and ended from another channel by
:func:`kill_script`; :func:`capture` runs a short command quietly.
"""

from __future__ import annotations

import contextlib
import secrets
import shlex
import sys
import threading
from typing import IO, TYPE_CHECKING, Mapping, Optional, Sequence

from ..errors import GuestError
from ..signals import signal_handlers

if TYPE_CHECKING:  # pragma: no cover
    from fabric import Connection


def quote_words(words: Sequence[str]) -> str:
    """argv words → one shell command the guest's shell splits back into exactly these words."""
    if isinstance(words, (str, bytes)):
        raise TypeError("expected a list of words, not a string")
    return shlex.join(str(word) for word in words)


def env_exports(env: Optional[Mapping[str, str]]) -> str:
    """``export A='x' B='y'`` (values quoted), or "" for no env."""
    if not env:
        return ""
    parts = []
    for key, value in env.items():
        if not key.isidentifier() or not key.isascii():
            raise GuestError(f"invalid environment variable name {key!r}")
        parts.append(f"{key}={shlex.quote(str(value))}")
    return "export " + " ".join(parts)


# Guest shell functions that end the process tree rooted at PID $p. A command started without a
# pty is not always a process-group leader (dropbear keeps its own group), and dash and busybox
# read ``kill -TERM -- -PGID`` differently, so the tree is found with ps instead. Signalled one by
# one, a parent could run on after its child died (``a; echo next``) or fork a child nobody saw,
# so the tree is first frozen (SIGSTOP, parents first, listed again until nothing new appears),
# then sent TERM and CONT: every process then handles its TERM before it runs another step.
# ``me`` (this shell, read from /proc as $$ is the parent's in a subshell) and what it starts are
# left out: the stdin watchdog is itself in the tree it ends.
_TREE_FUNCS = (
    "kids() { ps -o pid= -o ppid= 2>/dev/null | awk -v r=\"$p\" -v me=\"$me\" '{ up[$1] = $2 } END {"
    " for (q in up) { x = q; d = 0; while (x != r && x != me && (x in up) && d < 999) { x = up[x]; d++ }"
    " if (x == r) print d, q } }' | sort -n | awk '{ print $2 }'; }\n"
    "freeze() { n=0; while [ $n -lt 50 ]; do new=; for q in $(kids); do case \" $all \" in *\" $q \"*) ;;"
    " *) new=\"$new $q\";; esac; done; [ -n \"$new\" ] || return 0; kill -STOP $new 2>/dev/null;"
    " all=\"$all$new\"; n=$((n+1)); done; }\n"
    "sig() { [ -z \"$all\" ] || kill -\"$1\" $all 2>/dev/null; }\n"
    "alive() { for q in $all; do kill -0 \"$q\" 2>/dev/null && ! grep -qs '^State:[[:space:]]*Z' /proc/\"$q\"/status"
    " && return 0; done; return 1; }\n"
)


def _end_tree(grace: float) -> str:
    steps = int(max(1, grace / 0.1))
    return (
        "me=; read -r me _ </proc/self/stat 2>/dev/null; all=\n"
        "freeze; sig TERM; sig CONT; i=0\n"
        f"while alive && [ $i -lt {steps} ]; do sleep 0.1; i=$((i+1)); done\n"
        "alive && { freeze; sig KILL; }\n"
    )


def wrap_command(
    command: str,
    cwd: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    pidfile: str = "",
    watchdog: bool = False,
) -> str:
    """The guest command line: ``cd``, export the env, then run ``command`` in its own ``sh -c``
    (an ``exit`` inside it cannot skip the cleanup). The exit status is the command's.

    ``pidfile``: the wrapper's PID is written there, so :func:`kill_script` can end the command
    from another channel (Ctrl-C without a pty). ``watchdog`` (for commands without a pty): a
    background reader of the channel's stdin, which only reaches EOF when the client is gone
    (nothing is sent on it), ends the command's process tree then. Without it a server started by
    a killed ``serve`` would run on in the guest. (With a pty, the SSH server's hangup does that.)
    """
    steps = []
    if cwd:
        steps.append(f"cd {shlex.quote(cwd)}")
    exports = env_exports(env)
    if exports:
        steps.append(exports)
    steps.append(f"sh -c {shlex.quote(command)}" + (" </dev/null" if watchdog else ""))
    body = " && ".join(steps)
    if not pidfile and not watchdog:
        return body
    lines = []
    if pidfile:
        lines.append(f"echo $$ >{shlex.quote(pidfile)}")
    if watchdog:
        cleanup = f"rm -f {shlex.quote(pidfile)}; " if pidfile else ""
        lines += [
            "p=$$",
            _TREE_FUNCS.rstrip("\n"),
            "exec 3<&0",
            "( trap '' TERM; while read -r _; do :; done; " + cleanup + _end_tree(3.0).replace("\n", "; ")
            + ") <&3 >/dev/null 2>&1 &",
            "w=$!",
            "exec 3<&-",
        ]
    lines.append(body)
    lines.append("rc=$?")
    if watchdog:
        # Reaped with the shell's stderr closed for that step only: bash would otherwise print
        # "line N: PID Killed ( trap '' TERM; ... )" after the command's output.
        lines.append("{ kill -KILL $w; wait $w; } 2>/dev/null")
    if pidfile:
        lines.append(f"rm -f {shlex.quote(pidfile)}")
    lines.append("exit $rc")
    return "\n".join(lines) + "\n"


def kill_script(pidfile: str, grace: float = 3.0) -> str:
    """Guest script: end the command whose wrapper wrote ``pidfile`` and everything it started
    (TERM, up to ``grace`` seconds, then KILL)."""
    pf = shlex.quote(pidfile)
    return (
        f"[ -f {pf} ] || exit 0; p=$(cat {pf}); rm -f {pf}; [ -n \"$p\" ] || exit 0\n"
        + _TREE_FUNCS
        + _end_tree(grace)
        + "exit 0\n"
    )


def stdin_interactive() -> bool:
    """Stdin and stdout are both terminals (ssh's rule for a pty)."""
    try:
        return sys.stdin is not None and sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def run(
    conn: "Connection",
    command: str,
    cwd: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    pty: Optional[bool] = None,
    timeout: Optional[float] = None,
    hide: bool = False,
    out_stream: Optional[IO[str]] = None,
    err_stream: Optional[IO[str]] = None,
) -> int:
    """Run ``command`` (a shell command line) in the guest, stream its output, return its status.

    ``pty`` None means "like ssh": a pty when stdin and stdout are terminals. With a pty, stdin is
    forwarded and Ctrl-C reaches the guest as ^C (the program decides; its status is returned).
    Without one, stdin is not read, and Ctrl-C, SIGTERM or SIGHUP end the command's process tree in
    the guest, then raise KeyboardInterrupt here. (Invoke cannot be interrupted there itself: it
    waits for the remote output to end before it lets a KeyboardInterrupt through.)
    An exit without status (the connection dropped) is 255, as in ssh.
    """
    if hasattr(conn, "run_command"):  # a MuxSession (.mux): the same contract over OpenSSH
        return conn.run_command(command, cwd=cwd, env=env, pty=pty, timeout=timeout, hide=hide,
                                out_stream=out_stream, err_stream=err_stream)
    from invoke.exceptions import CommandTimedOut

    if pty is None:
        pty = stdin_interactive()
    pidfile = f"/tmp/.devops-tasks-run.{secrets.token_hex(8)}.pid"
    line = wrap_command(command, cwd=cwd, env=env, pidfile=pidfile, watchdog=not pty)
    kwargs = dict(warn=True, pty=pty, hide=hide, echo=False, timeout=timeout)
    if not pty:
        kwargs["in_stream"] = False
    if out_stream is not None:
        kwargs["out_stream"] = out_stream
    if err_stream is not None:
        kwargs["err_stream"] = err_stream
    stopping = threading.Event()

    def stop(signum=None, frame=None) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=kill_remote, args=(conn, pidfile), daemon=True).start()

    signals = ["SIGTERM", "SIGHUP"] if pty else ["SIGINT", "SIGTERM", "SIGHUP"]
    try:
        with signal_handlers(signals, stop):
            result = conn.run(line, **kwargs)
    except KeyboardInterrupt:  # with a pty, Invoke sends ^C itself and raises only when it gives up
        kill_remote(conn, pidfile)
        raise
    except CommandTimedOut:
        kill_remote(conn, pidfile)
        raise GuestError(f"command timed out after {timeout} s: {command}") from None
    if stopping.is_set():
        raise KeyboardInterrupt
    code = result.exited
    return 255 if code is None or code < 0 else int(code)


def kill_remote(conn: "Connection", pidfile: str, timeout: float = 15.0) -> None:
    """End the command that wrote ``pidfile`` (see :func:`kill_script`); errors are ignored.

    A channel of its own, so it works while another thread waits in ``conn.run``.
    """
    with contextlib.suppress(Exception):
        chan = conn.client.get_transport().open_session(timeout=timeout)
        try:
            chan.settimeout(timeout)
            chan.exec_command(kill_script(pidfile))
            chan.recv_exit_status()
        finally:
            chan.close()


def capture(conn: "Connection", command: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run a short command, return (status, stdout, stderr); nothing is printed."""
    if hasattr(conn, "run_command"):  # a MuxSession (.mux)
        return conn.capture(command, timeout=timeout)
    result = conn.run(command, warn=True, hide=True, in_stream=False, timeout=timeout)
    return int(result.exited if result.exited is not None else 255), result.stdout, result.stderr

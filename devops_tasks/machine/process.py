"""Start QEMU daemonised in its own session, talk QMP to it, and stop it with escalating deadlines.

Its own session means a Ctrl-C in the terminal that booted it never reaches it; stopping
goes power button → QMP ``quit`` → SIGTERM → SIGKILL, each with a deadline, and works from any
process because the record says which process to wait for.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import VMError
from .records import PRIVATE_UMASK, is_vm_process, process_start

POLL = 0.02


@dataclass(frozen=True)
class StopTimeouts:
    """Seconds to wait after each step before escalating to the next."""

    powerdown: float = 10.0
    quit: float = 3.0
    term: float = 3.0
    kill: float = 5.0


def start(argv: list[str], pidfile: Path, stderr_path: Path, timeout: float = 60.0) -> tuple[int, str]:
    """Run ``argv`` (which holds ``-daemonize``) and return the daemon's (pid, start time).

    QEMU's foreground process exits once the machine is set up (ports bound, sockets listening), so
    its exit status tells whether the start worked; its stderr goes to a file because the daemon may
    hold inherited descriptors.
    """
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            start_new_session=True, close_fds=True, umask=PRIVATE_UMASK,  # log, pidfile, sockets: 0600
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise VMError(f"QEMU did not finish starting within {timeout:.0f}s") from None
    message = stderr_path.read_text(errors="replace").strip()
    if code != 0:
        raise VMError(start_error(message, code))
    pid = read_pidfile(pidfile)
    if pid is None:
        raise VMError(f"QEMU started but wrote no pidfile at {pidfile}")
    return pid, process_start(pid)


def start_error(stderr: str, code: int) -> str:
    """One line saying why QEMU refused to start (a taken port is the common case)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    text = " ".join(lines[-3:]) if lines else f"exit status {code}"
    if "host forwarding rule" in text or "hostfwd" in text:
        return f"QEMU could not forward the SSH port (is it taken?): {text}"
    return f"QEMU failed to start: {text}"


def read_pidfile(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


# -- QMP -----------------------------------------------------------------------------------

def qmp(socket_path: Path | str, command: str, arguments: dict | None = None, timeout: float = 2.0) -> dict:
    """Run one QMP command (after the capabilities handshake) and return its ``return`` value.

    Minimal on purpose: one connection per command, events skipped. ``quit`` may close the socket
    before answering; that counts as success.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        reader = sock.makefile("rb")
        _qmp_read(reader, greeting=True)
        sock.sendall(json.dumps({"execute": "qmp_capabilities"}).encode() + b"\n")
        _qmp_read(reader)
        message: dict = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        sock.sendall(json.dumps(message).encode() + b"\n")
        try:
            return _qmp_read(reader)
        except EOFError:
            if command == "quit":
                return {}
            raise


def _qmp_read(reader, greeting: bool = False) -> dict:
    while True:
        line = reader.readline()
        if not line:
            raise EOFError("QMP connection closed")
        reply = json.loads(line)
        if greeting and "QMP" in reply:
            return reply
        if "return" in reply:
            return reply["return"]
        if "error" in reply:
            raise VMError(f"QMP: {reply['error'].get('desc', reply['error'])}")


# -- stop ----------------------------------------------------------------------------------

def wait_gone(
    pid: int, start: str, marker: str, timeout: float,
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Poll until that process is gone (a zombie counts as gone); False on timeout."""
    deadline = clock() + timeout
    while is_vm_process(pid, start, marker):
        if clock() >= deadline:
            return False
        sleep(POLL)
    return True


def stop(
    pid: int, start: str, marker: str, qmp_socket: Path | str | None,
    timeouts: StopTimeouts = StopTimeouts(), graceful: bool = True,
) -> str:
    """Stop that QEMU; returns the step that worked (powerdown, quit, term, kill).

    Signals are only sent after re-checking the process identity, so a reused PID is never hit.
    """
    steps: list[tuple[str, Callable[[], None], float]] = []
    if qmp_socket:
        if graceful:
            steps.append(("powerdown", lambda: qmp(qmp_socket, "system_powerdown"), timeouts.powerdown))
        steps.append(("quit", lambda: qmp(qmp_socket, "quit"), timeouts.quit))
    steps.append(("term", lambda: _signal(pid, start, marker, signal.SIGTERM), timeouts.term))
    steps.append(("kill", lambda: _signal(pid, start, marker, signal.SIGKILL), timeouts.kill))
    for name, action, timeout in steps:
        if not is_vm_process(pid, start, marker):
            return name
        try:
            action()
        except (OSError, EOFError, ValueError, VMError):
            continue  # socket gone or QMP refused: escalate at once
        if wait_gone(pid, start, marker, timeout):
            return name
    if is_vm_process(pid, start, marker):
        raise VMError(f"QEMU (pid {pid}) did not stop, even after SIGKILL")
    return "kill"


def _signal(pid: int, start: str, marker: str, signum: int) -> None:
    if is_vm_process(pid, start, marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

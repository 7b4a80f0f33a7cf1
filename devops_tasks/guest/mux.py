"""The guest over the VM's OpenSSH master: ``inv test`` and ``inv shell`` in a project without
Paramiko.

A :class:`MuxSession` runs each command, quiet capture and mount channel as one ``ssh`` process
on the VM's multiplexed master (:func:`.openssh.control_path`): a channel costs a few
milliseconds instead of a new key exchange (0.2-0.4 s under TCG), and Fabric and Paramiko (about
0.2 s to import) are never loaded. It keeps the contract of a Fabric connection where the
callers need it: :func:`.commands.run` and :func:`.commands.capture` hand over to
:meth:`MuxSession.run_command` and :meth:`MuxSession.capture`, and :class:`.mount.Mount` opens its
SFTP channel with :meth:`MuxSession.open_channel`.

The master never forwards the agent (:func:`.openssh.ssh_options`), so nothing it keeps between
commands is a credential. Without multiplexing (``CORE_SSH_MULTIPLEX=0``) :func:`openssh_session`
gives a Fabric connection instead: one key exchange for the whole command, not one per channel.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from typing import IO, Callable, Iterator, Optional

from ..errors import GuestError
from ..signals import signal_handlers
from .commands import kill_script, stdin_interactive, wrap_command
from .connection import Target
from .openssh import control_path, ssh_options


class ProcessChannel:
    """One ``ssh`` process seen as the few Paramiko ``Channel`` methods the mount uses: its stdin,
    stdout and stderr are the channel's, its exit status the remote command's (255: ssh failed)."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     bufsize=0, start_new_session=True)  # Ctrl-C is the caller's to handle

    def recv(self, size: int) -> bytes:
        return os.read(self.proc.stdout.fileno(), size)

    def recv_stderr(self, size: int) -> bytes:
        return os.read(self.proc.stderr.fileno(), size)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.proc.stdin.fileno(), view):]

    def shutdown_write(self) -> None:
        self.proc.stdin.close()

    def exit_status_ready(self) -> bool:
        return self.proc.poll() is not None

    def recv_exit_status(self) -> int:
        return self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.close()


class MuxSession:
    """Commands and channels to one VM, each an ``ssh`` process on its multiplexed master."""

    def __init__(self, target: Target):
        self.target = target
        self.is_connected = True  # for callers written for a Fabric connection

    def _argv(self, line: str, tty: bool = False) -> list[str]:
        return ["ssh", *ssh_options(self.target), "-tt" if tty else "-T",
                f"{self.target.user}@{self.target.host}", "--", line]

    def open(self) -> None:
        """Start the master now (else the first command does): its errors come out here."""
        status, _, err = self.capture("true", timeout=60)
        if status != 0:
            raise GuestError(f"cannot connect to the VM over ssh: {err.strip() or f'exit status {status}'}")

    def close(self) -> None:
        """Nothing to close: the master stays for the next command (ControlPersist)."""

    def open_channel(self, command: str) -> ProcessChannel:
        return ProcessChannel(self._argv(command))

    def capture(self, command: str, timeout: float = 30.0) -> tuple[int, str, str]:
        """Run a short command, return (status, stdout, stderr); nothing is printed."""
        try:
            done = subprocess.run(self._argv(command), stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            return 255, "", f"timed out after {timeout:.0f} s"
        return (done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace"))

    def kill(self, pidfile: str) -> None:
        """End the command that wrote ``pidfile`` and its process tree (:func:`.commands.kill_script`)."""
        self.capture(kill_script(pidfile), timeout=15)

    def run_command(self, command: str, cwd: Optional[str] = None, env=None, pty: Optional[bool] = None,
                    timeout: Optional[float] = None, hide: bool = False,
                    out_stream: Optional[IO[str]] = None, err_stream: Optional[IO[str]] = None) -> int:
        """:func:`.commands.run` over the master: the same guest command line, the same endings.

        Without a pty the output is copied to ``out_stream``/``err_stream`` (default: this
        process's), stdin is a pipe nothing is written to (the guest's watchdog ends the command
        when it closes), and Ctrl-C, SIGTERM and SIGHUP end the command's process tree in the guest
        before KeyboardInterrupt is raised here. With a pty, ssh owns the terminal as ``ssh -t`` does.
        """
        if pty is None:
            pty = stdin_interactive()
        pidfile = f"/tmp/.devops-tasks-run.{secrets.token_hex(8)}.pid"
        argv = self._argv(wrap_command(command, cwd=cwd, env=env, pidfile=pidfile, watchdog=not pty), tty=pty)
        if shutil.which("ssh") is None:
            raise GuestError("ssh not found (install openssh-client)")
        if pty:
            from .openssh import run_foreground

            try:
                return _status(run_foreground(argv, terminate_grace=5.0, timeout=timeout))
            except KeyboardInterrupt:
                self.kill(pidfile)
                raise
            except subprocess.TimeoutExpired:
                self.kill(pidfile)
                raise GuestError(f"command timed out after {timeout} s: {command}") from None
        stopping = threading.Event()
        started: list[subprocess.Popen] = []

        def stop(signum=None, frame=None) -> None:
            if not stopping.is_set():
                stopping.set()
                threading.Thread(target=self.kill, args=(pidfile,), daemon=True).start()
                for proc in started:  # EOF for the guest's watchdog: also before the pidfile exists
                    with contextlib.suppress(OSError):
                        proc.stdin.close()

        deadline = None if timeout is None else time.monotonic() + timeout
        # The handlers come first: a Ctrl-C from the very start ends the command in the guest.
        with signal_handlers(("SIGINT", "SIGTERM", "SIGHUP"), stop):
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    bufsize=0, start_new_session=True)
            started.append(proc)
            if stopping.is_set():
                proc.stdin.close()  # interrupted while it started
            pumps = [threading.Thread(target=_copy, args=(proc.stdout, None if hide else out_stream or sys.stdout),
                                      daemon=True),
                     threading.Thread(target=_copy, args=(proc.stderr, None if hide else err_stream or sys.stderr),
                                      daemon=True)]
            for pump in pumps:
                pump.start()
            try:
                while proc.poll() is None:
                    if deadline is not None and time.monotonic() > deadline:
                        self.kill(pidfile)
                        raise GuestError(f"command timed out after {timeout} s: {command}")
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=0.05)
            finally:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
                if proc.poll() is None:  # left by an exception: the guest's watchdog ends the command
                    proc.terminate()
                    proc.wait()
                for pump in pumps:
                    pump.join(timeout=5)
        if stopping.is_set():
            raise KeyboardInterrupt
        return _status(proc.returncode)


def open_channel(conn, command: str, timeout: float):
    """A channel running ``command``: an ``ssh`` process on a :class:`~.mux.MuxSession`, else a
    Paramiko session channel on the Fabric connection."""
    if hasattr(conn, "open_channel"):
        return conn.open_channel(command)
    transport = conn.client.get_transport() if conn.is_connected else None
    if transport is None:
        conn.open()
        transport = conn.client.get_transport()
    chan = transport.open_session(timeout=timeout)
    chan.exec_command(command)
    return chan


def stderr_lines(chan, on_line: Callable[[str], None]) -> None:
    """Each line the channel's command writes on stderr to ``on_line`` (decoded, the last one
    even without a newline), until it ends; how a mount hears its guest script."""
    buffer = b""
    try:
        while True:
            data = chan.recv_stderr(4096)
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                on_line(raw.decode("utf-8", "replace"))
    except (OSError, EOFError):
        pass
    if buffer:
        on_line(buffer.decode("utf-8", "replace"))


def _status(code: int) -> int:
    return 255 if code < 0 else code


def _copy(source, sink: Optional[IO[str]]) -> None:
    """The guest's output to ``sink`` as it comes (None: dropped); text decoded as UTF-8."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    with contextlib.suppress(OSError, ValueError):
        while True:
            data = os.read(source.fileno(), 1 << 16)
            if not data:
                break
            if sink is not None:
                sink.write(decoder.decode(data))
                sink.flush()
        if sink is not None:
            sink.write(decoder.decode(b"", final=True))
            sink.flush()


@contextlib.contextmanager
def openssh_session(target: Target) -> Iterator[object]:
    """A :class:`MuxSession` for the ``with`` block when this VM has a master socket; otherwise a
    Fabric connection (:func:`.connection.session`)."""
    if control_path(target) is None or shutil.which("ssh") is None:
        from .connection import session

        with session(target) as conn:
            yield conn
        return
    yield MuxSession(target)

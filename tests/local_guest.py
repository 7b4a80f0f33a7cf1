"""A stand-in for a VM's Fabric connection whose commands run on this machine (``/bin/sh``), so the
mount, ``vm.cp``'s copy and the review's copy (``review.ProjectCopy``) run for real without a VM:
real sshfs and sftp-server, real tar, the real guest tool under ``python3 -I``, real git."""

from __future__ import annotations

import os
import subprocess
from typing import Optional


class LocalChannel:
    """Enough of ``paramiko.Channel``: the command runs under the local ``sh`` with ``env``."""

    def __init__(self, env: Optional[dict] = None):
        self.env = env
        self.proc = None

    def settimeout(self, timeout):
        pass

    def exec_command(self, command):
        self.proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0, env=self.env)

    def sendall(self, data):
        try:
            self.proc.stdin.write(data)
        except BrokenPipeError as exc:
            raise OSError("the channel is closed") from exc

    def recv(self, n):
        return os.read(self.proc.stdout.fileno(), n)

    def recv_stderr(self, n):
        return os.read(self.proc.stderr.fileno(), n)

    def shutdown_write(self):
        if not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass

    def exit_status_ready(self):
        return self.proc.poll() is not None

    def recv_exit_status(self):
        return self.proc.wait()

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Result:
    def __init__(self, proc):
        self.exited, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr


class LocalConn:
    """Enough of ``fabric.Connection`` for Mount, ``guest.capture`` and the copies: every channel
    (``channels``) and command (``commands``) is kept; ``alive = False`` plays a VM that is gone."""

    is_connected = True
    channel_class = LocalChannel

    def __init__(self, env: Optional[dict] = None):
        self.env = env or dict(os.environ)
        self.alive = True
        self.channels: list[LocalChannel] = []
        self.commands: list[str] = []
        conn = self

        class Transport:
            def is_active(self):
                return conn.alive

            def open_session(self, timeout=None):
                channel = conn.channel_class(conn.env)
                conn.channels.append(channel)
                original = channel.exec_command

                def exec_command(command):
                    conn.commands.append(command)
                    original(command)

                channel.exec_command = exec_command
                return channel

        class Client:
            def get_transport(self):
                return Transport()

        self.client = Client()

    def run(self, command, warn=True, hide=True, in_stream=False, timeout=None, **_):
        proc = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, env=self.env,
                              timeout=timeout)
        return Result(proc)

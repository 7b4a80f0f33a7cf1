"""A stand-in for a VM's Fabric connection whose commands run on this machine (``/bin/sh``), so the
copy and its review (``review.ProjectCopy``) run for real without a VM: real tar, the real guest
tool under ``python3 -I``, real git."""

from __future__ import annotations

import os
import subprocess


class LocalChannel:
    """Enough of ``paramiko.Channel`` for ``review.copy.run_stream``."""

    def __init__(self):
        self.proc = None

    def settimeout(self, timeout):
        pass

    def exec_command(self, command):
        self.proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0)

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

    def recv_exit_status(self):
        return self.proc.wait()

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class LocalConn:
    """Enough of ``fabric.Connection``; ``alive = False`` plays a VM that is gone."""

    is_connected = True

    def __init__(self):
        self.alive = True
        self.commands = []
        conn = self

        class Transport:
            def is_active(self):
                return conn.alive

            def open_session(self, timeout=None):
                channel = LocalChannel()
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

"""Agent forwarding ends when the command that asked for it ends.

A Paramiko SSH server plays a hostile guest: root in the guest owns the server end of the
connection, so it may open agent channels whenever it likes. The host's real ``ssh`` (with the
tool's options) and a real ``ssh-agent`` holding a key are used; the guest tries to list the
agent's keys after the command returned, through a new channel and through one it opened during
the command and kept.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from devops_tasks import guest, hostkeys

pytestmark = pytest.mark.skipif(shutil.which("ssh-agent") is None, reason="needs openssh-client")

REQUEST_IDENTITIES, IDENTITIES_ANSWER = 11, 12


class HostileGuest:
    """An SSH server that runs any command as ``exit 0`` and keeps the connection afterwards."""

    def __init__(self, tmp_path: Path, open_early: bool):
        import paramiko

        self.key = paramiko.Ed25519Key.from_private_key_file(str(hostkeys.ensure_key(tmp_path / "hostkey", "t")))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open_early = open_early
        self.early_channel = None
        self.transport = None
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import paramiko

        sock, _ = self.listener.accept()
        outer = self

        class Server(paramiko.ServerInterface):
            def check_auth_publickey(self, username, key):
                return paramiko.AUTH_SUCCESSFUL

            def get_allowed_auths(self, username):
                return "publickey"

            def check_channel_request(self, kind, chanid):
                return paramiko.OPEN_SUCCEEDED

            def check_channel_forward_agent_request(self, channel):
                return True

            def check_channel_exec_request(self, channel, command):
                threading.Thread(target=outer._finish, args=(channel,), daemon=True).start()
                return True

        self.transport = paramiko.Transport(sock)
        self.transport.add_server_key(self.key)
        self.transport.start_server(server=Server())

    def _finish(self, channel) -> None:
        if self.open_early:  # during the command, as the agent's user would
            self.early_channel = self.transport.open_forward_agent_channel()
        channel.send_exit_status(0)
        channel.close()
        self.done.set()
        if self.open_early:
            # ssh waits for open channels: holding this one keeps the command from returning
            # (the agent stays forwarded while the command visibly runs); let it go after a while
            threading.Timer(2.0, self.early_channel.close).start()

    def agent_answers(self, channel=None) -> bool:
        """Ask the host's agent (through the forwarded channel) for its keys."""
        try:
            if channel is None:
                channel = self.transport.open_forward_agent_channel()
            channel.settimeout(5)
            channel.sendall(struct.pack(">IB", 1, REQUEST_IDENTITIES))
            header = channel.recv(5)
        except Exception:
            return False
        return len(header) == 5 and header[4] == IDENTITIES_ANSWER

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.listener.close()


@pytest.fixture
def agent(tmp_path):
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    key = hostkeys.ensure_key(tmp_path / "userkey", "user")
    env = dict(os.environ, SSH_AUTH_SOCK=str(sock))
    for _ in range(100):
        if sock.exists() and subprocess.run(["ssh-add", str(key)], env=env, capture_output=True).returncode == 0:
            break
        threading.Event().wait(0.05)  # the agent is starting: poll its socket
    else:
        pytest.fail("ssh-agent did not start")
    yield str(sock)
    proc.terminate()
    proc.wait()


@pytest.mark.parametrize("open_early", [False, True], ids=["new-channel-after", "channel-kept-from-during"])
def test_the_guest_cannot_use_the_agent_after_the_command(tmp_path, agent, monkeypatch, open_early):
    monkeypatch.setenv("SSH_AUTH_SOCK", agent)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    server = HostileGuest(tmp_path, open_early)
    try:
        login = hostkeys.ensure_key(tmp_path / "login", "login")
        known = tmp_path / "known_hosts"
        hostkeys.pin_host_key(server.port, tmp_path / "hostkey", known)
        target = guest.Target(port=server.port, identity=login, known_hosts=known, vm_dir=tmp_path)
        argv = guest.ssh_argv(target, ["true"], forward_agent=True)
        assert "-A" in argv
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert server.done.is_set()
        if open_early:
            assert server.early_channel is not None
            assert server.early_channel.closed
        assert not server.agent_answers()
    finally:
        server.close()
        guest.close_master(guest.Target(port=server.port, identity=tmp_path / "login",
                                        known_hosts=tmp_path / "known_hosts", vm_dir=tmp_path))

"""guest: command building and quoting, the OpenSSH argv, the Fabric factory's policy, forwards.

No VM: the shell snippets the guest runs are executed by the local ``sh`` where that proves them,
and the forward talks to a local echo server through a fake SSH transport.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import needs
from devops_tasks import guest
from devops_tasks.errors import GuestError

NASTY = ["a b", "it's", '"q"', "$HOME", "$(echo pwned)", "`id`", "*", "x;y", "é ü", "-n", "", "\\", "a\nb"]


def target(tmp_path: Path, port: int = 2222) -> guest.Target:
    key = tmp_path / "id_ed25519"
    key.write_text("key")
    known = tmp_path / "known_hosts"
    known.write_text("")
    return guest.Target(port=port, identity=key, known_hosts=known, vm_dir=tmp_path / "vm")


def sh(command: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, **kw)


# --------------------------------------------------------------------------- quoting


def test_quote_words_reach_the_shell_intact():
    line = guest.quote_words(["printf", "%s\\0", *NASTY])
    out = subprocess.run(["sh", "-c", line], capture_output=True).stdout
    assert out.split(b"\0")[:-1] == [w.encode() for w in NASTY]


def test_quote_words_refuses_a_string():
    with pytest.raises(TypeError):
        guest.quote_words("ls -l")


def test_env_exports_quote_values_and_check_names():
    assert guest.env_exports({}) == ""
    line = guest.env_exports({"A": "x y", "B": "$(id)", "C": "it's"})
    out = sh(line + ' && printf "%s|%s|%s" "$A" "$B" "$C"').stdout
    assert out == "x y|$(id)|it's"
    with pytest.raises(GuestError):
        guest.env_exports({"A B": "x"})
    with pytest.raises(GuestError):
        guest.env_exports({"X;rm": "x"})


def test_wrap_command_runs_in_dir_with_env_and_keeps_the_status(tmp_path):
    work = tmp_path / "dir with 'quote' $(x)"
    work.mkdir()
    pidfile = tmp_path / "pid"
    line = guest.wrap_command('pwd; echo "$GREETING"; exit 3', cwd=str(work), env={"GREETING": "hi there"},
                              pidfile=str(pidfile))
    result = sh(line)
    assert result.returncode == 3
    assert result.stdout.splitlines() == [str(work), "hi there"]
    assert not pidfile.exists()  # removed even though the command called exit


def test_wrap_command_stops_when_cd_fails(tmp_path):
    result = sh(guest.wrap_command("echo ran", cwd=str(tmp_path / "missing")))
    assert result.returncode != 0
    assert "ran" not in result.stdout


@pytest.fixture(params=["dash", "bash", "busybox"])
def guest_shell(request, tmp_path):
    """(argv of a shell, its environment): ``sh`` on $PATH is that shell too, so the wrapper's
    ``sh -c`` runs under it. busybox gets busybox's ps, awk, sleep...: the guest's tools."""
    name = request.param
    package = {"busybox": "busybox-static"}.get(name, name)
    program = needs.require_tool(name, package)
    bin_dir = tmp_path / f"{name}-bin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to(program)
    if name == "busybox":
        for applet in ("ps", "awk", "sort", "sleep", "cat", "rm", "grep", "kill", "touch"):
            (bin_dir / applet).symlink_to(program)
        return [program, "sh"], {"PATH": str(bin_dir)}
    return [program], {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', os.defpath)}"}


def _running(marker: str) -> dict[int, str]:
    """Live processes (of any user) whose command line holds ``marker``: {pid: command line}."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if marker in cmdline and state != "Z":
                found[int(proc.name)] = cmdline.strip()
    return found


def _started(marker: str) -> bool:
    """Both ``sleep 6?.MARKER`` of the command run."""
    return {f"sleep 60.{marker}", f"sleep 61.{marker}"} <= set(_running(marker).values())


def _kill_leftovers(marker: str) -> None:
    for pid in _running(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


@pytest.mark.parametrize("leader", [True, False], ids=["group-leader", "not-a-group-leader"])
def test_kill_script_ends_the_whole_tree_under_each_shell(tmp_path, guest_shell, leader):
    """``a & b; echo never``, ended at once (while it starts) and once it runs. Signalled one by
    one, a child started after the tree was listed ran on, and a shell whose child died first ran
    ``echo never`` (about one run in three); dash and busybox read ``kill -TERM -- -PGID`` as a bad
    number. In the guest the wrapper is not a process group leader (dropbear keeps its own)."""
    argv, env = guest_shell
    for round_ in range(6):
        pidfile = tmp_path / f"pid{round_}"
        marker = f"{random.randrange(10**6):06d}"
        line = guest.wrap_command(f"sleep 60.{marker} & sleep 61.{marker}; echo never", pidfile=str(pidfile))
        proc = subprocess.Popen([*argv, "-c", line], start_new_session=leader, stdout=subprocess.PIPE, env=env)
        try:
            deadline = time.monotonic() + 15
            while not (pidfile.exists() and pidfile.read_text().strip()
                       and (round_ % 2 == 0 or _started(marker))):
                assert time.monotonic() < deadline, "the wrapped command never started"
                time.sleep(0.005)
            killer = subprocess.run([*argv, "-c", guest.kill_script(str(pidfile), grace=2)], capture_output=True,
                                    text=True, env=env, timeout=30)
            assert (killer.returncode, killer.stderr) == (0, "")
            try:
                out, _ = proc.communicate(timeout=10)  # EOF: nothing holds the output any more
            except subprocess.TimeoutExpired:
                raise AssertionError(f"round {round_}: left running: {_running(marker)}") from None
            assert b"never" not in out, f"round {round_}: the command ran on"
            assert _running(marker) == {}, f"round {round_}: left running"
            assert not pidfile.exists()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _kill_leftovers(marker)


def test_kill_script_gives_a_command_its_grace_then_kills(tmp_path, guest_shell):
    """A command that ignores TERM gets ``grace`` seconds, then KILL, and so do its children."""
    argv, env = guest_shell
    pidfile = tmp_path / "pid"
    marker = f"{random.randrange(10**6):06d}"
    line = guest.wrap_command(f"trap '' TERM; sleep 60.{marker} & sleep 61.{marker}; echo never",
                              pidfile=str(pidfile))
    proc = subprocess.Popen([*argv, "-c", line], stdout=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 15
        while not (pidfile.exists() and _started(marker)):
            assert time.monotonic() < deadline, "the wrapped command never started"
            time.sleep(0.01)
        started = time.monotonic()
        killer = subprocess.run([*argv, "-c", guest.kill_script(str(pidfile), grace=1)], env=env, timeout=30)
        assert killer.returncode == 0
        assert 0.9 < time.monotonic() - started < 10
        proc.communicate(timeout=10)
        assert _running(marker) == {}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_leftovers(marker)


def test_watchdog_ends_the_command_when_the_client_goes_away(tmp_path, guest_shell):
    """Without a pty nothing is sent on stdin: its EOF means the SSH client is gone."""
    argv, env = guest_shell
    marker = tmp_path / "started"
    # durations unique to this run: other processes on the machine may be sleeping 60 s too
    first, second = (f"{n}.{random.randrange(10**6):06d}" for n in (60, 61))
    line = guest.wrap_command(f"sleep {first} & touch {shlex.quote(str(marker))}; sleep {second}", watchdog=True)
    proc = subprocess.Popen([*argv, "-c", line], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 10
        while not marker.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.stdin.close()  # the connection dropped
        proc.wait(timeout=10)
        leftovers = [a for a in sh("ps -eo args").stdout.splitlines() if a in (f"sleep {first}", f"sleep {second}")]
        assert leftovers == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_watchdog_leaves_the_status_and_no_process_behind(tmp_path, guest_shell):
    """The watchdog is ended quietly: bash reports a background job killed by a signal
    ("line 13: 162 Killed ( trap '' TERM; ... )") unless it is reaped with its stderr closed."""
    argv, env = guest_shell
    line = guest.wrap_command("echo out; echo err >&2; exit 4", cwd=str(tmp_path), env={"A": "1"},
                              pidfile=str(tmp_path / "pid"), watchdog=True)
    client = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE)  # stdin stays open: the client is there
    try:
        proc = subprocess.run([*argv, "-c", line], stdin=client.stdout, capture_output=True, text=True, timeout=10,
                              env=env)
    finally:
        client.kill()
        client.wait()
        client.stdout.close()
    assert (proc.returncode, proc.stdout, proc.stderr) == (4, "out\n", "err\n")
    assert not (tmp_path / "pid").exists()


def test_kill_script_without_pidfile_is_a_no_op(tmp_path):
    assert sh(guest.kill_script(str(tmp_path / "absent"))).returncode == 0


# --------------------------------------------------------------------------- OpenSSH argv


def test_ssh_argv_is_strict_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    t = target(tmp_path, 40022)
    argv = guest.ssh_argv(t, ["echo", "a b"])
    joined = " ".join(argv)
    assert argv[0] == "ssh"
    assert ["-F", "/dev/null"] == argv[1:3]
    for option in ("StrictHostKeyChecking=yes", f"UserKnownHostsFile={t.known_hosts}",
                   "GlobalKnownHostsFile=/dev/null", "IdentitiesOnly=yes", f"IdentityFile={t.identity}",
                   "BatchMode=yes", "UpdateHostKeys=no", "IdentityAgent=none"):
        assert option in argv, option
    assert "-p" in argv and argv[argv.index("-p") + 1] == "40022"
    assert "-a" in argv and "-A" not in argv  # no agent: none forwarded
    assert argv[-3:] == ["root@127.0.0.1", "--", "echo 'a b'"]
    assert "accept-new" not in joined and "StrictHostKeyChecking=no" not in joined


def test_ssh_argv_forwards_an_existing_agent_only(tmp_path, monkeypatch):
    t = target(tmp_path)
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "no-such-socket"))
    assert "-A" not in guest.ssh_argv(t, ["true"])
    sock_path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    try:
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock_path))
        argv = guest.ssh_argv(t, ["true"])
        assert "-A" in argv and "IdentityAgent=none" not in argv
        assert "-A" not in guest.ssh_argv(t, ["true"], forward_agent=False)
    finally:
        server.close()


def test_ssh_argv_cwd(tmp_path):
    t = target(tmp_path)
    assert guest.ssh_argv(t, ["ls", "a b"], cwd="/app it's")[-1] == "cd '/app it'\"'\"'s' && ls 'a b'"
    argv = guest.ssh_argv(t, cwd="/app", tty=True)
    assert argv[-1] == 'cd /app && exec "${SHELL:-/bin/sh}" -l' and "-tt" in argv


def test_ssh_argv_login_shell_and_tty_choice(tmp_path):
    t = target(tmp_path)
    assert guest.ssh_argv(t)[-1] == "root@127.0.0.1"  # ssh's own rule: a pty on a terminal
    assert "-t" in guest.ssh_argv(t, tty=True)
    assert "-tt" in guest.ssh_argv(t, ["top"], tty=True)
    assert "-T" in guest.ssh_argv(t, ["true"], tty=False)


def test_ssh_argv_words_survive_the_remote_shell(tmp_path):
    """What ssh sends is argv[-1] run by the guest's shell: it must give back the words."""
    argv = guest.ssh_argv(target(tmp_path), ["printf", "%s\\0", *NASTY])
    out = subprocess.run(["sh", "-c", argv[-1]], capture_output=True).stdout
    assert out.split(b"\0")[:-1] == [w.encode() for w in NASTY]


def test_control_path_is_short_private_and_per_vm(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("CORE_SSH_MULTIPLEX", raising=False)
    a = guest.control_path(target(tmp_path, 2222))
    b = guest.control_path(guest.Target(2223, Path("k"), Path("h")))
    assert a is not None and b is not None and a != b
    assert len(str(a)) + 17 < 100  # OpenSSH adds a random suffix while it sets the master up
    assert stat.S_IMODE(os.stat(a.parent).st_mode) == 0o700
    argv = guest.ssh_argv(target(tmp_path, 2222), ["true"])
    assert f"ControlPath={a}" in argv and "ControlMaster=auto" in argv


def test_control_path_refuses_a_loose_folder(tmp_path, monkeypatch):
    short = Path(tempfile.mkdtemp(prefix="dt", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short))
    folder = short / f"devops-tasks-{os.getuid()}"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    assert guest.control_path(target(tmp_path)) is None
    assert "ControlPath=none" in guest.ssh_argv(target(tmp_path), ["true"])
    shutil.rmtree(short)


def test_control_path_moves_to_tmp_when_the_runtime_dir_is_long(monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/" + "x" * 90)
    path = guest.control_path(guest.Target(2222, Path("k"), Path("h")))
    assert path is not None and str(path).startswith(f"/tmp/devops-tasks-{os.getuid()}/")


def test_multiplexing_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("CORE_SSH_MULTIPLEX", "0")
    assert guest.control_path(target(tmp_path)) is None


def test_run_foreground_returns_the_status(tmp_path):
    assert guest.run_foreground(["sh", "-c", "exit 5"]) == 5
    assert guest.run_foreground(["sh", "-c", "kill -TERM $$"]) == 128 + 15
    with pytest.raises(GuestError, match="not found"):
        guest.run_foreground([str(tmp_path / "no-ssh")])


# --------------------------------------------------------------------------- Fabric factory


def test_connect_builds_a_strict_connection(tmp_path, monkeypatch):
    import paramiko

    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host *\n  HostName evil.example\n  Port 1\n  User mallory\n")
    monkeypatch.setenv("HOME", str(home))
    t = target(tmp_path, 40022)
    t.known_hosts.write_text(
        "[127.0.0.1]:40022 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIItOQTz+TkRXidc4KXQsFY0iLJF7uUJTaZPRwkz6ST/o\n"
    )
    conn = guest.connect(t, forward_agent=True, open=False)
    assert (conn.host, conn.port, conn.user) == ("127.0.0.1", 40022, "root")  # ~/.ssh/config ignored
    assert conn.forward_agent is False  # asked for, but there is no agent
    assert isinstance(conn.client._policy, paramiko.RejectPolicy)
    assert conn.client.get_host_keys().lookup("[127.0.0.1]:40022") is not None
    assert conn.connect_kwargs["key_filename"] == [str(t.identity)]
    assert conn.connect_kwargs["look_for_keys"] is False and conn.connect_kwargs["allow_agent"] is False
    assert conn.connect_timeout


def test_connect_needs_key_and_known_hosts(tmp_path):
    t = target(tmp_path)
    t.known_hosts.unlink()
    with pytest.raises(GuestError, match="known_hosts"):
        guest.connect(t, open=False)
    t.identity.unlink()
    with pytest.raises(GuestError, match="login key"):
        guest.connect(t, open=False)


def test_connect_refuses_an_unknown_host(tmp_path):
    """A real SSH handshake against a tiny Paramiko server whose key is not in known_hosts."""
    import paramiko

    host_key = paramiko.Ed25519Key.from_private_key_file(_ed25519(tmp_path / "hostkey"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve():
        client, _ = listener.accept()
        transport = paramiko.Transport(client)
        transport.add_server_key(host_key)
        try:
            transport.start_server(server=paramiko.ServerInterface())
            transport.accept(0.5)
        except Exception:
            pass
        finally:
            transport.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        t = target(tmp_path, port)
        t.known_hosts.write_text(f"[127.0.0.1]:{port} " + _public(_ed25519(tmp_path / "other")) + "\n")
        with pytest.raises(GuestError, match="does not match"):
            guest.connect(t)
        assert "hostkey" not in t.known_hosts.read_text()  # nothing was added
    finally:
        listener.close()
        thread.join(5)


def test_connect_reports_an_unreachable_vm(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(GuestError, match="cannot reach"):
        guest.connect(target(tmp_path, port))


def _ed25519(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return str(path)


def _public(path: str) -> str:
    return " ".join(Path(path + ".pub").read_text().split()[:2])


# --------------------------------------------------------------------------- agent, sftp-server


def test_agent_socket_needs_a_real_socket(tmp_path):
    assert guest.agent_socket({}) is None
    assert guest.agent_socket({"SSH_AUTH_SOCK": ""}) is None
    plain = tmp_path / "file"
    plain.write_text("")
    assert guest.agent_socket({"SSH_AUTH_SOCK": str(plain)}) is None
    path = tmp_path / "s"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        assert guest.agent_socket({"SSH_AUTH_SOCK": str(path)}) == str(path)
    finally:
        server.close()


def test_find_sftp_server_override_and_error(tmp_path, monkeypatch):
    fake = tmp_path / "sftp-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert guest.find_sftp_server({"CORE_SFTP_SERVER": str(fake)}) == str(fake)
    with pytest.raises(GuestError, match="not an executable"):
        guest.find_sftp_server({"CORE_SFTP_SERVER": str(tmp_path / "none")})
    monkeypatch.setattr(guest.sftp_server, "SFTP_SERVER_CANDIDATES", (str(tmp_path / "none"),))
    with pytest.raises(GuestError, match="openssh-sftp-server"):
        guest.find_sftp_server({})


def test_fsname_hides_the_path_and_tells_folders_apart():
    a = guest.fsname_for(Path("/home/me/proj $(rm -rf /)"))
    b = guest.fsname_for(Path("/home/me/other"))
    assert a != b and a.startswith("devops-tasks:")
    assert all(c.isalnum() or c in ":-" for c in a)
    assert a == guest.fsname_for(Path("/home/me/proj $(rm -rf /)"))


@pytest.mark.parametrize("script", [
    guest.mount_script("/app", "devops-tasks:0123", "abcd"),
    guest.mount_script("/app", "devops-tasks:0123", "abcd", confined=True),
    guest.unmount_script("/app", "devops-tasks:0123", "abcd"),
    guest.unmount_script("/app", "devops-tasks:0123", "abcd", confined=True, force=True),
    guest.kill_script("/tmp/x.pid"),
    guest.wrap_command("true", pidfile="/tmp/x.pid", watchdog=True),
])
def test_guest_scripts_are_valid_sh(script, guest_shell):
    argv, env = guest_shell
    result = subprocess.run([*argv, "-n", "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- forwards


def test_bind_local_reports_a_taken_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(GuestError, match=f"port {port} on 127.0.0.1 is already in use"):
            guest.bind_local(port)
    with pytest.raises(GuestError, match="invalid port"):
        guest.bind_local(70000)


class _SockChannel:
    """A paramiko-channel stand-in: a TCP socket to the 'guest' service."""

    def __init__(self, sock):
        self.sock = sock

    def fileno(self):
        return self.sock.fileno()

    def recv(self, n):
        return self.sock.recv(n)

    def sendall(self, data):
        self.sock.sendall(data)

    def shutdown_write(self):
        self.sock.shutdown(socket.SHUT_WR)

    def close(self):
        self.sock.close()


class _Transport:
    def __init__(self, service_port):
        self.service_port = service_port
        self.requests = []

    def open_channel(self, kind, dest, origin, timeout=None):
        self.requests.append((kind, dest))
        return _SockChannel(socket.create_connection(("127.0.0.1", self.service_port)))


class _Conn:
    def __init__(self, transport):
        self.client = type("C", (), {"get_transport": lambda _self: transport})()


def test_forward_relays_both_ways_and_closes():
    service = socket.socket()
    service.bind(("127.0.0.1", 0))
    service.listen(5)
    service_port = service.getsockname()[1]

    def echo():
        while True:
            try:
                client, _ = service.accept()
            except OSError:
                return
            with client:
                data = b""
                while chunk := client.recv(4096):
                    data += chunk
                client.sendall(data.upper())

    threading.Thread(target=echo, daemon=True).start()
    transport = _Transport(service_port)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local_port = probe.getsockname()[1]
    try:
        with guest.Forward(_Conn(transport), local_port, remote_port=8000) as forward:
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", local_port), timeout=5) as client:
                    client.sendall(b"hello " * 10000)
                    client.shutdown(socket.SHUT_WR)
                    received = b""
                    while chunk := client.recv(65536):
                        received += chunk
                assert received == b"HELLO " * 10000
            assert forward.listener.getsockname() == ("127.0.0.1", local_port)
        assert transport.requests == [("direct-tcpip", ("127.0.0.1", 8000))] * 2
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", local_port), timeout=2)
    finally:
        service.close()

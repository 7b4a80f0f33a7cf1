"""guest.MuxSession (commands and channels as ``ssh`` processes on the VM's master) against a fake
``ssh`` on PATH that runs the remote command line under this machine's ``/bin/sh``: the exit
status, the streamed output, Ctrl-C and timeouts ending the command's process tree, and a real
reverse-SSHFS mount over it. The same paths run against a real VM in tests/e2e/test_workspace_e2e.py
(``inv test`` and ``inv shell`` in a project use a MuxSession).
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from devops_tasks import guest
from devops_tasks.errors import GuestError
from test_guest_mount import mounted_at, needs_fuse, point, project  # noqa: F401  (fixtures)


@pytest.fixture
def session(tmp_path, monkeypatch):
    """A MuxSession whose ``ssh`` is a local shell: the last argument is the remote command line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ssh"
    fake.write_text('#!/bin/sh\nfor last; do :; done\nexec /bin/sh -c "$last"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    key = tmp_path / "id"
    key.write_text("k")
    return guest.MuxSession(guest.Target(port=40022, identity=key, known_hosts=key))


def running(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_run_keeps_the_status_cwd_env_and_streams(session, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    code = guest.run(session, 'pwd; echo "$GREETING"; echo oops >&2; exit 7', cwd=str(tmp_path),
                     env={"GREETING": "hi 'there' $x"}, pty=False, out_stream=out, err_stream=err)
    assert code == 7
    assert out.getvalue() == f"{tmp_path}\nhi 'there' $x\n"
    assert err.getvalue() == "oops\n"


def test_run_hidden_prints_nothing(session, capfd):
    assert guest.run(session, "echo hidden; echo hidden >&2", pty=False, hide=True) == 0
    assert "hidden" not in "".join(capfd.readouterr())


def test_capture(session):
    assert guest.capture(session, "echo out; echo err >&2; exit 3") == (3, "out\n", "err\n")


def test_ctrl_c_ends_the_command_tree_then_interrupts(session, tmp_path):
    marker = f"mux-ctrl-c-{os.getpid()}-{time.monotonic_ns()}"
    threading.Thread(target=lambda: wait_for(lambda: running(marker)) and os.kill(os.getpid(), signal.SIGINT),
                     daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        guest.run(session, f"sh -c 'sleep 60; : {marker}' & sleep 60; : {marker}", pty=False)
    assert time.monotonic() - started < 30
    assert wait_for(lambda: not running(marker)), running(marker)


def test_a_timeout_ends_the_command_and_says_so(session):
    marker = f"mux-timeout-{os.getpid()}-{time.monotonic_ns()}"
    with pytest.raises(GuestError, match="timed out after 0.5 s"):
        guest.run(session, f"sleep 60; : {marker}", pty=False, timeout=0.5)
    assert wait_for(lambda: not running(marker)), running(marker)


def test_the_channel_is_the_process_s_pipes(session):
    chan = session.open_channel("read line; echo got:$line; echo note >&2; exit 5")
    chan.sendall(b"hello\n")
    chan.shutdown_write()
    assert chan.recv(100) == b"got:hello\n"
    assert chan.recv_stderr(100) == b"note\n"
    assert chan.recv_exit_status() == 5 and chan.exit_status_ready()
    chan.close()


@needs_fuse
def test_a_mount_over_the_session_edits_both_ways_and_unmounts(session, point, project):  # noqa: F811
    with guest.Mount(session, project, str(point), timeout=15) as mount:
        assert mount.mounted and not mount.reused
        assert (point / "hello.txt").read_text() == "hello\n"
        (point / "from-guest.txt").write_text("guest wrote this")
        assert (project / "from-guest.txt").read_text() == "guest wrote this"
        with guest.Mount(session, project, str(point), timeout=15) as inner:
            assert inner.reused
        assert (point / "hello.txt").exists()
    assert mounted_at(point) == []


def test_openssh_session_without_multiplexing_is_a_fabric_connection(session, monkeypatch):
    monkeypatch.setenv("CORE_SSH_MULTIPLEX", "0")
    seen = []
    import contextlib

    @contextlib.contextmanager
    def fabric_session(target, forward_agent=False):
        seen.append(target.port)
        yield "fabric"

    monkeypatch.setattr(guest.connection, "session", fabric_session)
    with guest.openssh_session(session.target) as conn:
        assert conn == "fabric" and seen == [40022]
    monkeypatch.setenv("CORE_SSH_MULTIPLEX", "1")
    with guest.openssh_session(session.target) as conn:
        assert isinstance(conn, guest.MuxSession)

"""workspace (shell/test/serve) and their tasks, with the guest part replaced by fakes.

What is checked here: which command runs where with which env, the priority of test commands,
errors raised before anything touches the VM, exit statuses, and the words after ``--``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devops_tasks import cli, guest
from devops_tasks.config import Config
from devops_tasks.devops import DevOps
from devops_tasks.lifecycle import VM
from devops_tasks.errors import ConfigError, GuestError, NotRunningError, ProjectError
from devops_tasks.options import ServeOptions, ShellOptions, TestOptions

BIN = Path(sys.executable).parent


class Recorder:
    def __init__(self):
        self.calls = []
        self.status = 0


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Replace the VM and the guest with recorders; returns the recorder."""
    rec = Recorder()
    key = tmp_path / "id"
    key.write_text("k")
    where = guest.Target(port=40022, identity=key, known_hosts=key)
    monkeypatch.setattr(VM, "target", lambda self: where)
    monkeypatch.setattr(VM, "is_running", lambda self: True)
    monkeypatch.chdir(tmp_path)  # not a project: ``shell`` mounts nothing unless a test says so

    @contextlib.contextmanager
    def session(target, forward_agent=False):
        rec.calls.append(("session", target.port))
        try:
            yield "conn"
        finally:
            rec.calls.append(("closed",))

    class Mount:
        def __init__(self, conn, host_dir, guest_dir="/app", **kw):
            self.where = (Path(host_dir), guest_dir)

        def start(self):
            if getattr(rec, "mount_error", None):
                raise rec.mount_error
            rec.calls.append(("mount", *self.where))

        def stop(self):
            rec.calls.append(("unmount",))

        def __enter__(self):
            self.start()
            return self

        def __exit__(self, *exc):
            self.stop()

    class Forward:
        def __init__(self, conn, port, sock=None, **kw):
            self.sock = sock
            rec.calls.append(("forward", port, sock.getsockname()))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.sock.close()
            rec.calls.append(("unforward",))

    def run(conn, command, cwd=None, env=None, **kw):
        rec.calls.append(("run", command, cwd, env))
        if isinstance(rec.status, BaseException):
            raise rec.status
        return rec.status

    def run_foreground(argv, terminate_grace=None):
        rec.calls.append(("ssh", argv))
        if isinstance(rec.status, BaseException):
            raise rec.status
        return rec.status

    monkeypatch.setattr(guest, "session", session)
    monkeypatch.setattr(guest, "openssh_session", session)  # test and shell: over the OpenSSH master
    monkeypatch.setattr(guest, "Mount", Mount)
    monkeypatch.setattr(guest, "open_mount", lambda conn, root, guest_dir="/app", **kw: Mount(conn, root, guest_dir))
    monkeypatch.setattr(guest, "Forward", Forward)
    monkeypatch.setattr(guest, "run", run)
    monkeypatch.setattr(guest, "run_foreground", run_foreground)
    return rec


@pytest.fixture
def dev():
    lines = []
    devops = DevOps(Config(), echo=lines.append)
    devops.lines = lines
    return devops


def pytest_project(tmp_path: Path, test_yaml: str = "") -> Path:
    root = tmp_path / "proj"
    root.mkdir(parents=True)
    (root / "pytest.ini").write_text("[pytest]\n")
    if test_yaml:
        (root / ".core").mkdir()
        (root / ".core" / "test.yaml").write_text(test_yaml)
    return root


# --------------------------------------------------------------------------- not running


def test_not_running_is_a_clear_error(dev, tmp_path):
    with pytest.raises(NotRunningError, match=r"dev environment not running \(run 'inv vm.boot' first\)"):
        dev.shell(ShellOptions(command=["true"]))


def test_test_and_serve_boot_a_stopped_vm_saying_so(dev, fake, tmp_path, monkeypatch):
    booted = []
    monkeypatch.setattr(VM, "is_running", lambda self: bool(booted))
    monkeypatch.setattr(VM, "boot", lambda self, opts=None: booted.append(self.name))
    assert dev.test(pytest_project(tmp_path)) == 0
    assert booted == ["core-dev"]
    assert dev.lines[0] == "Dev environment not running, booting..."
    assert fake.calls[0] == ("session", 40022)  # booted before anything touched the guest
    booted.clear()
    dev.lines.clear()
    port = free_local_port()
    assert dev.serve(tmp_path, ServeOptions(port=port)) == 0
    assert booted == ["core-dev"] and dev.lines[0] == "Dev environment not running, booting..."


def test_serve_checks_its_port_before_booting(dev, fake, tmp_path, monkeypatch):
    booted = []
    monkeypatch.setattr(VM, "is_running", lambda self: False)
    monkeypatch.setattr(VM, "boot", lambda self, opts=None: booted.append(self.name))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(GuestError):
            dev.serve(tmp_path, ServeOptions(port=taken.getsockname()[1]))
    assert booted == []


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("program", ["inv", "devops"])
def test_cli_says_not_running_and_fails(program, tmp_path):
    env = {"HOME": str(tmp_path), "CORE_HOME": str(tmp_path / ".core"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([str(BIN / program), "shell", "--", "echo", "a b"], capture_output=True,
                            text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert result.returncode == 1
    assert "dev environment not running (run 'inv vm.boot' first)" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- shell


def test_shell_runs_ssh_with_the_words(dev, fake, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    fake.status = 7
    assert dev.shell(ShellOptions(command=["printf", "%s", "a b", "$HOME"])) == 7
    (kind, argv), = fake.calls
    assert argv[0] == "ssh" and argv[-3:] == ["root@127.0.0.1", "--", "printf %s 'a b' '$HOME'"]
    assert "-p" in argv and "40022" in argv


def test_shell_without_command_is_a_login_shell(dev, fake):
    dev.shell(ShellOptions())
    (kind, argv), = fake.calls
    assert argv[-1] == "root@127.0.0.1" and "--" not in argv[-2:]


def test_shell_console_goes_to_the_serial_console(dev, fake, monkeypatch):
    seen = []
    monkeypatch.setattr(VM, "console", lambda self: seen.append(self.name))
    assert dev.shell(ShellOptions(console=True)) == 0
    assert seen == ["core-dev"] and fake.calls == []
    with pytest.raises(GuestError, match="no command"):
        dev.shell(ShellOptions(console=True, command=["ls"]))


def test_shell_in_a_project_mounts_it_and_starts_in_app(dev, fake, tmp_path, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    root = pytest_project(tmp_path)
    monkeypatch.chdir(root)
    fake.status = 4
    assert dev.shell(ShellOptions(command=["printf", "%s", "a b"])) == 4
    assert fake.calls[:2] == [("session", 40022), ("mount", root.resolve(), "/app")]
    assert fake.calls[3:] == [("unmount",), ("closed",)]
    argv = fake.calls[2][1]
    assert argv[-3:] == ["root@127.0.0.1", "--", "cd /app && printf %s 'a b'"]
    assert "-t" not in argv and "-tt" not in argv  # a command gets no pty, as with plain ssh


def test_shell_login_shell_in_a_project(dev, fake, tmp_path, monkeypatch):
    root = pytest_project(tmp_path)
    monkeypatch.chdir(root)
    monkeypatch.setattr(guest, "stdin_interactive", lambda: True)
    dev.shell(ShellOptions())
    argv = fake.calls[2][1]
    assert argv[-2:] == ["--", 'cd /app && exec "${SHELL:-/bin/sh}" -l'] and "-tt" in argv


def test_shell_mount_choices(dev, fake, tmp_path, monkeypatch):
    root = pytest_project(tmp_path)
    monkeypatch.chdir(root)
    dev.shell(ShellOptions(command=["pwd"], mount=False))
    assert [call[0] for call in fake.calls] == ["ssh"] and fake.calls[0][1][-1] == "pwd"
    fake.calls.clear()
    elsewhere = tmp_path / "plain"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    dev.shell(ShellOptions(command=["pwd"], project=str(root)))
    assert fake.calls[1] == ("mount", root.resolve(), "/app")
    with pytest.raises(GuestError, match="contradict"):
        dev.shell(ShellOptions(command=["pwd"], project=str(root), mount=False))
    with pytest.raises(ProjectError, match="does not exist"):
        dev.shell(ShellOptions(command=["pwd"], project=str(tmp_path / "missing")))


def test_shell_mount_failure_says_how_to_get_a_shell(dev, fake, tmp_path, monkeypatch):
    monkeypatch.chdir(pytest_project(tmp_path))
    fake.mount_error = GuestError("/app in the VM already holds a live mount of another folder")
    with pytest.raises(GuestError, match=r"another folder \(inv shell --no-mount gives a shell without it\)$"):
        dev.shell(ShellOptions(command=["pwd"]))
    assert [call[0] for call in fake.calls] == ["session", "closed"]  # no ssh ran


def test_shell_ctrl_c_or_sigterm_unmounts(dev, fake, tmp_path, monkeypatch):
    monkeypatch.chdir(pytest_project(tmp_path))
    fake.status = KeyboardInterrupt()
    assert dev.shell(ShellOptions(command=["sleep", "99"])) == 130
    assert fake.calls[-2:] == [("unmount",), ("closed",)]


# --------------------------------------------------------------------------- test


def test_test_detects_mounts_runs_in_app_and_returns_the_status(dev, fake, tmp_path):
    root = pytest_project(tmp_path)
    fake.status = 1
    assert dev.test(root) == 1
    assert fake.calls == [
        ("session", 40022),
        ("mount", root.resolve(), "/app"),
        ("run", "pytest", "/app", {}),
        ("unmount",),
        ("closed",),
    ]
    assert dev.lines == ["Running tests: pytest"]


def test_test_named_command_gets_the_env(dev, fake, tmp_path):
    root = pytest_project(tmp_path, "commands:\n  - name: quick\n    run: pytest -q -x\nenv:\n  GREETING: hi there\n")
    dev.test(root, TestOptions(name="quick"))
    assert ("run", "pytest -q -x", "/app", {"GREETING": "hi there"}) in fake.calls


def test_test_explicit_command_wins_and_keeps_its_words(dev, fake, tmp_path):
    root = pytest_project(tmp_path, "command: make test\nenv:\n  A: b\n")
    dev.test(root, TestOptions(name="ignored", command=["pytest", "-k", "a and not b", "$X"]))
    assert ("run", "pytest -k 'a and not b' '$X'", "/app", {"A": "b"}) in fake.calls


def test_test_errors_come_before_the_vm_is_touched(dev, fake, tmp_path):
    root = pytest_project(tmp_path, "commands:\n  - name: unit\n    run: pytest\n")
    with pytest.raises(ProjectError, match='test command "nope" not found in .core/test.yaml'):
        dev.test(root, TestOptions(name="nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ProjectError, match=r"could not detect test command \(create .core/test.yaml\)"):
        dev.test(empty)
    broken = pytest_project(tmp_path / "b", "env: [\n")
    with pytest.raises(ConfigError):
        dev.test(broken)
    with pytest.raises(ProjectError, match="does not exist"):
        dev.test(tmp_path / "missing")
    assert fake.calls == []


def test_test_ctrl_c_is_status_130(dev, fake, tmp_path):
    fake.status = KeyboardInterrupt()
    assert dev.test(pytest_project(tmp_path)) == 130
    assert fake.calls[-2:] == [("unmount",), ("closed",)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_test_sigterm_and_sighup_clean_up_like_ctrl_c(dev, fake, tmp_path, signum):
    fake.status = None

    def run(conn, command, **kw):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not interrupt")

    guest.run = run  # the fixture's monkeypatch restores it
    before = signal.getsignal(signum)
    assert dev.test(pytest_project(tmp_path)) == 130
    assert fake.calls[-2:] == [("unmount",), ("closed",)]
    assert signal.getsignal(signum) is before


# --------------------------------------------------------------------------- serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_runs_the_detected_command_in_the_subdir(dev, fake, tmp_path):
    root = tmp_path / "site"
    (root / "public").mkdir(parents=True)
    port = free_port()
    assert dev.serve(root, ServeOptions(port=port, path="public")) == 0
    assert fake.calls == [
        ("session", 40022),
        ("mount", root.resolve(), "/app"),
        ("forward", port, ("127.0.0.1", port)),
        ("run", f"python3 -m http.server {port}", "/app/public", {"PORT": str(port)}),
        ("unforward",),
        ("unmount",),
        ("closed",),
    ]
    assert dev.lines == [f"Serving /app/public with: python3 -m http.server {port}", f"http://localhost:{port}"]


def test_serve_ctrl_c_stops_everything(dev, fake, tmp_path):
    fake.status = KeyboardInterrupt()
    assert dev.serve(tmp_path, ServeOptions(port=free_port())) == 0
    assert fake.calls[-3:] == [("unforward",), ("unmount",), ("closed",)]
    assert dev.lines[-1] == "Stopped"


def test_serve_taken_port_fails_before_the_vm_is_touched(dev, fake, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(GuestError, match=f"port {port} on 127.0.0.1 is already in use"):
            dev.serve(tmp_path, ServeOptions(port=port))
    with pytest.raises(ProjectError, match="no such directory"):
        dev.serve(tmp_path, ServeOptions(port=free_port(), path="nope"))
    assert fake.calls == []


# --------------------------------------------------------------------------- tasks


def run_program(argv, monkeypatch):
    """Run the ``devops`` program in-process with this argv (sys.argv too, as a real run has it)."""
    from devops_tasks.cli import program as make_program

    monkeypatch.setattr(sys, "argv", argv)
    try:
        make_program().run(argv)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_tasks_pass_flags_and_remainder_words(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(DevOps, "test", lambda self, project, opts: seen.append((self.name, project, opts)) or 3)
    monkeypatch.setattr(DevOps, "shell", lambda self, opts: seen.append((self.name, opts)) or 0)
    monkeypatch.setattr(DevOps, "serve", lambda self, project, opts: seen.append((self.name, project, opts)) or 0)

    code = run_program(["devops", "test", "--name", "unit", "--vm", "box", "--", "pytest", "-k", "a b"], monkeypatch)
    assert code == 3
    assert seen.pop() == ("box", ".", TestOptions(name="unit", command=["pytest", "-k", "a b"]))

    assert run_program(["devops", "shell", "--no-agent", "--", "printf", "%s|", "x y"], monkeypatch) == 0
    assert seen.pop() == ("core-dev", ShellOptions(command=["printf", "%s|", "x y"], forward_agent=False))

    assert run_program(["devops", "serve", "--port", "9000", "--path", "public", "--project", str(tmp_path)],
                       monkeypatch) == 0
    assert seen.pop() == ("core-dev", str(tmp_path), ServeOptions(port=9000, path="public"))

    assert run_program(["devops", "serve", "--port", "http"], monkeypatch) == 1
    assert "--port 'http' is not a number" in capsys.readouterr().err


# --------------------------------------------------------------------------- the shell fast path


@pytest.mark.parametrize("argv", [
    [], ["vm.boot"], ["shell", "--console"], ["shell", "--help"], ["-e", "shell"], ["shell", "-x"],
    ["shell", "--name"], ["test", "--", "true"],
])
def test_fast_shell_leaves_other_forms_to_invoke(argv, fake):
    assert cli.fast_shell(argv) is None
    assert fake.calls == []


def test_fast_shell_runs_ssh_with_the_words(fake, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    fake.status = 3
    assert cli.fast_shell(["shell", "--name", "box", "--no-agent", "--", "echo", "a b", "--"]) == 3
    (kind, argv), = fake.calls
    assert argv[-1] == "echo 'a b' --" and "-a" in argv


def test_fast_shell_steps_aside_for_invoke_config(fake, monkeypatch):
    monkeypatch.setenv("INVOKE_CORE_VM_NAME", "other")
    assert cli.fast_shell(["shell", "--", "true"]) is None


def test_fast_shell_not_running_is_the_usual_error(capsys):
    assert cli.fast_shell(["shell", "--", "true"]) == 1
    assert capsys.readouterr().err == "Error: dev environment not running (run 'inv vm.boot' first)\n"

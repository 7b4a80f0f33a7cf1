"""test and serve with dependencies and fallbacks, the guest replaced by recorders: what is asked
of the guest, in which order, and what the user is told."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path

import pytest

from devops_tasks import dependencies, guest
from devops_tasks.config import Config
from devops_tasks.devops import DevOps
from devops_tasks.lifecycle import VM
from devops_tasks.options import ServeOptions, TestOptions


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Guest:
    """Records every guest call; ``probe`` is what the probe prints, ``codes`` the exit statuses
    of the runs in order (0 after they run out)."""

    def __init__(self):
        self.calls = []
        self.probe = ""
        self.codes = []


@pytest.fixture
def fake(monkeypatch, tmp_path):
    g = Guest()
    key = tmp_path / "id"
    key.write_text("k")
    monkeypatch.setattr(VM, "target", lambda self: guest.Target(port=40022, identity=key, known_hosts=key))
    monkeypatch.setattr(VM, "is_running", lambda self: True)  # running: test and serve boot nothing

    @contextlib.contextmanager
    def session(target, forward_agent=False):
        yield "conn"

    class Nothing:
        def __init__(self, *a, sock=None, **k):
            self.sock = sock

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            if self.sock is not None:
                self.sock.close()

    def capture(conn, command, timeout=30.0):
        g.calls.append(("probe", command))
        return 0, g.probe, ""

    def run(conn, command, cwd=None, env=None, **kw):
        g.calls.append(("run", command, cwd, env))
        return g.codes.pop(0) if g.codes else 0

    monkeypatch.setattr(guest, "session", session)
    monkeypatch.setattr(guest, "openssh_session", session)  # test and shell: over the OpenSSH master
    monkeypatch.setattr(guest, "Mount", Nothing)
    monkeypatch.setattr(guest, "open_mount", Nothing)
    monkeypatch.setattr(guest, "Forward", Nothing)
    monkeypatch.setattr(guest, "capture", capture)
    monkeypatch.setattr(guest, "run", run)
    return g


@pytest.fixture
def dev():
    lines = []
    devops = DevOps(Config(), echo=lines.append)
    devops.lines = lines
    return devops


def npm_project(tmp_path) -> Path:
    root = tmp_path / "node"
    root.mkdir()
    (root / "package.json").write_text(json.dumps({"scripts": {"test": "tape t.js"}, "devDependencies": {"tape": "1"}}))
    (root / "package-lock.json").write_text("{}")
    return root


def test_install_then_test_and_the_second_run_skips_it(dev, fake, tmp_path):
    root = npm_project(tmp_path)
    fake.probe = "have npm\n"
    assert dev.test(root) == 0
    kinds = [call[0] for call in fake.calls]
    assert kinds == ["probe", "run", "run"]
    setup, test = fake.calls[1], fake.calls[2]
    assert setup[1].startswith("(\nnpm ci\n) &&") and setup[2] == "/app"
    assert test[1:] == ("npm test", "/app", {})
    assert dev.lines == ["Running tests: npm test", "Installing dependencies (no node_modules): npm ci"]
    (root / "node_modules").mkdir()
    key = dependencies.plan(root).keys["npm"]
    fake.calls.clear()
    dev.lines.clear()
    fake.probe = f"have npm\nkey npm {key} node_modules\n"
    assert dev.test(root) == 0
    assert [call[0] for call in fake.calls] == ["probe", "run"]
    assert dev.lines[1] == "Dependencies up to date (package.json, package-lock.json unchanged): npm ci"


def test_a_failed_install_is_the_result_and_the_tests_do_not_run(dev, fake, tmp_path):
    root = npm_project(tmp_path)
    fake.probe = "have npm\n"
    fake.codes = [3]
    assert dev.test(root) == 3
    assert [call[0] for call in fake.calls] == ["probe", "run"]
    assert dev.lines[-1] == "Installing dependencies failed (exit status 3); the command did not run"


def test_the_venv_is_on_the_commands_path(dev, fake, tmp_path):
    root = tmp_path / "py"
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname='p'\ndependencies=['attrs']\n")
    fake.probe = "have python3-venv\n"
    dev.test(root, TestOptions(command=["python3", "-m", "pytest", "-q"]))
    env = fake.calls[-1][3]
    venv = f"{dependencies.state_dir(root)}/venv"
    assert fake.calls[-1][1] == "python3 -m pytest -q" and env["VIRTUAL_ENV"] == venv
    assert env["PATH"].startswith(f"{venv}/bin:")


def test_no_setup_no_fallback_no_probe(dev, fake, tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    (root / "pytest.ini").write_text("[pytest]\n")
    dev.test(root)
    assert fake.calls == [("run", "pytest", "/app", {})]


def test_task_falls_back_to_the_taskfile_commands_when_the_guest_has_no_task(dev, fake, tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    (root / "Taskfile.yml").write_text("version: '3'\ntasks:\n  test:\n    cmds: [go test ./...]\n")
    fake.probe = ""
    dev.test(root)
    assert fake.calls[0][0] == "probe" and "task" in fake.calls[0][1]
    assert fake.calls[-1][1] == "go test ./..."
    assert dev.lines == ["Running tests: task test",
                         "Note: task is not in this image: running the test task's cmds from Taskfile.yml with sh"]
    fake.calls.clear()
    fake.probe = "have task\n"
    dev.test(root)
    assert fake.calls[-1][1] == "task test"


def test_serve_a_composer_project_with_php_when_frankenphp_is_missing(dev, fake, tmp_path):
    root = tmp_path / "php"
    root.mkdir()
    (root / "composer.json").write_text("{}")
    fake.probe = "have php\n"
    port = free_port()
    dev.serve(root, ServeOptions(port=port))
    assert fake.calls[-1][1:] == (f"php -S 0.0.0.0:{port}", "/app", {"PORT": str(port)})
    assert "Note: FrankenPHP is not in this image: serving with PHP's built-in server (php -S)" in dev.lines

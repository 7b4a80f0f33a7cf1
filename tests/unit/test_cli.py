"""The ``devops`` program's shell fast path honours every config level the Invoke path does.

Two VMs look alive (a stand-in process whose command line carries each VM's pidfile, as QEMU's
does), each "forwarded" to a TCP listener of this test; which listener the program's ``ssh``
reaches shows which VM the name resolved to, through the fast path or through Invoke.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from devops_tasks import cli
from devops_tasks.machine.records import VMDir, VMRecord

BIN = Path(sys.executable).parent


class FakeVM:
    """A live-looking VM record whose SSH port is a listener that counts connections."""

    def __init__(self, name: str):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()
        vm = VMDir(name)
        vm.ensure()
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", str(vm.pidfile)])
        vm.save(VMRecord(id="0a1b2c3d", name=name, image="x", pid=self.proc.pid, process_start="",
                         started_at="2026-01-01T00:00:00Z", ssh_port=self.listener.getsockname()[1],
                         memory=512, cpus=1, status="running", pidfile=str(vm.pidfile)))

    def _serve(self) -> None:
        """Count each connection and hang up at once, so ssh fails fast."""
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def reached(self) -> bool:
        return self.connections > 0

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


@pytest.fixture
def two_vms(isolated_core_home):
    isolated_core_home.mkdir(parents=True, exist_ok=True)
    for name in ("id_ed25519", "known_hosts"):
        (isolated_core_home / name).write_text("")
    vms = {name: FakeVM(name) for name in ("core-dev", "other")}
    yield vms
    for vm in vms.values():
        vm.close()


def run_devops(args: list[str], extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_")}
    env.update(CORE_SSH_MULTIPLEX="0", **extra_env)
    env.pop("SSH_AUTH_SOCK", None)
    return subprocess.run([str(BIN / "devops"), *args], capture_output=True, text=True, env=env, timeout=60,
                          stdin=subprocess.DEVNULL)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


LEVELS = {
    "default": lambda home: ([], {}),
    "--name": lambda home: (["--name", "other"], {}),
    "~/.core/config.yaml": lambda home: write(home / ".core" / "config.yaml", "vm:\n  name: other\n") or ([], {}),
    "~/.invoke.yaml": lambda home: write(home / ".invoke.yaml", "core:\n  vm:\n    name: other\n") or ([], {}),
    "INVOKE_CORE_VM_NAME": lambda home: ([], {"INVOKE_CORE_VM_NAME": "other"}),
}


@pytest.mark.parametrize("level", LEVELS)
def test_each_config_level_picks_the_vm(level, two_vms, isolated_core_home):
    home = isolated_core_home.parent
    flags, env = LEVELS[level](home)
    result = run_devops(["shell", *flags, "--", "true"], env)
    assert result.returncode != 0  # the listener is no SSH server
    expected = "core-dev" if level == "default" else "other"
    reached = {name for name, vm in two_vms.items() if vm.reached()}
    assert reached == {expected}, result.stderr


@pytest.mark.parametrize("argv", [
    [], ["vm.boot"], ["shell", "--console"], ["shell", "--help"], ["-e", "shell"], ["shell", "-x"],
    ["shell", "--name"], ["test", "--", "true"],
])
def test_other_forms_go_to_invoke(argv):
    assert cli.fast_shell_args(argv, {"HOME": "/nonexistent"}) is None


def test_shell_flags_on_the_fast_path(tmp_path):
    env = {"HOME": str(tmp_path)}
    argv = ["shell", "--name", "x", "--no-agent", "--no-mount", "--project=p q", "--", "ls", "-l"]
    assert cli.fast_shell_args(argv, env) == cli.FastShell(name="x", words=["ls", "-l"], agent=False, mount=False,
                                                           project="p q")
    assert cli.fast_shell_args(["shell", "--project", "dir"], env) == cli.FastShell(project="dir")
    assert cli.fast_shell_args(["shell", "--project"], env) is None


def test_invoke_config_levels_send_the_shell_to_invoke(tmp_path):
    argv = ["shell", "--", "true"]
    assert cli.fast_shell_args(argv, {"HOME": str(tmp_path)}) == cli.FastShell(words=["true"])
    assert cli.fast_shell_args(argv, {"HOME": str(tmp_path), "INVOKE_CORE_VM_NAME": "x"}) is None
    (tmp_path / ".invoke.yml").write_text("")
    assert cli.fast_shell_args(argv, {"HOME": str(tmp_path)}) is None

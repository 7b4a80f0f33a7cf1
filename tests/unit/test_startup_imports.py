"""What the quick tasks load: ``inv vm.status`` and ``inv vm.list`` read a few files, so their
path imports neither the SSH stack (Fabric, Paramiko, the guest's mount and transfer modules)
nor the image sources and builder (requests, tqdm). Checked in a new interpreter, after the task
ran, from ``sys.modules``; no timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

RUN_TASKS = r"""
import json, sys
from invoke import Program
from devops_tasks.tasks import ns
for argv in ARGVS:
    try:
        Program(namespace=ns, name="inv", binary="inv").run(["inv", *argv], exit=False)
    except SystemExit as exc:
        if exc.code:
            raise
print(json.dumps(sorted(sys.modules)))
"""

NOT_ON_THE_STATUS_PATH = (
    "fabric", "paramiko", "cryptography", "requests", "urllib3", "tqdm",
    "devops_tasks.guest.commands", "devops_tasks.guest.mount", "devops_tasks.guest.openssh",
    "devops_tasks.guest.transfer", "devops_tasks.guest.sftp_server", "devops_tasks.guest.forward",
    "devops_tasks.guest.mux",
    "devops_tasks.workspace", "devops_tasks.images", "devops_tasks.sources", "devops_tasks.build",
    "devops_tasks.proxy", "devops_tasks.review", "devops_tasks.claude_code",
)


def loaded_after(argvs: list[list[str]], tmp_path) -> set[str]:
    env = {**os.environ, "CORE_HOME": str(tmp_path / "core"), "CORE_IMAGES_DIR": str(tmp_path / "images")}
    env = {key: value for key, value in env.items() if not key.startswith("INVOKE_")}
    done = subprocess.run([sys.executable, "-c", RUN_TASKS.replace("ARGVS", repr(argvs))], env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules for prefix in NOT_ON_THE_STATUS_PATH if m == prefix or m.startswith(prefix + "."))


@pytest.mark.parametrize("argvs", [
    [["vm.status"]],
    [["vm.status", "--json"]],
    [["vm.list"], ["vm.list", "--json"]],
])
def test_quick_tasks_import_nothing_heavy(argvs, tmp_path):
    folder = tmp_path / "core" / "vms" / "old"  # a stopped VM, as vm.list reads it
    folder.mkdir(parents=True)
    (folder / "last_boot.json").write_text(json.dumps({"memory": 512, "cpus": 1, "ssh_port": 2299}))
    assert heavy(loaded_after(argvs, tmp_path)) == []


def test_the_check_sees_what_a_task_does_import(tmp_path):
    """A control: the same check on ``vm.ssh-config``, which writes an OpenSSH block, sees guest.openssh."""
    folder = tmp_path / "core" / "vms" / "old"
    folder.mkdir(parents=True)
    (folder / "last_boot.json").write_text(json.dumps({"memory": 512, "cpus": 1, "ssh_port": 2299}))
    assert "devops_tasks.guest.openssh" in heavy(loaded_after([["vm.ssh-config", "--name", "old"]], tmp_path))



def run_inv(tmp_path, extra_env: dict[str, str]) -> tuple[set[str], set[str]]:
    """``inv vm.status`` as the ``inv`` program runs it (Invoke loads a tasks.py), the .pyc files
    going to a fresh ``PYTHONPYCACHEPREFIX``: (modules of this package cached, files cached from
    the project folder)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "tasks.py").write_text("from devops_tasks.tasks import ns  # noqa: F401\n")
    prefix = tmp_path / "pyc"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("INVOKE_", "PYTHON"))}
    env.update(CORE_HOME=str(tmp_path / "core"), CORE_IMAGES_DIR=str(tmp_path / "images"),
               PYTHONPYCACHEPREFIX=str(prefix), **extra_env)
    done = subprocess.run([sys.executable, "-c", "from invoke.main import program; program.run()", "-r",
                           str(project), "vm.status"], env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    cached = list(prefix.rglob("*.pyc"))
    ours = {path.name.split(".")[0] for path in cached if "devops_tasks" in path.parts}
    in_project = {path.name for path in cached if (prefix / str(project).lstrip("/")) in path.parents}
    return ours, in_project


def test_inv_caches_the_package_bytecode_but_not_tasks_py(tmp_path):
    """Invoke turns .pyc writing off for tasks.py's sake; the package turns it back on for itself."""
    ours, in_project = run_inv(tmp_path, {})
    assert {"config", "lifecycle", "records"} <= ours
    assert in_project == set()


def test_the_interpreter_setting_is_kept(tmp_path):
    assert run_inv(tmp_path, {"PYTHONDONTWRITEBYTECODE": "1"}) == (set(), set())

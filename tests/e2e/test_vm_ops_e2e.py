"""vm.list, vm.delete, vm.ssh-config (ssh, scp, rsync), vm.cp, vm.snapshot, vm.resize, ``inv shell`` in a project and
``inv test`` on a stopped VM, against real guests under TCG (the ``minimal`` image, free ports, a
temporary ~/.core). Every VM a test boots is stopped by the ``core`` fixture's finalizer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import needs
from devops_tasks import paths
from devops_tasks.machine.records import VMDir

from test_vm import core, guest_image, inv, known_lines, ssh  # noqa: F401  (fixtures and helpers)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXAMPLE = REPO / "examples" / "hello-pytest"
AWKWARD = ["a b.txt", "it's", 'quo"te', "new\nline", "é ü", "$(touch pwned)", "-dash", "*", "L" * 200]

# A snapshot of a tree as {relative name: (kind, mode, sha256 or link target)}: the same Python runs
# on the host and in the guest, so both sides of a copy are compared the same way.
TREE_SCRIPT = r"""
import hashlib, json, os, stat, sys
root = sys.argv[1]
out = {}
for base, dirs, files in os.walk(root):
    for name in dirs + files:
        path = os.path.join(base, name)
        info = os.lstat(path)
        rel = os.path.relpath(path, root).encode("utf-8", "surrogateescape").hex()
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            out[rel] = ["link", os.readlink(path)]
        elif stat.S_ISDIR(info.st_mode):
            out[rel] = ["dir", mode]
        else:
            with open(path, "rb") as handle:
                out[rel] = ["file", mode, hashlib.sha256(handle.read()).hexdigest(), int(info.st_mtime)]
print(json.dumps(out, sort_keys=True))
"""


def run(*argv: str, cwd: Path = REPO, timeout: float = 300, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=stdin)


def boot(*args: str) -> subprocess.CompletedProcess:
    result = inv("vm.boot", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def guest_sh(port: int, script: str) -> str:
    result = ssh(port, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    return result.stdout


def host_tree(root: Path) -> dict:
    return json.loads(run(sys.executable, "-c", TREE_SCRIPT, str(root)).stdout)


def guest_tree(port: int, root: str) -> dict:
    result = ssh(port, "python3", "-c", TREE_SCRIPT, root)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def make_tree(root: Path) -> Path:
    root.mkdir(parents=True)
    for index, name in enumerate(AWKWARD):
        (root / name).write_bytes(f"{name}\n".encode() * (index + 1))
    os.chmod(root / "a b.txt", 0o600)
    deeper = root / "sub dir" / "it's deeper"
    deeper.mkdir(parents=True)
    (deeper / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(deeper / "run.sh", 0o755)
    (deeper / "big.bin").write_bytes(os.urandom(1 << 20))
    os.chmod(root / "sub dir", 0o750)
    (root / "empty").mkdir()
    (root / "link").symlink_to("a b.txt")
    return root


def df_kib(port: int) -> int:
    line = guest_sh(port, "df -k / | tail -1").split()
    return int(line[1])


# --------------------------------------------------------------------------- list and delete


def test_list_two_vms_then_delete_one_and_boot_it_fresh(core, guest_image):
    core.install(guest_image, contract=True)
    boot("--name", "a")
    boot("--name", "b", "--memory", "640")
    port_a, port_b = VMDir("a").load().ssh_port, VMDir("b").load().ssh_port
    assert guest_sh(port_a, "echo old > /root/marker && sync") == ""

    rows = inv("vm.list").stdout.splitlines()
    assert rows[0].split() == ["NAME", "STATUS", "NETWORK", "MOUNT", "SSH", "MEMORY", "CPUS", "DISK", "IMAGE", "UPTIME"]
    mount = VMDir("a").load().mount_type or "sshfs"  # the default vm.mount_type (virtiofs on Linux)
    assert [row.split()[:7] for row in rows[1:]] == [
        ["a", "running", "open", mount, str(port_a), "512MB", "1"],
        ["b", "running", "open", mount, str(port_b), "640MB", "1"]]
    assert all("of 8.0 GiB" in row and "v0.0.1-test" in row for row in rows[1:])
    listed = {vm["name"]: vm for vm in json.loads(inv("vm.list", "--json").stdout)}
    assert set(listed) == {"a", "b"}
    assert listed["a"]["ssh_port"] == port_a and listed["a"]["disk_used"] > 0 and listed["a"]["uptime"] >= 0
    assert listed["b"]["memory"] == 640 and listed["b"]["image_version"] == "v0.0.1-test"

    assert inv("vm.stop", "--name", "b").returncode == 0
    stopped = {vm["name"]: vm for vm in json.loads(inv("vm.list", "--json").stdout)}["b"]
    assert (stopped["status"], stopped["ssh_port"], stopped["memory"]) == ("stopped", None, 640)

    refused = inv("vm.delete", "--name", "a")
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("Error: VM 'a' is running: stop it first ('inv vm.stop --name a') "
                                      "or delete it with --force")
    folder = VMDir("a").path
    assert folder.is_dir() and known_lines(port_a)
    deleted = inv("vm.delete", "--name", "a", "--force")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.splitlines()[-1].startswith("Deleted VM 'a' (freed ")
    assert not folder.exists() and known_lines(port_a) == []
    assert [vm["name"] for vm in json.loads(inv("vm.list", "--json").stdout)] == ["b"]
    missing = inv("vm.delete", "--name", "a")
    assert (missing.returncode, missing.stderr.strip()) == (1, "Error: no VM named 'a' (inv vm.list shows them)")

    boot("--name", "a")  # the name boots again, from a fresh disk with a new host key
    port_a = VMDir("a").load().ssh_port
    assert ssh(port_a, "test", "-e", "/root/marker").returncode == 1
    assert inv("vm.delete", "--name", "b").returncode == 0  # a stopped VM needs no --force
    assert [vm["name"] for vm in json.loads(inv("vm.list", "--json").stdout)] == ["a"]


# --------------------------------------------------------------------------- OpenSSH, copies, shell


def test_ssh_config_copies_and_shell_in_a_project(core, guest_image, tmp_path):
    core.install(guest_image, contract=True)
    boot()
    port = core.record().ssh_port

    # vm.ssh-config: ssh -F, scp -F both ways, and an Include line
    printed = inv("vm.ssh-config")
    assert printed.returncode == 0, printed.stderr
    config = tmp_path / "ssh config"
    config.write_text(printed.stdout)
    assert f"    Port {port}" in printed.stdout.splitlines()
    reached = run("ssh", "-F", str(config), "core-dev", "--", "echo", "hi from", "$(hostname)")
    assert (reached.returncode, reached.stdout) == (0, "hi from devops\n"), reached.stderr
    local = tmp_path / "up.txt"
    local.write_text("up\n")
    assert run("scp", "-F", str(config), str(local), "core-dev:/root/up.txt").returncode == 0
    assert guest_sh(port, "cat /root/up.txt") == "up\n"
    down = tmp_path / "down.txt"
    assert run("scp", "-F", str(config), "core-dev:/etc/hostname", str(down)).returncode == 0
    assert down.read_text() == "devops\n"
    rsync = needs.require_tool("rsync", "rsync")
    synced = tmp_path / "synced"
    assert run(rsync, "-a", "-e", f"ssh -F '{config}'", f"{tmp_path}/up.txt", "core-dev:/root/rsynced/").returncode == 0
    assert run(rsync, "-a", "-e", f"ssh -F '{config}'", "core-dev:/root/rsynced/", f"{synced}/").returncode == 0
    assert (synced / "up.txt").read_text() == "up\n"
    include = [line[2:] for line in printed.stdout.splitlines() if line.startswith("# Include ")]
    assert include == [f"Include {VMDir('core-dev').ssh_config}"]
    user_config = tmp_path / "user config"
    user_config.write_text(include[0] + "\n")
    assert run("ssh", "-F", str(user_config), "core-dev", "true").returncode == 0
    # a host key other than this VM's is refused (its own known_hosts file holds its key only)
    VMDir("core-dev").ssh_known_hosts.write_text(f"[127.0.0.1]:{port} ssh-ed25519 "
                                                 "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    spoofed = run("ssh", "-F", str(config), "core-dev", "true")
    assert spoofed.returncode != 0 and "Host key verification failed" in spoofed.stderr
    assert inv("vm.ssh-config").returncode == 0  # rewrites the VM's files from the pinned key
    assert run("ssh", "-F", str(config), "core-dev", "true").returncode == 0

    # vm.cp: a tree with awkward names both ways, compared on both sides
    tree = make_tree(tmp_path / "my tree 'q' $x")
    sent = inv("vm.cp", str(tree), ":/root")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip().endswith(f"to core-dev:/root/{tree.name}")
    assert guest_tree(port, f"/root/{tree.name}") == host_tree(tree)
    back = tmp_path / "back"
    back.mkdir()
    got = inv("vm.cp", f":/root/{tree.name}", str(back / "copy"))
    assert got.returncode == 0, got.stderr
    assert host_tree(back / "copy") == host_tree(tree)
    assert guest_sh(port, "ls /root; ls /tmp") .count("pwned") == 0 and not list(tmp_path.rglob("pwned"))
    for args, message in [
        ((str(tree), ":/no/such/folder/x"), "Error: vm.cp: the VM has no folder '/no/such/folder' (create it first)"),
        ((":/no/such/file", str(back)), "Error: vm.cp: '/no/such/file' does not exist in the VM"),
        ((str(tree), str(back)), "Error: vm.cp copies between this machine and the VM, but neither is written "
                                 ":PATH (e.g. inv vm.cp ./src :/root/src, or inv vm.cp :/root/out ./out)"),
    ]:
        failed = inv("vm.cp", *args)
        assert (failed.returncode, failed.stderr.strip()) == (1, message)
    assert ssh(port, "test", "-e", "/no").returncode == 1

    # inv shell in a project: mounted at /app, started there; --no-mount: a plain shell
    project = tmp_path / "proj 'x'"
    shutil.copytree(EXAMPLE, project)
    inv_bin = str(BIN / "inv")
    pwd = run(inv_bin, "shell", "--", "pwd", cwd=project)
    assert (pwd.returncode, pwd.stdout) == (0, "/app\n"), pwd.stderr
    listed = run(str(BIN / "devops"), "shell", "--", "sh", "-c", "ls /app; exit 3", cwd=project)
    assert listed.returncode == 3 and "hello.py" in listed.stdout.split()
    plain = run(inv_bin, "shell", "--no-mount", "--", "pwd", cwd=project)
    assert (plain.returncode, plain.stdout) == (0, "/root\n")
    assert guest_sh(port, "grep ' /app ' /proc/mounts; true") == ""  # unmounted when the shell ended


# --------------------------------------------------------------------------- snapshots and resize


def test_snapshot_restore_and_resize(core, guest_image):
    core.install(guest_image, contract=True)
    boot()
    port = core.record().ssh_port
    guest_sh(port, "echo saved > /root/state && sync")
    size_before = df_kib(port)
    running = inv("vm.snapshot", "--save", "clean")
    assert running.returncode == 1 and "is running: saving a snapshot needs it stopped" in running.stderr
    assert inv("vm.stop").returncode == 0

    saved = inv("vm.snapshot", "--save", "clean")
    assert (saved.returncode, saved.stdout) == (0, "Saved snapshot 'clean' of VM 'core-dev'\n"), saved.stderr
    dup = inv("vm.snapshot", "--save", "clean")
    assert dup.stderr.strip() == "Error: VM 'core-dev' already has a snapshot 'clean' (delete it first: --delete clean)"
    assert [s["tag"] for s in json.loads(inv("vm.snapshot", "--json").stdout)] == ["clean"]

    boot()
    guest_sh(port, "echo changed > /root/state && touch /root/new-file && sync")
    assert inv("vm.stop").returncode == 0
    missing = inv("vm.snapshot", "--restore", "nope")
    assert missing.stderr.strip() == "Error: VM 'core-dev' has no snapshot 'nope' (it has: clean)"
    restored = inv("vm.snapshot", "--restore", "clean")
    assert restored.returncode == 0, restored.stderr

    shrink = inv("vm.resize", "--disk", "4G")
    assert shrink.returncode == 1 and "shrinking is refused" in shrink.stderr
    grown = inv("vm.resize", "--disk", "+2G")
    assert grown.returncode == 0, grown.stderr
    assert grown.stdout.splitlines()[0] == "Disk of VM 'core-dev': 8.0 GiB -> 10.0 GiB"

    boot()
    port = core.record().ssh_port
    assert guest_sh(port, "cat /root/state; test -e /root/new-file || echo gone") == "saved\ngone\n"
    size_after = df_kib(port)
    assert 2 * 1024 * 1024 * 0.95 < size_after - size_before <= 2 * 1024 * 1024, (size_before, size_after)
    assert "devops-tasks: root file system grown to" in (paths.vms_dir() / "core-dev" / "serial.log").read_text()
    listed = json.loads(inv("vm.list", "--json").stdout)[0]
    assert listed["disk_size"] == 10 << 30


# --------------------------------------------------------------------------- inv test boots


def test_inv_test_boots_a_stopped_vm(core, guest_image, tmp_path):
    core.install(guest_image, contract=True)
    project = tmp_path / "proj"
    shutil.copytree(EXAMPLE, project)
    result = run(str(BIN / "inv"), "test", cwd=project, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Dev environment not running, booting..."
    assert "Dev environment running" in lines and "Running tests: pytest" in lines
    assert " passed" in result.stdout
    assert core.record() is not None and core.record().status == "running"

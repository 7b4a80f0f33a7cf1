"""vm.list, vm.delete, vm.ssh-config, vm.snapshot and vm.resize without a guest.

The disks are real qcow2 files made and read with qemu-img / qemu-io (no QEMU machine runs); a
"running" VM is a sleeping process whose command line holds the VM's pidfile, as QEMU's does.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from devops_tasks import hostkeys, lifecycle, paths, vms
from devops_tasks.config import Config
from devops_tasks.errors import GuestError, VMError
from devops_tasks.lifecycle import VM
from devops_tasks.machine import disk
from devops_tasks.machine.records import VMDir, VMRecord, vm_folders, process_start
from devops_tasks.tasks import vm as vm_tasks

import needs

GIB = 1 << 30
pytestmark = needs.mark(needs.tool_problem("qemu-img", "qemu-utils") or needs.tool_problem("qemu-io", "qemu-utils"))


def quiet_vm(name: str = "core-dev") -> VM:
    vm = VM(name, Config(), echo=lambda line: None)
    return vm


def make_disk(name: str = "core-dev", size: str = "64M") -> VMDir:
    folder = VMDir(name)
    folder.ensure()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(folder.disk), size], check=True)
    return folder


def qemu_io(path, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], capture_output=True, text=True)


@pytest.fixture
def running(tmp_path):
    """Start a fake QEMU for a VM folder: a sleeper whose command line holds the pidfile path."""
    procs = []

    def start(folder: VMDir, port: int = 40022) -> VMRecord:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(folder.pidfile)])
        procs.append(proc)
        record = VMRecord(id="0a1b2c3d", name=folder.name, image="/img", pid=proc.pid,
                          process_start=process_start(proc.pid), started_at="2026-01-01T00:00:00Z",
                          ssh_port=port, memory=768, cpus=3, ports={"ssh": port}, status="running",
                          pidfile=str(folder.pidfile))
        folder.save(record)
        return record

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("text, current, expected", [
    ("20G", 8 * GIB, 20 * GIB),
    ("+2G", 8 * GIB, 10 * GIB),
    ("+2g", 8 * GIB, 10 * GIB),
    ("10240M", 0, 10 * GIB),
    ("10GiB", 0, 10 * GIB),
    ("1.5G", 0, 3 * GIB // 2),
    ("1000000", 0, 1 << 20),  # bytes, rounded up to a whole MiB
])
def test_parse_size(text, current, expected):
    assert disk.parse_size(text, current) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1G", "0", "2X", "G", "+"])
def test_parse_size_refuses_non_sizes(text):
    with pytest.raises(VMError, match="is not a size"):
        disk.parse_size(text, 8 * GIB)


def test_shrinking_and_oversize_are_refused():
    with pytest.raises(VMError, match="shrinking is refused"):
        disk.check_resize(8 * GIB, 4 * GIB, "4G")
    with pytest.raises(VMError, match="2 TiB"):
        disk.check_resize(8 * GIB, 3 << 40, "3T")
    disk.check_resize(8 * GIB, 8 * GIB, "8G")


def test_virtual_size_reads_the_header_and_resize_grows_it(isolated_core_home):
    folder = make_disk(size="64M")
    assert disk.virtual_size(folder.disk) == 64 << 20
    old, new = vms.resize_disk(quiet_vm(), "+64M")
    assert (old, new) == (64 << 20, 128 << 20)
    assert disk.virtual_size(folder.disk) == 128 << 20
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(folder.disk)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == 128 << 20
    with pytest.raises(VMError, match="shrinking is refused"):
        vms.resize_disk(quiet_vm(), "64M")
    assert disk.virtual_size(folder.disk) == 128 << 20  # nothing changed
    (isolated_core_home / "not-qcow2").write_bytes(b"x" * 64)
    with pytest.raises(VMError, match="not a qcow2"):
        disk.virtual_size(isolated_core_home / "not-qcow2")


def test_resize_needs_a_stopped_vm_with_a_disk(isolated_core_home, running):
    with pytest.raises(VMError, match="no VM named 'core-dev'"):
        vms.resize_disk(quiet_vm(), "+1G")
    VMDir("core-dev").ensure()
    with pytest.raises(VMError, match="has no disk yet"):
        vms.resize_disk(quiet_vm(), "+1G")
    folder = make_disk()
    running(folder)
    with pytest.raises(VMError, match="is running: resizing its disk needs it stopped"):
        vms.resize_disk(quiet_vm(), "+1G")
    assert disk.virtual_size(folder.disk) == 64 << 20


# --------------------------------------------------------------------------- snapshots


def test_snapshot_save_restore_delete_bring_the_disk_back(isolated_core_home):
    folder = make_disk()
    vm = quiet_vm()
    assert qemu_io(folder.disk, "write -P 0xab 0 64k").returncode == 0
    saved = vms.save_snapshot(vm, "before")
    assert saved.tag == "before" and saved.created > 0
    assert qemu_io(folder.disk, "write -P 0xcd 0 64k").returncode == 0
    vms.resize_disk(vm, "+64M")
    vms.restore_snapshot(vm, "before")
    assert qemu_io(folder.disk, "read -P 0xab 0 64k").returncode == 0
    assert "Pattern verification failed" not in qemu_io(folder.disk, "read -P 0xab 0 64k").stdout
    assert disk.virtual_size(folder.disk) == 64 << 20  # its size too
    vms.save_snapshot(vm, "second")
    assert [s.tag for s in vms.snapshots(vm)] == ["before", "second"]
    vms.delete_snapshot(vm, "before")
    assert [s.tag for s in vms.snapshots(vm)] == ["second"]


def test_snapshot_errors_change_nothing(isolated_core_home, running):
    folder = make_disk()
    vm = quiet_vm()
    vms.save_snapshot(vm, "a")
    with pytest.raises(VMError, match="already has a snapshot 'a'"):
        vms.save_snapshot(vm, "a")
    with pytest.raises(VMError, match=r"has no snapshot 'b' \(it has: a\)"):
        vms.restore_snapshot(vm, "b")
    with pytest.raises(VMError, match="has no snapshot 'b'"):
        vms.delete_snapshot(vm, "b")
    for bad in ("12", "", "a b", "-x", "x/y", "a" * 64):
        with pytest.raises(VMError, match="invalid snapshot tag"):
            vms.save_snapshot(vm, bad)
    running(folder)
    with pytest.raises(VMError, match="is running: saving a snapshot needs it stopped"):
        vms.save_snapshot(vm, "c")
    with pytest.raises(VMError, match="is running: restoring a snapshot needs it stopped"):
        vms.restore_snapshot(vm, "a")
    assert [s.tag for s in vms.snapshots(vm)] == ["a"]  # listing works while it runs


def test_snapshot_refuses_while_a_boot_holds_the_lock(isolated_core_home):
    from devops_tasks.fsutil import file_lock

    folder = make_disk()
    with file_lock(folder.lock_path):
        child = subprocess.run(
            [sys.executable, "-c",
             "from devops_tasks import vms; from devops_tasks.lifecycle import VM\n"
             "try:\n    vms.save_snapshot(VM('core-dev'), 'x')\nexcept Exception as e:\n    print(e)"],
            capture_output=True, text=True, timeout=60)
    assert "is busy (a boot is in progress)" in child.stdout
    assert disk.snapshots(folder.disk) == []


def test_parse_snapshots_ignores_junk():
    info = {"snapshots": [{"name": "b", "date-sec": 20}, {"name": "a", "date-sec": 10}, {"id": "3"}, "x"]}
    assert [s.tag for s in disk.parse_snapshots(info)] == ["a", "b"]
    assert disk.parse_snapshots({}) == []


# --------------------------------------------------------------------------- list


def test_list_every_folder_running_stopped_and_never_booted(isolated_core_home, running):
    up = make_disk("up")
    running(up, port=40100)
    down = make_disk("down")
    down.last_boot.write_text(json.dumps({"memory": 512, "cpus": 1, "ssh_port": 40101, "network": "open",
                                          "image_version": "minimal-abc"}))
    VMDir("fresh").ensure()
    (paths.vms_dir() / ".ports.lock").write_text("")  # not a VM
    (paths.vms_dir() / "not a name").mkdir()
    found = {vm.name: vm for vm in vms.list_vms()}
    assert sorted(found) == ["down", "fresh", "up"]
    assert found["up"].status == "running" and found["up"].ssh_port == 40100
    assert (found["up"].memory, found["up"].cpus) == (768, 3) and found["up"].uptime > 0
    assert found["down"].status == "stopped" and found["down"].ssh_port is None
    assert (found["down"].memory, found["down"].cpus, found["down"].image_version) == (512, 1, "minimal-abc")
    assert found["down"].disk_size == 64 << 20 and found["down"].disk_used > 0 and found["down"].uptime == 0
    assert found["fresh"] == vms.VMSummary("fresh", "stopped", "open", None, 0, 0, 0, 0, "", 0)
    rows = vm_tasks.table(vm_tasks.list_rows([found["down"], found["up"]]))
    assert rows[0].split() == list(vm_tasks.LIST_COLUMNS)
    assert rows[1].split()[:7] == ["down", "stopped", "open", "sshfs", "-", "512MB", "1"]
    assert rows[2].split()[:7] == ["up", "running", "open", "sshfs", "40100", "768MB", "3"]
    assert set(found["up"].to_dict()) == {"name", "status", "network", "ssh_port", "memory", "cpus",
                                          "disk_used", "disk_size", "image_version", "uptime", "mount_type"}


def test_list_survives_an_unreadable_record(isolated_core_home):
    folder = make_disk("broken")
    folder.record.write_text("{not json")
    (found,) = vms.list_vms()
    assert found.status == "unknown"


def test_vm_folders_without_a_vms_dir(isolated_core_home):
    assert vm_folders() == [] and vms.list_vms() == []


# --------------------------------------------------------------------------- delete


def known_hosts_lines() -> list[str]:
    try:
        return paths.known_hosts_path().read_text().splitlines()
    except FileNotFoundError:
        return []


def test_delete_removes_the_folder_and_only_its_own_known_hosts_line(isolated_core_home, running):
    folder = make_disk("gone")
    folder.last_boot.write_text(json.dumps({"ssh_port": 40200}))
    other = make_disk("other")
    running(other, port=40201)
    hostkeys.replace_host_keys(40200, ["ssh-ed25519 AAAAgone"])
    hostkeys.replace_host_keys(40201, ["ssh-ed25519 AAAAother"])
    paths.known_hosts_path().write_text(paths.known_hosts_path().read_text() + "example.com ssh-ed25519 AAAAkept\n")
    freed = vms.delete(quiet_vm("gone"))
    assert freed > 0
    assert not folder.path.exists()
    assert known_hosts_lines() == ["[127.0.0.1]:40201 ssh-ed25519 AAAAother", "example.com ssh-ed25519 AAAAkept"]
    with pytest.raises(VMError, match="no VM named 'gone'"):
        vms.delete(quiet_vm("gone"))


def test_delete_keeps_a_port_another_running_vm_uses_now(isolated_core_home, running):
    folder = make_disk("old")
    folder.last_boot.write_text(json.dumps({"ssh_port": 40300}))
    running(make_disk("new"), port=40300)
    hostkeys.replace_host_keys(40300, ["ssh-ed25519 AAAAnew"])
    vms.delete(quiet_vm("old"))
    assert known_hosts_lines() == ["[127.0.0.1]:40300 ssh-ed25519 AAAAnew"]


def test_delete_refuses_a_running_vm_unless_forced(isolated_core_home, running):
    folder = make_disk("busy")
    record = running(folder, port=40400)
    with pytest.raises(VMError, match="is running: stop it first .* or delete it with --force"):
        vms.delete(quiet_vm("busy"))
    assert folder.disk.exists()
    vms.delete(quiet_vm("busy"), force=True)
    assert not folder.path.exists()
    from devops_tasks.machine.records import is_alive

    assert not is_alive(record)


def test_delete_an_unreadable_record_needs_force(isolated_core_home):
    folder = make_disk("broken")
    folder.record.write_text("{not json")
    with pytest.raises(VMError, match="unreadable record"):
        vms.delete(quiet_vm("broken"))
    vms.delete(quiet_vm("broken"), force=True)
    assert not folder.path.exists()


# --------------------------------------------------------------------------- ssh config


def test_remember_boot_and_ssh_config(isolated_core_home, running, tmp_path):
    folder = make_disk("box")
    hostkeys.replace_host_keys(40500, ["ssh-ed25519 AAAAbox"])
    hostkeys.replace_host_keys(40501, ["ssh-ed25519 AAAAsomeoneelse"])
    record = running(folder, port=40500)
    lifecycle.remember_boot(folder, record, "minimal-1")
    assert json.loads(folder.last_boot.read_text()) == {
        "memory": 768, "cpus": 3, "ssh_port": 40500, "network": "open", "image_version": "minimal-1",
        "mount_type": "sshfs", "booted_at": "2026-01-01T00:00:00Z"}
    assert folder.ssh_known_hosts.read_text() == "[127.0.0.1]:40500 ssh-ed25519 AAAAbox\n"
    config = vms.ssh_config(quiet_vm("box"))
    assert config.running and config.path == folder.ssh_config
    assert folder.ssh_config.read_text() == config.text
    assert config.include == f"Include {folder.ssh_config}"
    assert f"# {config.include}" in config.text.splitlines()
    # OpenSSH itself reads the block (ssh -G prints the effective options without connecting).
    ssh = needs.require_tool("ssh", "openssh-client")
    effective = subprocess.run([ssh, "-G", "-F", str(folder.ssh_config), "box"], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    for line in ("hostname 127.0.0.1", "port 40500", "user root", "stricthostkeychecking true",
                 "identitiesonly yes", f"identityfile {hostkeys.login_key_path()}",
                 f"userknownhostsfile {folder.ssh_known_hosts}", "passwordauthentication no", "forwardagent no"):
        assert line in effective, line


def test_ssh_config_of_a_stopped_or_never_booted_vm(isolated_core_home):
    folder = make_disk("box")
    with pytest.raises(VMError, match="has never booted"):
        vms.ssh_config(quiet_vm("box"))
    folder.last_boot.write_text(json.dumps({"ssh_port": 40600}))
    config = vms.ssh_config(quiet_vm("box"))
    assert not config.running and "    Port 40600" in config.text.splitlines()
    with pytest.raises(VMError, match="no VM named"):
        vms.ssh_config(quiet_vm("nope"))


def test_ssh_config_paths_are_quoted_and_percent_escaped(tmp_path, monkeypatch):
    home = tmp_path / "my home 100%"
    monkeypatch.setenv("CORE_HOME", str(home))
    text = lifecycle.ssh_config_text("box", 40700)
    assert f'    IdentityFile "{home}/id_ed25519"'.replace("%", "%%") in text.splitlines()
    assert lifecycle.include_line(VMDir("box").ssh_config) == f'Include "{home}/vms/box/ssh_config"'
    folder = VMDir("box")
    folder.ensure()
    folder.ssh_config.write_text(text)
    ssh = needs.require_tool("ssh", "openssh-client")
    effective = subprocess.run([ssh, "-G", "-F", str(folder.ssh_config), "box"], capture_output=True, text=True,
                               check=True).stdout
    # unquoted, the % tokens expanded (ssh -G shows IdentityFile before its expansion)
    assert f"userknownhostsfile {home}/vms/box/ssh_known_hosts\n" in effective
    monkeypatch.setenv("CORE_HOME", str(tmp_path / 'a"b'))
    with pytest.raises(GuestError, match="double quote or a line break"):
        lifecycle.ssh_config_text("box", 40700)

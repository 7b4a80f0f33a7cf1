"""Per-VM records, liveness (dead, zombie, reused PIDs), ports, QMP, stop escalation, status text."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest

from devops_tasks import lifecycle, paths
from devops_tasks.tasks import vm as vm_tasks
from devops_tasks.errors import VMError
from devops_tasks.machine import process
from devops_tasks.machine.ports import pick_port, port_free
from devops_tasks.machine.records import (VMDir, VMRecord, all_names, is_vm_process,
                                          process_start, validate_name)
from devops_tasks.options import DevStatus


def make_record(vm: VMDir, pid: int, start: str, **changes) -> VMRecord:
    data = dict(id="0a1b2c3d", name=vm.name, image="/img.qcow2", pid=pid, process_start=start,
                started_at="2026-01-01T00:00:00Z", ssh_port=2222, memory=512, cpus=2, ports={"ssh": 2222},
                status="running", pidfile=str(vm.pidfile))
    data.update(changes)
    return VMRecord(**data)


@pytest.fixture
def sleeper(tmp_path):
    """A process whose command line holds a marker, like QEMU's holds its pidfile path."""
    marker = str(tmp_path / "marker.pid")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    yield proc, marker
    proc.kill()
    proc.wait()


def test_record_round_trip_and_layout(isolated_core_home):
    vm = VMDir("core-dev")
    assert vm.path == paths.vms_dir() / "core-dev"
    vm.ensure()
    record = make_record(vm, 123, "456")
    vm.save(record)
    assert json.loads(vm.record.read_text())["id"] == "0a1b2c3d"
    assert vm.load() == record
    assert all_names() == ["core-dev"]
    vm.clear()
    assert vm.load() is None and all_names() == []


def test_unknown_record_keys_are_ignored(isolated_core_home):
    vm = VMDir("a")
    vm.ensure()
    data = json.loads(make_record(vm, 1, "2").to_json())
    data["future_field"] = True
    vm.record.write_text(json.dumps(data))
    assert vm.load().pid == 1


def test_corrupt_record_is_a_clear_error(isolated_core_home):
    vm = VMDir("a")
    vm.ensure()
    vm.record.write_text("{not json")
    with pytest.raises(VMError, match="unreadable VM record"):
        vm.load()


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "a b", "x" * 64, ".."])
def test_bad_names(name):
    with pytest.raises(VMError, match="invalid VM name"):
        validate_name(name)


@pytest.fixture
def short_tmp(monkeypatch):
    """A short temp dir standing in for /tmp (where sockets of long VM paths go)."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="dt-", dir="/tmp")
    monkeypatch.setattr("tempfile.tempdir", path)
    yield path
    shutil.rmtree(path)


def test_long_paths_move_sockets_to_a_short_dir(tmp_path, short_tmp):
    vm = VMDir("core-dev", root=tmp_path / ("d" * 120))
    assert len(str(vm.serial_socket)) < 100
    assert vm.socket_dir != vm.path
    assert VMDir("core-dev", root=tmp_path / ("d" * 120)).socket_dir == vm.socket_dir
    assert VMDir("x", root=tmp_path).socket_dir == tmp_path / "x"
    vm.ensure()
    assert vm.socket_dir.is_dir() and vm.socket_dir.parent.stat().st_mode & 0o777 == 0o700


def test_shared_socket_dir_must_be_private(tmp_path, short_tmp):
    vm = VMDir("core-dev", root=tmp_path / ("d" * 120))
    vm.socket_dir.parent.mkdir(mode=0o777)
    vm.socket_dir.parent.chmod(0o777)
    with pytest.raises(VMError, match="not a private folder"):
        vm.ensure()


def test_liveness_of_the_real_process(sleeper):
    proc, marker = sleeper
    start = process_start(proc.pid)
    assert start
    assert is_vm_process(proc.pid, start, marker)
    assert not is_vm_process(proc.pid, str(int(start) + 1), marker), "reused PID: other start time"
    assert not is_vm_process(proc.pid, start, "/other/vm/qemu.pid"), "reused PID: other command line"


def test_dead_pid_is_stopped():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not is_vm_process(proc.pid, "", "")


def test_zombie_is_stopped(tmp_path):
    marker = str(tmp_path / "zombie")
    proc = subprocess.Popen([sys.executable, "-c", "pass", marker])
    deadline = time.monotonic() + 10
    while open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        os.kill(proc.pid, 0)  # kill(pid, 0) still says alive: the original's bug
        assert not is_vm_process(proc.pid, "", marker)
    finally:
        proc.wait()


def test_stale_record_is_cleaned_but_not_during_a_boot(isolated_core_home):
    vm = VMDir("core-dev")
    vm.ensure()
    vm.save(make_record(vm, 999999999, "1"))
    with vm.locked():  # a boot in progress holds the lock: leave its record alone
        assert lifecycle.live_record("core-dev") is None
        assert vm.record.exists()
    assert lifecycle.live_record("core-dev") is None
    assert not vm.record.exists()


def test_live_record_and_running_vms(isolated_core_home, sleeper):
    proc, marker = sleeper
    vm = VMDir("one")
    vm.ensure()
    vm.save(make_record(vm, proc.pid, process_start(proc.pid), pidfile=marker))
    dead = VMDir("two")
    dead.ensure()
    dead.save(make_record(dead, 999999999, "1"))
    assert lifecycle.running_vms() == ["one"]
    assert not dead.record.exists()
    assert lifecycle._ports_in_use(except_name="x") == {2222}
    assert lifecycle._ports_in_use(except_name="one") == set()


def test_pick_port():
    taken = {2222, 2223}
    free = lambda p: p not in taken  # noqa: E731
    assert pick_port(None, 2222, free=free) == 2224
    assert pick_port(None, 2222, reserved={2224}, free=free) == 2225
    assert pick_port(3000, 2222, free=free) == 3000
    with pytest.raises(VMError, match="SSH port 2222 is already in use on 127.0.0.1"):
        pick_port(2222, 2222, free=free)
    with pytest.raises(VMError, match="already in use"):
        pick_port(4000, 2222, reserved={4000}, free=free)
    with pytest.raises(VMError, match="no free SSH port"):
        pick_port(None, 2222, free=lambda p: False, span=3)


def test_port_free_sees_a_listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_free(port)
    assert port_free(port)


def test_stop_escalates_to_sigterm_without_qmp(sleeper):
    proc, marker = sleeper
    start = process_start(proc.pid)
    assert process.stop(proc.pid, start, marker, None) == "term"
    assert proc.wait(timeout=5) == -signal.SIGTERM


def test_stop_escalates_to_sigkill(tmp_path):
    marker = str(tmp_path / "stubborn")
    code = "import signal, time, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, marker], stdout=subprocess.PIPE)
    proc.stdout.readline()
    timeouts = process.StopTimeouts(powerdown=0.1, quit=0.1, term=0.3, kill=5)
    assert process.stop(proc.pid, process_start(proc.pid), marker, tmp_path / "no.sock", timeouts) == "kill"
    assert proc.wait(timeout=5) == -signal.SIGKILL


def test_stop_never_signals_another_process(sleeper):
    proc, marker = sleeper
    assert process.stop(proc.pid, "1", marker, None) == "term"  # wrong start time: not ours
    assert proc.poll() is None


def fake_qmp_server(path, seen):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def serve():
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for line in f:
                message = json.loads(line)
                seen.append(message["execute"])
                f.write(b'{"event": "SOMETHING"}\n')
                if message["execute"] == "query-status":
                    f.write(b'{"return": {"status": "running"}}\n')
                elif message["execute"] == "bogus":
                    f.write(b'{"error": {"class": "CommandNotFound", "desc": "no bogus"}}\n')
                else:
                    f.write(b'{"return": {}}\n')
                f.flush()
        server.close()

    threading.Thread(target=serve, daemon=True).start()


def test_qmp_client(tmp_path):
    seen = []
    fake_qmp_server(tmp_path / "q.sock", seen)
    assert process.qmp(tmp_path / "q.sock", "query-status") == {"status": "running"}
    assert seen == ["qmp_capabilities", "query-status"]
    fake_qmp_server(tmp_path / "r.sock", seen)
    with pytest.raises(VMError, match="no bogus"):
        process.qmp(tmp_path / "r.sock", "bogus")


def test_start_error_names_the_port():
    msg = process.start_error("qemu: -netdev user,...: Could not set up host forwarding rule 'tcp:127.0.0.1:2222-:22'", 1)
    assert msg.startswith("QEMU could not forward the SSH port (is it taken?)")
    assert process.start_error("", 1) == "QEMU failed to start: exit status 1"


def test_wait_for_marker(tmp_path):
    log = tmp_path / "serial.log"
    log.write_bytes(b"booting...\r\ndevops-tasks: ss")

    def later():
        time.sleep(0.1)
        with open(log, "ab") as f:
            f.write(b"h ready\r\n")

    threading.Thread(target=later).start()
    lifecycle.wait_for_marker(log, lifecycle.READY_MARKER, time.monotonic() + 5, lambda: True,
                              lambda: AssertionError("timeout"))


def test_wait_for_marker_fails_with_the_log_tail(tmp_path):
    log = tmp_path / "serial.log"
    log.write_bytes(b"line one\nKernel panic - not syncing\n")
    with pytest.raises(VMError, match=r"QEMU exited during boot; last lines of the serial log .*\n  line one\n  Kernel panic"):
        lifecycle.wait_for_marker(log, lifecycle.READY_MARKER, time.monotonic() + 5, lambda: False, None)
    vm = VMDir("x", root=tmp_path)
    vm.path.mkdir()
    vm.serial_log.write_text("stuck in firmware\n")
    with pytest.raises(VMError, match=r"did not become ready within 0s .*\n  stuck in firmware"):
        lifecycle.wait_for_marker(vm.serial_log, b"never", time.monotonic(), lambda: True,
                                  lambda: lifecycle._not_ready(vm, 0))


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"),
                                           (3600, "1h 0m"), (3 * 3600 + 25 * 60, "3h 25m"),
                                           (86400, "1d 0h"), (2 * 86400 + 5 * 3600 + 59, "2d 5h")])
def test_format_uptime(seconds, text):
    assert vm_tasks.format_uptime(seconds) == text


def test_status_lines():
    running = DevStatus(installed=True, running=True, image_version="v1.2.0", container_id="0a1b2c3d",
                        memory=4096, cpus=2, ssh_port=2222, uptime=timedelta(seconds=125), network="restricted",
                        mount_type="virtiofs")
    assert vm_tasks.status_lines(running) == [
        "Dev Environment Status", "Installed: Yes", "Version: v1.2.0", "Status: Running",
        "Container: 0a1b2c3d", "Memory: 4096MB", "CPUs: 2", "SSH port: 2222", "Network: restricted",
        "Mount type: virtiofs", "Uptime: 2m",
    ]
    assert running.to_dict()["network"] == "restricted"
    assert vm_tasks.status_lines(DevStatus()) == ["Dev Environment Status", "Installed: No", "Status: Stopped"]


def test_uptime_from_record(isolated_core_home):
    from datetime import datetime, timezone

    record = make_record(VMDir("a"), 1, "1", started_at="2026-01-01T00:00:00Z")
    assert record.uptime_seconds(datetime(2026, 1, 1, 0, 1, 5, tzinfo=timezone.utc)) == 65


def test_boot_refuses_without_image(isolated_core_home, monkeypatch, tmp_path):
    from devops_tasks.devops import DevOps

    monkeypatch.setenv("CORE_IMAGES_DIR", str(tmp_path / "images"))
    d = DevOps(echo=lambda _: None)
    with pytest.raises(VMError, match=r"^dev image not installed \(run 'inv image.install' or 'inv image.build' first\)$"):
        d.boot()


def test_stop_when_not_running(isolated_core_home):
    from devops_tasks.devops import DevOps

    lines = []
    d = DevOps(echo=lines.append)
    assert d.stop() is False
    assert lines == ["Dev environment is not running"]
    assert d.is_running() is False
    assert d.status().running is False


@pytest.mark.parametrize("port", [0, -1, 65536, 70000])
def test_an_explicit_port_out_of_range_is_an_error_not_the_default(port):
    with pytest.raises(VMError, match=rf"invalid SSH port {port} \(use 1-65535\)"):
        pick_port(port, 2222, free=lambda p: True)


def test_a_vm_folder_is_private_and_an_old_loose_one_is_fixed(isolated_core_home):
    vm = VMDir("loose")
    vm.path.mkdir(parents=True, mode=0o755)
    os.chmod(vm.path, 0o755)
    (vm.path / "serial.log").write_text("root console")
    os.chmod(vm.path / "serial.log", 0o644)
    vm.ensure()
    assert vm.path.stat().st_mode & 0o777 == 0o700
    assert (vm.path / "serial.log").stat().st_mode & 0o777 == 0o600


def test_what_qemu_creates_in_the_vm_folder_is_private(tmp_path):
    from devops_tasks.machine import process

    pidfile, made = tmp_path / "qemu.pid", tmp_path / "serial.log"
    script = f"echo $$ > {pidfile}; echo hi > {made}"
    process.start(["sh", "-c", script], pidfile, tmp_path / "stderr")
    assert made.stat().st_mode & 0o777 == 0o600


def test_a_path_the_guestfwd_command_cannot_take_moves_sockets_to_a_plain_dir(tmp_path, short_tmp):
    vm = VMDir("core-dev", root=tmp_path / "my vms")
    assert vm.socket_dir != vm.path and " " not in str(vm.proxy_socket)
    assert vm.proxy_socket.name == "proxy.sock" and vm.proxy_log == vm.path / "proxy.log"


def test_a_record_from_before_network_modes_is_open(tmp_path):
    vm = VMDir("old", root=tmp_path)
    vm.path.mkdir()
    data = json.loads(make_record(vm, 1, "1").to_json())
    del data["network"], data["proxy_socket"]
    vm.record.write_text(json.dumps(data))
    assert vm.load().network == "open"

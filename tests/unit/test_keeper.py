"""mount_keeper (``vm.mount_idle_timeout``: a project mount kept between commands) against the local
stand-in of test_mux (a fake ``ssh`` running the guest's side here): the keeper process is real, and
so are its socket, sshfs and the sandboxed sftp-server. The real VM: tests/e2e/test_workspace_e2e.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from devops_tasks import guest
from devops_tasks.errors import GuestError
from devops_tasks import mount_keeper as keeper
from test_guest_mount import mounted_at, needs_fuse, point, project  # noqa: F401  (fixtures)
from test_mux import session, wait_for  # noqa: F401  (fixture)


@pytest.fixture
def target(session, tmp_path):  # noqa: F811
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    where = guest.Target(port=40022, identity=session.target.identity, known_hosts=session.target.known_hosts,
                         vm_dir=vm_dir)
    yield where
    keeper.stop_all(vm_dir)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@needs_fuse
def test_the_mount_outlives_the_command_then_ends_when_idle(target, point, project):  # noqa: F811
    with keeper.lease(target, project, idle_timeout=3, guest_dir=str(point)):
        assert (point / "hello.txt").read_text() == "hello\n"
        [info] = keeper.live_mounts(target.vm_dir)
        assert (info["project"], info["leases"], info["ends_in"]) == (str(project), 1, None)
    [info] = keeper.live_mounts(target.vm_dir)
    assert info["leases"] == 0 and 0 <= info["ends_in"] <= 3
    assert (point / "hello.txt").exists()  # kept
    pid = info["pid"]
    with keeper.lease(target, project, idle_timeout=3, guest_dir=str(point)):  # the same keeper
        assert [m["pid"] for m in keeper.live_mounts(target.vm_dir)] == [pid]
    assert wait_for(lambda: not alive(pid), timeout=20)
    assert mounted_at(point) == []
    assert keeper.live_mounts(target.vm_dir) == []
    assert not list((target.vm_dir / keeper.MOUNTS_DIR).glob("*.json"))


@needs_fuse
def test_stop_all_ends_the_keepers_and_their_mounts(target, point, project):  # noqa: F811
    with keeper.lease(target, project, idle_timeout=600, guest_dir=str(point)):
        pass
    [info] = keeper.live_mounts(target.vm_dir)
    keeper.stop_all(target.vm_dir)
    assert not alive(info["pid"]) or wait_for(lambda: not alive(info["pid"]))
    assert mounted_at(point) == []


@needs_fuse
def test_another_project_retires_an_idle_keeper_but_not_a_busy_one(target, point, project, tmp_path):  # noqa: F811
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.txt").write_text("b")
    with keeper.lease(target, project, idle_timeout=600, guest_dir=str(point)):
        with pytest.raises(GuestError, match="already holds a live mount of another folder"):
            with keeper.lease(target, other, idle_timeout=600, guest_dir=str(point)):
                pass
    with keeper.lease(target, other, idle_timeout=600, guest_dir=str(point)):
        assert (point / "b.txt").read_text() == "b"
        assert [m["project"] for m in keeper.live_mounts(target.vm_dir)] == [str(other)]


def test_a_keeper_that_cannot_mount_says_why(target, tmp_path):
    with pytest.raises(GuestError, match="no such directory"):
        with keeper.lease(target, tmp_path / "missing", idle_timeout=5, guest_dir=str(tmp_path / "app")):
            pass
    assert keeper.live_mounts(target.vm_dir) == []


def test_the_socket_is_private(target):
    path = keeper.socket_path(target, "k" * 16)
    assert len(str(path)) < 100
    assert (os.stat(path.parent).st_mode & 0o777) == 0o700


def test_stale_records_are_dropped(target):
    records = target.vm_dir / keeper.MOUNTS_DIR
    records.mkdir()
    (records / "kept-x.json").write_text(json.dumps({"socket": str(target.vm_dir / "gone.sock")}))
    (records / "cmd-1-x.json").write_text(json.dumps({"project": "/p", "pid": 1}))  # nobody holds its lock
    assert keeper.live_mounts(target.vm_dir) == []
    assert list(records.iterdir()) == []


def test_a_command_s_mount_is_announced_while_it_runs(tmp_path):
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    with keeper.announced(vm_dir, tmp_path / "proj"):
        [mount] = keeper.live_mounts(vm_dir)
        assert (mount["project"], mount["pid"], mount["kept"]) == (str(tmp_path / "proj"), os.getpid(), False)
        [record] = (vm_dir / keeper.MOUNTS_DIR).iterdir()
        assert record.stat().st_mode & 0o777 == 0o600
    assert keeper.live_mounts(vm_dir) == []
    with keeper.announced(tmp_path / "no-such-vm", tmp_path):  # no VM folder: nothing written
        pass
    assert not (tmp_path / "no-such-vm").exists()


def test_a_killed_command_s_mount_is_not_announced(tmp_path):
    import subprocess
    import sys

    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import sys, pathlib, time; from devops_tasks import mount_keeper as keeper\n"
                              "with keeper.announced(pathlib.Path(sys.argv[1]), pathlib.Path('/p')):\n"
                              "    print('in', flush=True); time.sleep(600)", str(vm_dir)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "in\n"
        assert [m["pid"] for m in keeper.live_mounts(vm_dir)] == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert keeper.live_mounts(vm_dir) == []

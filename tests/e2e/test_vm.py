"""vm.boot / status / stop / logs / console against real QEMU under TCG, on free ports.

Tests that need a guest use the image builder's ``built_image`` fixture; the ones about starting,
refusing and cleaning up use a blank disk (QEMU runs, the guest never answers). Every VM a test
starts is stopped by the ``core`` fixture's finalizer, even when the test fails.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import needs
from devops_tasks import hostkeys, paths
from devops_tasks.machine import process
from devops_tasks.machine.records import VMDir, all_names, is_alive, proc_info
from devops_tasks.manifest import ImageInfo, Manifest

from helpers import free_port, wait_for


def ssh_words(port: int, words: list[str]) -> list[str]:
    """A plain strict ``ssh`` (no master, no agent) to the guest forwarded on ``port``."""
    from devops_tasks import guest
    from devops_tasks.lifecycle import target_for

    return guest.ssh_argv(target_for("e2e", port), words, forward_agent=False, tty=False, multiplex=False)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
INV = str(Path(sys.executable).parent / "inv")


@dataclass
class Core:
    home: Path
    images: Path
    port: int  # the configured default SSH port (free when the test started)

    def install(self, image: Path, contract: bool) -> None:
        """Install ``image`` by link (the tool must never write it) with a manifest entry."""
        self.images.mkdir(parents=True, exist_ok=True)
        dest = self.images / paths.image_name()
        if dest.exists() or dest.is_symlink():
            dest.unlink()
        dest.symlink_to(image)
        manifest = Manifest(self.images / "manifest.json")
        manifest.set(paths.image_name(), ImageInfo(version="v0.0.1-test", source="build" if contract else "github",
                                                   guest_contract=int(contract)))
        manifest.save()

    def record(self, name: str = "core-dev"):
        return VMDir(name).load()


def qemu_pids(home: Path) -> list[int]:
    """Live (non-zombie) QEMU processes started for this test's ~/.core."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = proc_info(int(entry.name))
            if info and info.state != "Z" and info.cmdline and "qemu-system" in info.cmdline[0] \
                    and any(str(home) in part for part in info.cmdline):
                pids.append(int(entry.name))
    return pids


def kill_all(home: Path) -> None:
    for name in all_names():
        record = VMDir(name).load()
        if record is not None and is_alive(record):
            process.stop(record.pid, record.process_start, record.pidfile, record.qmp_socket, graceful=False)
    for pid in qemu_pids(home):  # orphans a failed test may have left without a record
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def core(tmp_path, monkeypatch):
    home, images = tmp_path / "core", tmp_path / "images"
    home.mkdir()
    monkeypatch.setenv("CORE_HOME", str(home))
    monkeypatch.setenv("CORE_IMAGES_DIR", str(images))
    for var in ("CORE_SKIP_SSH_SCAN", "CORE_BOOT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    port = free_port()
    (home / "config.yaml").write_text(f"vm:\n  ssh_port: {port}\n  memory: 512\n  cpus: 1\n  boot_timeout: 120\n")
    yield Core(home, images, port)
    kill_all(home)


@pytest.fixture(scope="session")
def guest_image(request) -> Path:
    """The image builder's ``built_image`` (or a qcow2 named by ``DEVOPS_TASKS_TEST_IMAGE``)."""
    if os.environ.get("DEVOPS_TASKS_TEST_IMAGE"):
        return Path(os.environ["DEVOPS_TASKS_TEST_IMAGE"])
    try:
        image = request.getfixturevalue("built_image")
    except pytest.FixtureLookupError:
        needs.unavailable("needs the image builder's built_image fixture")
    return Path(getattr(image, "path", image))


@pytest.fixture
def blank_image(tmp_path) -> Path:
    """A disk with nothing to boot: QEMU runs, the guest never answers."""
    path = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def inv(*args: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([INV, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def ssh(port: int, *words: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(ssh_words(port, words), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def known_lines(port: int) -> list[str]:
    try:
        text = paths.known_hosts_path().read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if hostkeys.line_names_port(line, port)]


# -- with a real guest -----------------------------------------------------------------------------

def test_boot_status_ssh_stop(core, guest_image):
    core.install(guest_image, contract=True)
    before = guest_image.stat()
    done = inv("vm.boot")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "Config: 512MB, 1 CPUs", "Booting dev environment...", "Dev environment running",
        "Connect with: inv shell", f"SSH port: {core.port}",
    ]
    record = core.record()
    assert record.status == "running" and len(record.id) == 8 and int(record.id, 16) >= 0
    assert record.accel == "tcg"  # no vmx/svm here: kvm would hang

    text = inv("vm.status").stdout.splitlines()
    assert text[:4] == ["Dev Environment Status", "Installed: Yes", "Version: v0.0.1-test", "Status: Running"]
    assert text[4:8] == [f"Container: {record.id}", "Memory: 512MB", "CPUs: 1", f"SSH port: {core.port}"]
    assert text[8:10] == ["Network: open", "Mount type: virtiofs"]  # the default vm.mount_type
    assert text[10].startswith("Uptime: ") and text[10].endswith("s")
    data = json.loads(inv("vm.status", "--json").stdout)
    assert data["running"] is True and data["container_id"] == record.id and data["ssh_port"] == core.port
    assert data["mount_type"] == "virtiofs" and record.mount_type == "virtiofs"

    result = ssh(core.port, "printf", "%s|", "a b", "c")
    assert (result.returncode, result.stdout) == (0, "a b|c|"), result.stderr
    assert known_lines(core.port) == [f"[127.0.0.1]:{core.port} {hostkeys.public_key(VMDir('core-dev').host_key)}"]
    assert "devops-tasks: ssh ready" in inv("vm.logs").stdout
    folder = VMDir("core-dev").path  # other users see nothing: the log holds root's console session
    assert folder.stat().st_mode & 0o777 == 0o700
    loose = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()
             if p.is_file() and p.stat().st_mode & 0o077}
    assert loose == {}

    stopped = inv("vm.stop")
    assert (stopped.returncode, stopped.stdout) == (0, "Stopping dev environment...\nStopped\n")
    assert not is_alive(record) and core.record() is None
    assert known_lines(core.port) == []
    assert "Status: Stopped" in inv("vm.status").stdout
    again = inv("vm.stop")
    assert (again.returncode, again.stdout) == (0, "Dev environment is not running\n")
    after = guest_image.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns), "the image was written"


def test_changes_persist_until_fresh(core, guest_image):
    core.install(guest_image, contract=True)
    assert inv("vm.boot").returncode == 0
    key1 = hostkeys.public_key(VMDir("core-dev").host_key)
    assert ssh(core.port, "sh", "-c", "echo kept > /root/marker && sync").returncode == 0
    assert inv("vm.stop").returncode == 0
    assert inv("vm.boot").returncode == 0
    assert ssh(core.port, "cat", "/root/marker").stdout == "kept\n"
    assert hostkeys.public_key(VMDir("core-dev").host_key) == key1
    fresh = inv("vm.boot", "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert ssh(core.port, "test", "-e", "/root/marker").returncode == 1
    key2 = hostkeys.public_key(VMDir("core-dev").host_key)
    assert key2 != key1
    assert known_lines(core.port) == [f"[127.0.0.1]:{core.port} {key2}"]


def test_kill_9_then_status_stopped_then_boot(core, guest_image):
    core.install(guest_image, contract=True)
    assert inv("vm.boot").returncode == 0
    record = core.record()
    os.kill(record.pid, signal.SIGKILL)
    status = inv("vm.status")
    assert "Status: Stopped" in status.stdout  # even while the dead QEMU is still a zombie
    assert core.record() is None, "the stale record is cleaned"
    booted = inv("vm.boot")
    assert booted.returncode == 0, booted.stderr
    assert ssh(core.port, "true").returncode == 0


def test_four_concurrent_boots_make_one_vm(core, guest_image):
    core.install(guest_image, contract=True)
    procs = [subprocess.Popen([INV, "vm.boot", "--name", "same"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) for _ in range(4)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    ok = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert len(ok) == 1, results
    assert "Dev environment running" in ok[0][1]
    for code, _, err in refused:
        assert err.strip() == "Error: dev environment already running (use 'inv vm.stop' first or --fresh)"
    assert len(qemu_pids(core.home)) == 1
    assert ssh(core.record("same").ssh_port, "true").returncode == 0


def test_two_named_vms_side_by_side(core, guest_image):
    core.install(guest_image, contract=True)
    a = inv("vm.boot", "--name", "a")
    b = inv("vm.boot", "--name", "b")
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    port_a, port_b = core.record("a").ssh_port, core.record("b").ssh_port
    assert port_a == core.port and port_b != port_a
    assert f"SSH port: {port_b}" in b.stdout
    assert f"SSH port: {port_b}" in inv("vm.status", "--name", "b").stdout
    assert ssh(port_a, "hostname").returncode == 0 and ssh(port_b, "true").returncode == 0
    from devops_tasks import lifecycle

    assert lifecycle.running_vms() == ["a", "b"]
    assert inv("vm.stop", "--name", "a").returncode == 0
    assert lifecycle.running_vms() == ["b"]
    assert ssh(port_b, "true").returncode == 0


def test_console_reads_and_writes_the_serial_shell(core, guest_image):
    core.install(guest_image, contract=True)
    assert inv("vm.boot").returncode == 0
    code = "from devops_tasks.devops import DevOps; DevOps().console()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"\necho con$((6*7))sole\n")
        proc.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 60
        os.set_blocking(proc.stdout.fileno(), False)
        while b"con42sole" not in seen:
            assert time.monotonic() < deadline, seen
            chunk = proc.stdout.read()
            seen += chunk or b""
            time.sleep(0.05)
        proc.stdin.write(b"\x1d")  # Ctrl-] detaches
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
        assert b"detach: Ctrl-]" in proc.stderr.read()
    finally:
        proc.kill()
    assert is_alive(core.record()), "detaching leaves the VM running"

    import pty  # the same on a real terminal: raw mode, so Ctrl-C would go to the guest; Ctrl-] detaches

    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-c", code])
    try:
        os.write(fd, b"\recho tty$((6*7))ok\r")
        seen = b""
        deadline = time.monotonic() + 60
        while b"tty42ok" not in seen:  # typed before the relay went raw: must not be lost
            assert time.monotonic() < deadline, seen
            if select.select([fd], [], [], 1)[0]:
                seen += os.read(fd, 4096)
        os.write(fd, b"\x1d")
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(fd)

    follow = subprocess.Popen([INV, "vm.logs", "--follow"], cwd=REPO, stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL)
    seen = b""
    deadline = time.monotonic() + 30
    while b"tty42ok" not in seen:  # what the console printed is in the log
        assert time.monotonic() < deadline, seen
        if select.select([follow.stdout], [], [], 1)[0]:
            chunk = follow.stdout.read1(65536)
            assert chunk, seen
            seen += chunk
    follow.send_signal(signal.SIGINT)
    assert follow.wait(timeout=10) in (0, 1, -signal.SIGINT, 130)


def test_published_image_falls_back_to_trust_on_first_use(core, guest_image):
    core.install(guest_image, contract=False)
    paths.known_hosts_path().write_text(f"[127.0.0.1]:{core.port} ssh-ed25519 AAAAstaleKeyOfAnOldVM\n")
    done = inv("vm.boot")
    assert done.returncode == 0, done.stderr
    assert "trusted on first use" in done.stdout
    lines = known_lines(core.port)
    assert "AAAAstaleKeyOfAnOldVM" not in "\n".join(lines)
    assert f"[127.0.0.1]:{core.port} {hostkeys.public_key(VMDir('core-dev').host_key)}" in lines
    assert ssh(core.port, "true").returncode == 0


# -- starting, refusing, cleaning up (no guest needed) ---------------------------------------------

def test_not_installed(core):
    done = inv("vm.boot")
    assert done.returncode == 1
    assert done.stderr.strip() == "Error: dev image not installed (run 'inv image.install' or 'inv image.build' first)"
    assert "Installed: No" in inv("vm.status").stdout


def test_port_taken(core, blank_image):
    core.install(blank_image, contract=False)
    with socket.socket() as other:
        other.bind(("127.0.0.1", core.port))
        other.listen()
        refused = inv("vm.boot", "--port", str(core.port))
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            f"Error: SSH port {core.port} is already in use on 127.0.0.1 (choose another with --port)")
        assert core.record() is None and qemu_pids(core.home) == []
        moved = inv("vm.boot", CORE_SKIP_SSH_SCAN="true")  # default port taken: the next free one
        assert moved.returncode == 0, moved.stderr
        port = core.record().ssh_port
        assert port != core.port
        assert f"SSH port: {port}" in moved.stdout and f"SSH port: {port}" in inv("vm.status").stdout
        with socket.socket() as probe:  # the forward listens on loopback only
            assert probe.connect_ex(("127.0.0.1", port)) == 0
    assert inv("vm.stop").returncode == 0


def test_guest_that_never_answers_fails_within_the_deadline(core, blank_image):
    core.install(blank_image, contract=True)
    started = time.monotonic()
    done = inv("vm.boot", CORE_BOOT_TIMEOUT="3")
    assert done.returncode == 1
    assert "the guest did not become ready within 3s" in done.stderr
    assert "serial" in done.stderr
    assert time.monotonic() - started < 30
    assert core.record() is None and qemu_pids(core.home) == []


def test_ctrl_c_during_boot_leaves_nothing(core, blank_image):
    core.install(blank_image, contract=True)
    proc = subprocess.Popen([INV, "vm.boot"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    record = wait_for(lambda: core.record(), 60, "the boot's record")
    assert is_alive(record)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) != 0
    assert not is_alive(record)
    assert core.record() is None and qemu_pids(core.home) == []
    assert known_lines(record.ssh_port) == []
    assert "Status: Stopped" in inv("vm.status").stdout


def test_qemu_survives_the_terminal_sigint(core, blank_image):
    """QEMU runs in its own session: a Ctrl-C to the booting terminal's process group misses it."""
    core.install(blank_image, contract=False)
    done = inv("vm.boot", CORE_SKIP_SSH_SCAN="true")
    assert done.returncode == 0, done.stderr
    record = core.record()
    assert os.getsid(record.pid) != os.getsid(0)
    assert os.getpgid(record.pid) != os.getpgid(0)
    os.killpg(os.getpgid(0), 0)  # (signal 0: our own group exists, and QEMU is outside it)
    assert is_alive(record)

"""The image builder end to end: build ``minimal``, boot it under QEMU (TCG unless the CPU really
has vmx/svm and /dev/kvm works, or ``CORE_ACCEL`` says otherwise), and check the guest contract
over SSH with strict host-key checking against the key injected at boot."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import needs
from devops_tasks import paths
from devops_tasks.build import build_image, load_recipe
from devops_tasks.errors import ImageError
from devops_tasks.manifest import Manifest

from helpers import free_port, wait_for
from plainvm import PlainVM

pytestmark = pytest.mark.e2e

SFTP_SERVER = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/lib/sftp-server") if Path(p).exists()), "")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def isolated(tmp_path, monkeypatch, build_cache_dir):
    """Tmp ``~/.core`` and images dir; the shared (warm) build cache."""
    monkeypatch.setenv("CORE_HOME", str(tmp_path / "core"))
    monkeypatch.setenv("CORE_IMAGES_DIR", str(tmp_path / "images"))
    monkeypatch.setenv("CORE_CACHE_DIR", build_cache_dir)
    return tmp_path


@pytest.fixture
def vm(built_image, tmp_path):
    machine = PlainVM(built_image, tmp_path / "vm")
    yield machine
    machine.cleanup()


def test_minimal_image_boots_and_serves_ssh(vm, built_image):
    before = sha256(built_image)
    vm.start()
    ready = vm.wait_ready()
    result = vm.ssh("python3 -m pytest --version && sshfs --version && git --version && echo PATH=$PATH")
    assert result.returncode == 0, result.stderr + vm.serial_tail()
    out = result.stdout + result.stderr
    assert "pytest 7" in out
    assert "SSHFS version" in out
    assert "git version" in out
    path = next(line for line in out.splitlines() if line.startswith("PATH="))[5:].split(":")
    for wanted in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        assert wanted in path
    facts = vm.ssh("test -d /app && test -c /dev/fuse && ip -4 addr show eth0 && cat /proc/mounts")
    assert facts.returncode == 0, facts.stderr
    assert "10.0.2.15/" in facts.stdout
    assert " /run tmpfs " in facts.stdout
    # the injected keys live on tmpfs only, never on the disk
    keys = vm.ssh("readlink /root/.ssh/authorized_keys; ls /run/devops-tasks")
    assert "/run/devops-tasks/authorized_keys" in keys.stdout
    print(f"boot to ssh-ready: {ready:.1f}s")
    vm.kill()
    assert sha256(built_image) == before, "a running VM must never modify the image"


def test_strict_host_key_rejects_other_key(vm, tmp_path):
    vm.start()
    vm.wait_ready()
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    vm.known_hosts.write_text(f"[127.0.0.1]:{vm.port} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    result = vm.ssh("true")
    assert result.returncode != 0
    assert "host key" in result.stderr.lower() or "verification failed" in result.stderr.lower()


@needs.mark("" if SFTP_SERVER else "host has no sftp-server (apt-get install openssh-sftp-server)")
def test_sshfs_slave_mount_forwarding_agent_and_console(vm, tmp_path):
    vm.start()
    vm.wait_ready()
    # sshfs -o slave: the host's sftp-server talks through the SSH session's stdin/stdout
    project = tmp_path / "project"
    project.mkdir()
    (project / "hello.txt").write_text("from the host\n")
    sftp = subprocess.Popen([SFTP_SERVER, "-d", str(project)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    mount = subprocess.Popen(vm.ssh_argv(f"exec sshfs :{project} /app -o slave"), stdin=sftp.stdout,
                             stdout=sftp.stdin, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        seen = ""
        while time.monotonic() < deadline:
            seen = vm.ssh("cat /app/hello.txt 2>/dev/null; echo written > /app/back.txt 2>/dev/null; true").stdout
            if "from the host" in seen:
                break
            time.sleep(0.5)
        assert "from the host" in seen
        assert (project / "back.txt").read_text() == "written\n"
    finally:
        vm.ssh("umount /app")
        mount.kill()
        sftp.kill()
        mount.wait(10)
        sftp.wait(10)

    # local port forwarding (-L) to a server inside the guest
    vm.ssh("busybox httpd -p 127.0.0.1:8080 -h /etc")
    local = free_port()
    forward = subprocess.Popen(vm.ssh_argv("sleep 60", extra=("-L", f"127.0.0.1:{local}:127.0.0.1:8080")),
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = b""
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", local), timeout=5) as conn:
                    conn.sendall(b"GET /hostname HTTP/1.0\r\n\r\n")
                    body = conn.recv(4096)
                    while chunk := conn.recv(4096):
                        body += chunk
                if b"devops" in body:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert b"devops" in body
    finally:
        forward.kill()
        forward.wait(10)

    # remote port forwarding (-R): the guest reaches a server on the host
    host_server = socket.socket()
    host_server.bind(("127.0.0.1", 0))
    host_server.listen(4)
    received: list[bytes] = []

    def answer() -> None:
        while True:
            try:
                conn, _ = host_server.accept()
            except OSError:
                return
            with conn:
                received.append(conn.recv(100))
                conn.sendall(b"pong-from-host\n")

    threading.Thread(target=answer, daemon=True).start()
    remote = free_port()
    reverse = subprocess.Popen(
        vm.ssh_argv("sleep 60", extra=("-R", f"127.0.0.1:{remote}:127.0.0.1:{host_server.getsockname()[1]}")),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        got = ""
        for _ in range(50):
            got = vm.ssh(f"echo ping-from-guest | timeout 10 nc 127.0.0.1 {remote}", timeout=30).stdout
            if "pong-from-host" in got:
                break
            time.sleep(0.3)
        assert "pong-from-host" in got
        assert any(item.startswith(b"ping-from-guest") for item in received)
    finally:
        reverse.kill()
        reverse.wait(10)
        host_server.close()

    # agent forwarding (-A)
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    sock = agent_dir / "agent.sock"
    agent = subprocess.run(["ssh-agent", "-a", str(sock)], capture_output=True, text=True, check=True)
    agent_pid = int(agent.stdout.split("SSH_AGENT_PID=")[1].split(";")[0])
    try:
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(vm.login_key)], env=env, check=True, capture_output=True)
        listed = vm.ssh("ssh-add -l", agent=True, env=env)
        assert listed.returncode == 0, listed.stderr
        assert "ED25519" in listed.stdout
    finally:
        os.kill(agent_pid, 15)

    # a root shell on the serial console
    with socket.socket(socket.AF_UNIX) as console:
        console.settimeout(30)
        console.connect(str(vm.serial_sock))
        console.sendall(b"\necho console-$((6*7))\n")
        data = b""
        deadline = time.monotonic() + 30
        while b"console-42" not in data and time.monotonic() < deadline:
            data += console.recv(4096)
        assert b"console-42" in data


def ssh_as(vm: PlainVM, user: str, *command: str) -> subprocess.CompletedProcess:
    """``vm.ssh`` logging in as ``user`` instead of root (same key, same strict host key)."""
    argv = vm.ssh_argv(*command)
    argv[argv.index("root@127.0.0.1")] = f"{user}@127.0.0.1"
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_agent_user_dev_runs_commands_as_root_starts_them(vm):
    vm.start()
    vm.wait_ready()
    facts = vm.ssh("grep ^dev: /etc/passwd /etc/group; stat -c '%u:%g %a' /home/dev; "
                   """su -s /bin/sh dev -c 'cd && echo "$(id -u):$(id -g) $HOME" && printf "<%s>" "$@" && """
                   """touch ~/written && stat -c %u ~/written' -- sh 'a b' '$HOME'""")
    assert facts.returncode == 0, facts.stderr
    lines = facts.stdout.splitlines()
    assert lines[0] == "/etc/passwd:dev:x:1000:1000:dev:/home/dev:/bin/bash"  # the recipe's shell
    assert lines[1] == "/etc/group:dev:x:1000:"
    assert lines[2] == "1000:1000 700", "dev's home is its own, on the VM disk"
    assert lines[3] == "1000:1000 /home/dev"
    assert lines[4] == "<a b><$HOME>1000"


def test_dev_cannot_log_in_over_ssh_even_with_its_own_key(vm):
    """The agent (as dev) writes the tool's own login key into its ~/.ssh: SSH still refuses dev."""
    vm.start()
    vm.wait_ready()
    plant = vm.ssh("su -s /bin/sh dev -c 'umask 077; mkdir -p ~/.ssh; cat > ~/.ssh/authorized_keys' "
                   "< /run/devops-tasks/authorized_keys")
    assert plant.returncode == 0, plant.stderr
    refused = ssh_as(vm, "dev", "id -u")
    assert refused.returncode == 255 and "Permission denied" in refused.stderr, refused.stdout + refused.stderr
    assert vm.ssh("true").returncode == 0, "root still logs in"
    # the planted key is sound: a dropbear without -G root lets dev in with it
    restart = vm.ssh("pid=$(cat /run/dropbear.pid); kill $pid; while [ -e /proc/$pid ]; do usleep 10000; done; "
                     "dropbear -r /run/devops-tasks/dropbear_host_key -p 22 -s -P /run/dropbear.pid")
    assert restart.returncode == 0, restart.stderr
    admitted = wait_for(lambda: (r := ssh_as(vm, "dev", "id -u")).returncode == 0 and r, 30, "ssh as dev")
    assert admitted.stdout.strip() == "1000"


def test_power_button_and_persistence(vm):
    vm.start()
    vm.wait_ready()
    assert vm.ssh("echo kept > /root/persist.txt && sync").returncode == 0
    started = time.monotonic()
    vm.qmp("system_powerdown")
    assert vm.wait_exit(30), "guest did not power off on the ACPI power button"
    print(f"power button to QEMU exit: {time.monotonic() - started:.2f}s")
    assert time.monotonic() - started < 15
    vm.start(fresh=False)
    vm.wait_ready()
    result = vm.ssh("cat /root/persist.txt; dmesg | grep -ci 'recovery complete' || true")
    assert result.stdout.splitlines()[0] == "kept"
    assert result.stdout.splitlines()[1] == "0", "clean poweroff must not need a journal replay"


def test_boots_without_injected_keys(built_image, tmp_path):
    machine = PlainVM(built_image, tmp_path / "vm", keys=False)
    try:
        machine.start()
        machine.wait_ready()
    finally:
        machine.cleanup()


def test_rebuild_is_cached_and_reproducible(isolated, built_image):
    warm = build_image("minimal", output=isolated / "warm.qcow2")
    assert warm.cached
    assert warm.seconds < 10
    assert warm.sha256 == sha256(built_image)
    fresh = build_image("minimal", output=isolated / "fresh.qcow2", force=True)
    assert not fresh.cached
    assert fresh.version == warm.version
    assert fresh.sha256 == warm.sha256, "two builds of the same recipe and packages must be byte-identical"


def test_install_records_manifest(isolated, built_image):
    result = build_image("minimal")
    assert result.path == paths.image_path()
    info = Manifest.load().get(paths.image_name())
    assert info is not None
    assert (info.version, info.source, info.sha256, info.guest_contract) == (result.version, "build", result.sha256, 1)
    assert sha256(paths.image_path()) == result.sha256
    data = json.loads(paths.manifest_path().read_text())
    assert data["images"][paths.image_name()]["guest_contract"] == 1
    leftovers = [p.name for p in paths.images_dir().iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def _recipe_with(tmp_path: Path, old: str, new: str) -> Path:
    text = load_recipe("minimal").path.read_text()
    assert old in text
    path = tmp_path / "variant.yaml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("old,new,culprit", [
    ("  - git\n", "  - git\n  - no-such-package-xyz\n", "no-such-package-xyz"),
    ("package: linux-image-cloud-amd64", "package: linux-image-nonexistent-amd64", "linux-image-nonexistent-amd64"),
    ("  - evdev\n", "  - evdev\n  - no_such_module\n", "no_such_module"),
])
def test_bad_input_leaves_installed_image_alone(isolated, built_image, old, new, culprit):
    build_image("minimal")  # a good installed image first (from the cache)
    image_before = sha256(paths.image_path())
    manifest_before = paths.manifest_path().read_bytes()
    variant = _recipe_with(isolated, old, new)
    assert culprit in variant.read_text()
    with pytest.raises(ImageError) as err:
        build_image(str(variant))
    message = str(err.value)
    assert culprit in message and "\n" not in message
    assert sha256(paths.image_path()) == image_before
    assert paths.manifest_path().read_bytes() == manifest_before

"""shell, test, serve and the /app mount against one real guest (TCG), booted once for the module.

Everything runs through the real entry points (``inv`` in a project that imports the collections,
``devops``) with ``CORE_HOME``/``CORE_IMAGES_DIR`` in tmp and free ports. Waits poll with deadlines.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import pty
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import termios
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

import needs
from devops_tasks import guest
from devops_tasks.devops import DevOps
from devops_tasks.errors import GuestError
from devops_tasks.manifest import ImageInfo, Manifest

from helpers import free_port, wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INV = str(BIN / "inv")
DEVOPS = str(BIN / "devops")
EXAMPLE = REPO / "examples" / "hello-pytest"
NASTY_WORDS = ["a b", "it's", '"q"', "$HOME", "$(touch /tmp/pwned)", "`id`", "*", "x;y", "é ü", "-n", "", "\\"]
# A host folder name with spaces, quotes, non-ASCII and shell syntax: all of it is data.
NASTY_DIR = "my proj 'q' \"d\" $(touch pwned-ws) `touch pwned-bt` ; é"


def default_sigint() -> None:
    """Children get SIGINT back (a harness started in the background ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class VM:
    home: Path
    env: dict
    port: int

    def run(self, program: str, *args: str, cwd: Path = REPO, timeout: float = 600, **env) -> subprocess.CompletedProcess:
        return subprocess.run([program, *args], cwd=cwd, env={**self.env, **env}, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def guest(self, script: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a shell script in the guest (through ``devops shell``; this repo is a project, but
        these look at the guest, so nothing is mounted at /app for them)."""
        return self.run(DEVOPS, "shell", "--no-mount", "--", "sh", "-c", script, timeout=timeout)

    def target(self) -> guest.Target:
        return DevOps().vm.target()


@pytest.fixture(scope="module")
def vm(request, tmp_path_factory):
    try:
        image = Path(request.getfixturevalue("built_image"))
    except pytest.FixtureLookupError:
        needs.unavailable("needs the image builder's built_image fixture")
    base = tmp_path_factory.mktemp("ws")
    home, images = base / "core", base / "images"
    home.mkdir()
    images.mkdir()
    port = free_port()
    (home / "config.yaml").write_text(f"vm:\n  ssh_port: {port}\n  memory: 1024\n  cpus: 2\n  boot_timeout: 180\n"
                                     "  mount_type: sshfs\n")  # this module tests the sshfs mount
    (images / "core-devops-linux-amd64.qcow2").symlink_to(image)
    manifest = Manifest(images / "manifest.json")
    manifest.set("core-devops-linux-amd64.qcow2", ImageInfo(version="v0.0.1-ws", source="build", guest_contract=1))
    manifest.save()
    env = {**os.environ, "CORE_HOME": str(home), "CORE_IMAGES_DIR": str(images)}
    env.pop("SSH_AUTH_SOCK", None)
    with pytest.MonkeyPatch.context() as mp:
        for key in ("CORE_HOME", "CORE_IMAGES_DIR"):
            mp.setenv(key, env[key])
        mp.delenv("SSH_AUTH_SOCK", raising=False)
        machine = VM(home, env, port)
        try:
            boot = machine.run(INV, "vm.boot", timeout=300)
            assert boot.returncode == 0, boot.stdout + boot.stderr
            yield machine
        finally:
            with pytest.MonkeyPatch.context():
                try:
                    guest.close_master(machine.target())
                except Exception:
                    pass
            machine.run(INV, "vm.stop", timeout=120)


@pytest.fixture
def project(tmp_path):
    """A copy of the example project in a folder whose name is full of shell syntax."""
    root = tmp_path / NASTY_DIR
    shutil.copytree(EXAMPLE, root)
    return root


def guest_state(vm: VM) -> str:
    """Processes and mounts in the guest that our commands could have left behind."""
    return vm.guest("ps -o pid,args | grep -E 'http.server|sshfs|sleep 9[0-9]' | grep -v grep; "
                    "grep ' /app ' /proc/mounts; ls /tmp/.devops-tasks-run.* 2>/dev/null; true").stdout


# --------------------------------------------------------------------------- shell


def test_shell_exit_codes(vm):
    assert vm.run(DEVOPS, "shell", "--", "true").returncode == 0
    assert vm.run(DEVOPS, "shell", "--", "sh", "-c", "exit 42").returncode == 42
    assert vm.run(INV, "shell", "--", "false").returncode == 1
    missing = vm.run(DEVOPS, "shell", "--", "no-such-command-here")
    assert missing.returncode == 127 and "not found" in missing.stderr


def test_shell_arguments_arrive_as_typed(vm):
    for program in (DEVOPS, INV):
        result = vm.run(program, "shell", "--", "printf", "%s\\0", *NASTY_WORDS)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\0")[:-1] == NASTY_WORDS
    assert "pwned" not in vm.guest("ls /tmp").stdout


def test_shell_through_a_project_tasks_py(vm, project):
    result = vm.run(INV, "shell", "--", "printf", "%s|", "a b", "$PWD", cwd=project)
    assert (result.returncode, result.stdout) == (0, "a b|$PWD|"), result.stderr
    listed = vm.run(INV, "shell", "--", "sh", "-c", 'echo "$PWD"; ls', cwd=project)
    assert listed.stdout.split("\n", 1)[0] == "/app" and "hello.py" in listed.stdout.split(), listed.stderr


def _expect(fd: int, pattern: str, timeout: float, seen: bytearray) -> re.Match:
    regex = re.compile(pattern.encode())
    deadline = time.monotonic() + timeout
    while True:
        match = regex.search(bytes(seen))  # a copy: the match outlives the deletion below
        if match:
            del seen[: match.end()]
            return match
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {pattern!r} in terminal output: {bytes(seen)[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            if not data:
                raise AssertionError(f"terminal closed before {pattern!r}: {bytes(seen)[-500:]!r}")
            seen += data


def _winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_interactive_shell_on_a_pseudo_terminal(vm):
    """Type commands, read their output, resize, Ctrl-C a command, Ctrl-D out: like ssh."""
    env = {**vm.env, "TERM": "xterm"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty's other end
        try:
            default_sigint()
            _winsize(0, 30, 90)
            os.chdir(REPO)
            os.execve(DEVOPS, [DEVOPS, "shell"], env)
        finally:
            os._exit(127)
    seen = bytearray()
    try:
        os.write(fd, b"echo READY$((6*7))\r")
        _expect(fd, r"READY42", 120, seen)
        os.write(fd, b"echo AT=$PWD; ls /app/tasks.py\r")  # this repo is a project: mounted, started in /app
        _expect(fd, r"AT=/app\r?\n/app/tasks.py", 30, seen)
        os.write(fd, b"stty size\r")
        _expect(fd, r"30 90", 30, seen)
        _winsize(fd, 40, 120)  # the kernel sends SIGWINCH to ssh, ssh tells the guest
        # ssh passes the new size on asynchronously: ask again until it arrived (or the deadline)
        deadline = time.monotonic() + 30
        while True:
            os.write(fd, b"echo SIZE=$(stty size)=\r")
            size = _expect(fd, r"SIZE=(\d+ \d+)=", 30, seen).group(1)
            if size == b"40 120" or time.monotonic() > deadline:
                break
        assert size == b"40 120"
        os.write(fd, b"sleep 91\r")
        wait_for(lambda: "sleep 91" in vm.guest("ps -o args | grep -x 'sleep 91' || true").stdout, 60,
                 "sleep to run in the guest", 0.2)
        started = time.monotonic()
        os.write(fd, b"\x03")  # Ctrl-C: interrupts sleep in the guest, not the session
        os.write(fd, b"echo rc=$?\r")
        _expect(fd, r"rc=130\r?\n", 30, seen)
        assert time.monotonic() - started < 60
        _expect(fd, r"[#$] $", 30, seen)  # the prompt: readline waits on an empty line
        os.write(fd, b"\x04")  # Ctrl-D: the login shell ends, and with it the session
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, f"the shell did not end on Ctrl-D: {bytes(seen)[-300:]!r}"
            with_data, _, _ = select.select([fd], [], [], 0.2)
            if with_data:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    pass
        assert os.waitstatus_to_exitcode(status) == 0
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_agent_is_forwarded_only_when_one_exists(vm, tmp_path):
    agent_sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(agent_sock.exists, 10, "ssh-agent's socket")
        probe = "ssh-add -l >/dev/null 2>&1; echo $?"  # 1: an agent without keys, 2: no agent
        forwarded = vm.run(DEVOPS, "shell", "--", "sh", "-c", probe, SSH_AUTH_SOCK=str(agent_sock))
        assert forwarded.stdout.strip() == "1", forwarded.stderr
        refused = vm.run(DEVOPS, "shell", "--no-agent", "--", "sh", "-c", probe, SSH_AUTH_SOCK=str(agent_sock))
        assert refused.stdout.strip() == "2"
        no_agent = vm.run(DEVOPS, "shell", "--", "sh", "-c", probe)  # none running: none forwarded, no hang
        assert no_agent.stdout.strip() == "2"
    finally:
        agent.terminate()
        agent.wait(10)


def test_strict_host_key_for_fabric_and_ssh(vm, tmp_path):
    """A known_hosts without the VM's key: both paths refuse, neither adds the key."""
    real = vm.target()
    fake_known = tmp_path / "known_hosts"
    fake_known.write_text(f"[127.0.0.1]:{real.port} ssh-ed25519 "
                          "AAAAC3NzaC1lZDI1NTE5AAAAIItOQTz+TkRXidc4KXQsFY0iLJF7uUJTaZPRwkz6ST/o\n")
    wrong = guest.Target(real.port, real.identity, fake_known, vm_dir=tmp_path)
    with pytest.raises(GuestError, match="does not match"):
        guest.connect(wrong)
    result = subprocess.run(guest.ssh_argv(wrong, ["true"], multiplex=False), capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 255 and "host key" in result.stderr.lower()
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(GuestError, match="no host key"):
        guest.connect(guest.Target(real.port, real.identity, empty))
    assert empty.read_text() == "" and fake_known.read_text().count("\n") == 1


# --------------------------------------------------------------------------- the mount


def test_mount_edits_both_ways_repeated_and_nested(vm, project, tmp_path):
    with guest.session(vm.target()) as conn:
        for round_ in range(3):
            with guest.Mount(conn, project) as mount:
                assert mount.mounted and not mount.reused
                (project / "from-host.txt").write_text(f"host {round_}\n")
                wait_for(lambda: guest.capture(conn, "cat /app/from-host.txt")[1] == f"host {round_}\n", 15,
                         "the host's edit in the guest")
                code, _, err = guest.capture(conn, f"echo 'guest {round_}' > /app/from-guest.txt")
                assert code == 0, err
                assert (project / "from-guest.txt").read_text() == f"guest {round_}\n"
                (project / "from-host.txt").write_text("changed\n")
                wait_for(lambda: guest.capture(conn, "cat /app/from-host.txt")[1] == "changed\n", 15,
                         "a change of the host's file in the guest")
                with guest.Mount(conn, project) as again:
                    assert again.reused
                assert guest.capture(conn, "test -f /app/hello.py")[0] == 0
            assert guest.capture(conn, "grep ' /app ' /proc/mounts")[0] != 0
    assert not (tmp_path / "pwned-ws").exists() and not (tmp_path / "pwned-bt").exists()
    assert "pwned" not in vm.guest("ls / /root /tmp /app 2>/dev/null").stdout


def test_mount_reaches_nothing_outside_the_project(vm, project, tmp_path):
    """The host's sftp-server runs in a bubblewrap sandbox holding only the project: with
    ``follow_symlinks`` the server itself resolves links, and still finds nothing outside."""
    if guest.confine_mode() == "off":
        pytest.skip("CORE_MOUNT_CONFINE=off")
    secret = tmp_path / "secret.txt"
    secret.write_text("PRIVATE KEY\n")
    (project / "link-out").symlink_to(secret)
    (project / "root-link").symlink_to("/")
    options = (*guest.SSHFS_OPTIONS, "follow_symlinks")
    with guest.session(vm.target()) as conn, guest.Mount(conn, project, options=options) as mount:
        assert mount.confined
        assert guest.capture(conn, "cat /app/hello.py")[0] == 0
        code, out, _ = guest.capture(conn, "cat /app/link-out")
        assert code != 0 and "PRIVATE" not in out
        through_root = f"/app/root-link{secret}"
        code, out, _ = guest.capture(conn, f"cat {shlex.quote(through_root)} /app/root-link/etc/shadow")
        assert code != 0 and "PRIVATE" not in out and "root:" not in out
        code, out, err = guest.capture(conn, "ls /app/root-link/ /app/root-link/etc/")
        assert code == 0, err
        assert not {"root", "home", "proc", "var", "shadow", "hostname"} & set(out.split()), out
        code, _, _ = guest.capture(conn, "echo x > /app/root-link/etc/planted || mkdir /app/root-link/planted")
        assert code != 0


# What root in the guest tries through the mount: set-id bits, device nodes, a fifo.
SET_ID_ATTEMPTS = """\
cd /app || exit 1
echo x > suid && chmod 4755 suid
echo x > sgid && chmod 2755 sgid
echo x > both && chmod 6777 both
mkdir sticky-dir && chmod 1777 sticky-dir
mkdir -m 3777 made-dir
python3 -c "import os; os.close(os.open('created-suid', os.O_CREAT | os.O_WRONLY, 0o4755))"
mknod char-dev c 1 3 && echo MADE char-dev
mknod block-dev b 7 0 && echo MADE block-dev
mkfifo fifo && echo MADE fifo
stat -c '%a %n' suid sgid both sticky-dir made-dir created-suid
"""


def test_mount_leaves_no_set_id_bit_device_or_fifo_on_the_host(vm, project):
    with guest.session(vm.target()) as conn, guest.Mount(conn, project):
        code, out, err = guest.capture(conn, SET_ID_ATTEMPTS, timeout=60)
    assert code == 0, err
    assert "MADE" not in out, out
    modes = dict(reversed(line.split(" ", 1)) for line in out.splitlines() if line[:1].isdigit())
    # the guest sees what the host file has (created-suid: 0o4755 less the session's umask)
    assert modes.pop("created-suid") in ("755", "700"), out
    assert modes == {"suid": "755", "sgid": "755", "both": "777", "sticky-dir": "777", "made-dir": "777"}, out
    for path in [project, *project.rglob("*")]:
        mode = path.lstat().st_mode
        assert stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode), f"{path.name}: {oct(mode)}"
        assert stat.S_IMODE(mode) & 0o7000 == 0, f"{path.name}: {oct(mode)}"
    assert {"suid", "sgid", "both", "sticky-dir", "made-dir", "created-suid"} <= set(os.listdir(project))


def test_a_confined_command_never_reuses_an_unconfined_mount(vm, project, monkeypatch):
    """``CORE_MOUNT_CONFINE=off inv serve`` then ``inv claude``: claude must not get serve's mount."""
    needs.need(needs.bwrap_problem())
    monkeypatch.delenv("CORE_MOUNT_CONFINE", raising=False)
    with guest.session(vm.target()) as conn:
        with guest.Mount(conn, project, confine="off") as unconfined:
            assert not unconfined.confined
            with pytest.raises(GuestError, match="holds an unconfined mount of this project"):
                guest.Mount(conn, project, confine="require").start()
            assert guest.capture(conn, "cat /app/hello.py")[0] == 0  # the refusal left it alone
            with guest.Mount(conn, project, confine="off") as also_off:
                assert also_off.reused
        with guest.Mount(conn, project, confine="require"):
            with guest.Mount(conn, project, confine="off") as user:
                assert user.reused and user.confined
        assert guest.capture(conn, "grep ' /app ' /proc/mounts")[0] != 0


def test_the_owner_of_a_mount_waits_for_its_other_users(vm, project, capfd):
    """``inv serve`` ends while ``inv test`` runs on its mount: the mount stays until test ends."""
    with guest.session(vm.target()) as owner_conn, guest.session(vm.target()) as user_conn:
        owner = guest.Mount(owner_conn, project)
        owner.start()
        user = guest.Mount(user_conn, project)
        stopper = threading.Thread(target=owner.stop)
        try:
            user.start()
            assert user.reused
            stopper.start()
            said = []
            wait_for(lambda: said.append(capfd.readouterr().err) or "is still used by another command" in "".join(said),
                     30, "the owner to say it waits")
            stopper.join(2)
            assert stopper.is_alive(), "the owner unmounted under its user"
            (project / "late.txt").write_text("after the owner stopped\n")
            wait_for(lambda: guest.capture(user_conn, "cat /app/late.txt")[1] == "after the owner stopped\n", 15,
                     "the host's file through the mount")
            user.stop()
            stopper.join(60)
            assert not stopper.is_alive()
            assert guest.capture(user_conn, "grep ' /app ' /proc/mounts")[0] != 0
        finally:
            user.stop()
            if stopper.ident is not None:
                stopper.join(60)
            owner.stop()


def test_mount_errors_say_why(vm, tmp_path):
    with guest.session(vm.target()) as conn:
        with pytest.raises(GuestError, match="no such directory"):
            guest.Mount(conn, tmp_path / "missing").start()
        other = tmp_path / "other"
        other.mkdir()
        with guest.Mount(conn, tmp_path):
            with pytest.raises(GuestError, match="already holds a live mount of another folder"):
                guest.Mount(conn, other).start()
        with pytest.raises(GuestError, match="unknown option"):
            guest.Mount(conn, tmp_path, options=("no_such_option",)).start()
        with pytest.raises(GuestError, match="sshfs is not installed in the guest image"):
            _without_sshfs(conn, tmp_path)
    assert "/app" not in guest_state(vm)


def _without_sshfs(conn, folder: Path) -> None:
    """Hide sshfs in the guest for one mount attempt (/dev/null bound over it: not executable)."""
    code, path, err = guest.capture(conn, "p=$(command -v sshfs) && mount --bind /dev/null \"$p\" && echo \"$p\"")
    assert code == 0, err
    try:
        guest.Mount(conn, folder).start()
    finally:
        guest.capture(conn, f"umount {path.strip()}")


# --------------------------------------------------------------------------- test


def counts(output: str) -> dict[str, int]:
    """pytest's summary line → {"passed": n, "failed": m, ...}."""
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    assert summary, output[-2000:]
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                                                   summary[-1])}


def test_test_by_detection(vm, project):
    result = vm.run(INV, "test", cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Running tests: pytest\n")
    assert "rootdir: /app" in result.stdout
    assert counts(result.stdout) == {"passed": 4}
    # No job-control report from the guest's shell after the summary (the stdin watchdog it kills).
    assert not re.search(r"Killed|\(wd: ", result.stdout + result.stderr), result.stdout + result.stderr


def test_test_by_name_with_env(vm, project):
    (project / ".core" / "test.yaml").write_text(
        "commands:\n"
        "  - name: env\n"
        "    run: echo \"[$HELLO_GREETING] [$ODD]\" && python3 -m pytest -q\n"
        "env:\n"
        "  HELLO_GREETING: hello from .core/test.yaml\n"
        "  ODD: \"$(touch /tmp/pwned) 'x' *\"\n"
    )
    result = vm.run(INV, "test", "--name", "env", cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[hello from .core/test.yaml] [$(touch /tmp/pwned) 'x' *]" in result.stdout
    assert counts(result.stdout) == {"passed": 4}
    unknown = vm.run(INV, "test", "--name", "nope", cwd=project)
    assert unknown.returncode == 1
    assert 'test command "nope" not found in .core/test.yaml' in unknown.stderr


def test_test_explicit_command_and_project_flag(vm, project, tmp_path):
    result = vm.run(DEVOPS, "test", "--project", str(project), "--", "python3", "-m", "pytest", "-q", "-k", "greet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert counts(result.stdout) == {"passed": 2, "deselected": 2}
    words = vm.run(INV, "test", "--", "printf", "%s|", "a b", "$PWD", cwd=project)
    assert words.stdout.splitlines()[-1] == "a b|$PWD|"
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    empty = vm.run(INV, "test", "--project", str(nothing))
    assert empty.returncode == 1
    assert "could not detect test command (create .core/test.yaml)" in empty.stderr


def test_failing_tests_fail_the_task(vm, project):
    (project / "tests" / "test_broken.py").write_text("def test_broken():\n    assert 1 + 1 == 3\n")
    result = vm.run(INV, "test", cwd=project)
    assert result.returncode == 1
    assert counts(result.stdout) == {"failed": 1, "passed": 4}
    status = vm.run(INV, "test", "--", "sh", "-c", "exit 5", cwd=project)
    assert status.returncode == 5


def test_test_output_is_streamed(vm, project):
    proc = subprocess.Popen([INV, "test", "--", "sh", "-c", "echo first; sleep 6; echo second"], cwd=project,
                            env=vm.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True)
    try:
        times = {}
        for line in proc.stdout:
            times[line.strip()] = time.monotonic()
        assert proc.wait(60) == 0
        assert times["second"] - times["first"] > 4, "output was held back until the end"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_test_interrupted_leaves_nothing_behind(vm, project):
    proc = subprocess.Popen([INV, "test", "--", "sh", "-c", "echo started; sleep 97"], cwd=project, env=vm.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            preexec_fn=default_sigint)
    try:
        assert proc.stdout.readline().startswith("Running tests")
        assert proc.stdout.readline().strip() == "started"
        status = vm.run(INV, "vm.status", "--json")  # the live mount is listed while the command runs
        assert [(m["project"], m["kept"]) for m in json.loads(status.stdout)["mounts"]] == \
            [(str(project.resolve()), False)], status.stdout
        assert f"Mount: /app <- {project.resolve()} (for the command with PID " in vm.run(INV, "vm.status").stdout
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        assert json.loads(vm.run(INV, "vm.status", "--json").stdout)["mounts"] == []
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: guest_state(vm).strip() == "", 30, "the guest to be clean")


def test_a_kept_mount_outlives_inv_test_until_idle(vm, project, tmp_path):
    """``vm.mount_idle_timeout``: the mount stays between commands (the same keeper serves the next
    one), ``vm.status`` shows it, another project retires it, and it ends after the idle time."""
    config = vm.home / "config.yaml"
    saved = config.read_text()
    config.write_text(saved + "  mount_idle_timeout: 6\n")

    def mounts() -> list[dict]:
        status = vm.run(INV, "vm.status", "--json")
        assert status.returncode == 0, status.stderr
        return json.loads(status.stdout)["mounts"]

    try:
        first = vm.run(INV, "test", cwd=project)
        assert first.returncode == 0 and counts(first.stdout) == {"passed": 4}, first.stdout + first.stderr
        [kept] = mounts()
        assert kept["project"] == str(project.resolve()) and kept["leases"] == 0
        assert " /app " in vm.guest("cat /proc/mounts").stdout  # still mounted: the trade the user chose
        text = vm.run(INV, "vm.status").stdout
        assert f"Mount: /app <- {project.resolve()} (idle" in text
        second = vm.run(INV, "test", "--", "cat", "hello.py", cwd=project)
        assert second.returncode == 0 and "def " in second.stdout
        assert [m["pid"] for m in mounts()] == [kept["pid"]]  # the same keeper, no new mount
        other = tmp_path / "other"
        shutil.copytree(EXAMPLE, other)
        third = vm.run(INV, "test", "--", "pwd", cwd=other)
        assert third.returncode == 0, third.stderr
        assert [m["project"] for m in mounts()] == [str(other.resolve())]
        wait_for(lambda: mounts() == [], 60, "the kept mount to end when idle")
        wait_for(lambda: guest_state(vm).strip() == "", 30, "the guest to be clean")
    finally:
        config.write_text(saved)


def test_a_real_pypi_project_gives_the_same_counts(vm, tmp_path):
    """toolz 0.12.0's own test suite (sdist from PyPI, pure Python, pytest only): host vs VM."""
    download = tmp_path / "dl"
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                              "toolz==0.12.0", "-d", str(download)], capture_output=True, text=True, timeout=600)
    if fetched.returncode != 0:
        needs.unavailable(f"PyPI unreachable (pip download failed): {fetched.stderr.strip()[-300:]}")
    with tarfile.open(next(download.glob("toolz-0.12.0.tar.gz"))) as archive:
        archive.extractall(tmp_path, filter="data")
    source = tmp_path / "toolz-0.12.0"
    # What a user adopting the tool adds to a project: a tasks.py with the collections.
    (source / "tasks.py").write_text("from devops_tasks import ns  # noqa: F401\n")
    command = ["python3", "-m", "pytest", "-p", "no:cacheprovider", "toolz"]
    host = subprocess.run([sys.executable, *command[1:]], cwd=source, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    in_vm = vm.run(INV, "test", "--", *command, cwd=source, timeout=1200)
    assert in_vm.returncode == host.returncode, in_vm.stdout[-3000:] + in_vm.stderr
    assert counts(in_vm.stdout) == counts(host.stdout)
    assert counts(host.stdout)["passed"] > 100


# --------------------------------------------------------------------------- serve


def http_get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def test_serve_forwards_the_port_and_ctrl_c_cleans_up(vm, project):
    (project / "public").mkdir()
    (project / "public" / "index.html").write_text("<h1>hello from the host</h1>\n")
    port = free_port()
    proc = subprocess.Popen([INV, "serve", "--port", str(port), "--path", "public"], cwd=project, env=vm.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            preexec_fn=default_sigint)
    try:
        def fetch():
            try:
                return http_get(f"http://127.0.0.1:{port}/index.html")
            except (OSError, urllib.error.URLError, http.client.HTTPException):
                # HTTPException: while an edit settles, the guest may see the new content with the
                # old size for up to the 1 s attribute cache (the server then sends a short body)
                return None
        assert wait_for(fetch, 120, "the server through the forward", 0.25) == b"<h1>hello from the host</h1>\n"
        (project / "public" / "index.html").write_text("<h1>edited</h1>\n")
        wait_for(lambda: fetch() == b"<h1>edited</h1>\n", 15, "the host's edit served by the guest", 0.25)
        listeners = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert [line.split()[3] for line in listeners.splitlines()] == [f"127.0.0.1:{port}"]  # loopback only
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        out = proc.stdout.read()
        assert f"Serving /app/public with: python3 -m http.server {port}\nhttp://localhost:{port}\n" in out
        assert out.rstrip().endswith("Stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    wait_for(lambda: guest_state(vm).strip() == "", 30, "the guest to be clean")


def test_serve_killed_leaves_nothing_running_in_the_guest(vm, project):
    port = free_port()
    proc = subprocess.Popen([INV, "serve", "--port", str(port)], cwd=project, env=vm.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(port), 120, "the server", 0.25)
    finally:
        proc.kill()  # no cleanup on our side at all: the guest must notice by itself
        proc.wait(30)
    wait_for(lambda: guest_state(vm).strip() == "", 30, "the guest to end the server and the mount")


def _answers(port: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{port}/") is not None
    except (OSError, urllib.error.URLError):
        return False


def test_serve_taken_port_is_a_clear_error(vm, project):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = vm.run(INV, "serve", "--port", str(port), cwd=project)
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use on this machine; choose another with --port" in result.stderr
    assert "Traceback" not in result.stderr

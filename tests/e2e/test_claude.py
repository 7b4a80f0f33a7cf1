"""``claude`` against one real guest (TCG): exactly the credentials asked for arrive, nothing else.

The image is ``recipes/claude-stub.yaml``: the minimal image plus a stand-in ``claude`` that records,
inside the guest, its arguments, its environment, whether ``ssh-add -l`` reaches an agent and what is
under ``$GH_CONFIG_DIR`` (the gh copy, on tmpfs). The host side is fake but real: a HOME with a gh config, a git config
(``GIT_CONFIG_GLOBAL``), a real ``ssh-agent`` holding a key, and a random ``ANTHROPIC_API_KEY``.
One VM for the module, stopped first so the first test shows that ``claude`` boots it.
"""

from __future__ import annotations

import os
import pty
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import needs
from devops_tasks import guest, paths
from devops_tasks.devops import DevOps
from devops_tasks.egress import PLACEHOLDER
from devops_tasks.errors import DevopsError, GuestError
from devops_tasks.manifest import ImageInfo, Manifest
from devops_tasks.options import ClaudeOptions

from helpers import free_port, wait_for

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
DEVOPS = str(BIN / "devops")
RECORD = "/dev/shm/claude-stub.txt"
GO = "/dev/shm/claude-stub-go"  # the stand-in's go file (see recipes/claude-stub.sh)
CREDENTIAL_VARS = {"ANTHROPIC_API_KEY", "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME",
                   "GIT_COMMITTER_EMAIL", "SSH_AUTH_SOCK"}
GIT_NAME, GIT_EMAIL = "Ada Lovelace-E2E", "ada.e2e@example.com"


GH = "/run/devops-tasks-claude/gh"  # the gh copy in the guest: tmpfs
GH_TOKEN = "gho_e2e_" + secrets.token_hex(12)


@dataclass
class Record:
    """What the stand-in claude saw."""

    args: list[str]
    user: str
    pwd: str
    tty: bool
    agent_rc: int
    gh: dict[str, str]  # path -> "mode uid"
    env: dict[str, str] = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> "Record":
        args, gh, env = [], {}, {}
        pwd, user, tty, agent_rc = "", "", False, -1
        for line in text.splitlines():
            kind, _, value = line.partition(":")
            if kind == "arg":
                args.append(value)
            elif kind == "pwd":
                pwd = value
            elif kind == "user":
                user = value
            elif kind == "tty":
                tty = value == "yes"
            elif kind == "agent-rc":
                agent_rc = int(value)
            elif kind == "gh":
                mode, path = value.rsplit(" ", 1)
                gh[path] = mode
            elif kind == "env" and "=" in value:
                key, _, val = value.partition("=")
                env[key] = val
        return cls(args, user, pwd, tty, agent_rc, gh, env)

    def credentials(self) -> set[str]:
        """The kinds that arrived, judged from what the guest sees."""
        kinds = set()
        if self.agent_rc == 0 or "SSH_AUTH_SOCK" in self.env:
            kinds.add("ssh")
        if self.gh:
            kinds.add("gh")
        if "ANTHROPIC_API_KEY" in self.env:
            kinds.add("anthropic")
        if any(key.startswith("GIT_") for key in self.env):
            kinds.add("git")
        return kinds


@dataclass
class Env:
    devops: DevOps
    project: Path
    secret: str
    lines: list[str]
    env: dict  # the process environment for subprocess runs
    core_home: Path

    def guest(self, script: str) -> tuple[int, str]:
        with guest.session(self.devops.vm.target()) as conn:
            code, out, err = guest.capture(conn, script, timeout=60)
        return code, out + err

    def claude(self, opts: ClaudeOptions) -> tuple[int, Record]:
        assert self.guest(f"rm -f {RECORD}")[0] == 0
        self.lines.clear()
        code = self.devops.claude(self.project, opts)
        return code, self.record()

    def record(self) -> Record:
        code, text = self.guest(f"cat {RECORD}")
        assert code == 0, text
        return Record.parse(text)


@pytest.fixture(scope="module")
def claude_image(tmp_path_factory, build_cache_dir) -> Path:
    from devops_tasks.build import build_image
    from devops_tasks.build.tools import missing_tools

    missing = missing_tools()
    if missing:
        needs.unavailable(f"image build needs host tools: {', '.join(tool for tool, _ in missing)}")
    base = tmp_path_factory.mktemp("claude-image")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORE_CACHE_DIR", build_cache_dir)
        mp.setenv("CORE_HOME", str(base / "core"))
        mp.setenv("CORE_IMAGES_DIR", str(base / "images"))
        result = build_image(HERE / "recipes" / "claude-stub.yaml", output=base / "claude-stub.qcow2")
    return Path(result.path)


def start_agent(folder: Path) -> tuple[int, str]:
    sock = folder / "agent.sock"
    out = subprocess.run(["ssh-agent", "-s", "-a", str(sock)], capture_output=True, text=True, check=True,
                         stdin=subprocess.DEVNULL).stdout
    pid = int(re.search(r"SSH_AGENT_PID=(\d+)", out).group(1))
    key = folder / "id_agent"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "e2e-agent-key", "-f", str(key)],
                   check=True, stdin=subprocess.DEVNULL)
    subprocess.run(["ssh-add", "-q", str(key)], check=True, env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
                   capture_output=True, stdin=subprocess.DEVNULL)
    return pid, str(sock)


@pytest.fixture(scope="module")
def sandbox_env(tmp_path_factory, claude_image):
    base = tmp_path_factory.mktemp("claude")
    core, images, home = base / "core", base / "images", base / "home"
    core.mkdir()
    images.mkdir()
    gh = home / ".config" / "gh"
    gh.mkdir(parents=True)
    (gh / "hosts.yml").write_text(f"github.com:\n    oauth_token: {GH_TOKEN}\n    user: ada\n")
    (gh / "hosts.yml").chmod(0o600)
    (gh / "config.yml").write_text("git_protocol: https\n")
    (gh / "config.yml").chmod(0o644)
    gitconfig = base / "gitconfig"
    gitconfig.write_text(f"[user]\n\tname = {GIT_NAME}\n\temail = {GIT_EMAIL}\n")
    project = base / "proj"
    project.mkdir()
    port = free_port()
    (core / "config.yaml").write_text(f"vm:\n  ssh_port: {port}\n  memory: 512\n  cpus: 1\n  boot_timeout: 180\n")
    (images / paths.image_name()).symlink_to(claude_image)
    secret = "sk-ant-e2e-" + secrets.token_urlsafe(24)
    agent_pid, agent_sock = start_agent(base)
    values = {
        "HOME": str(home), "CORE_HOME": str(core), "CORE_IMAGES_DIR": str(images),
        "GIT_CONFIG_GLOBAL": str(gitconfig), "GIT_CONFIG_NOSYSTEM": "1",
        "ANTHROPIC_API_KEY": secret, "SSH_AUTH_SOCK": agent_sock,
    }
    lines: list[str] = []
    devops = None
    with pytest.MonkeyPatch.context() as mp:
        for key, value in values.items():
            mp.setenv(key, value)
        for key in ("CORE_SKIP_SSH_SCAN", "CORE_BOOT_TIMEOUT"):
            mp.delenv(key, raising=False)
        manifest = Manifest(images / "manifest.json")
        manifest.set(paths.image_name(), ImageInfo(version="v0.0.1-claude", source="build", guest_contract=1))
        manifest.save()
        devops = DevOps(echo=lines.append)
        try:
            yield Env(devops, project, secret, lines, dict(os.environ), core)
        finally:
            try:
                DevOps(echo=lambda _: None).stop()
            finally:
                os.kill(agent_pid, signal.SIGTERM)


# --------------------------------------------------------------------------- through the program


def test_boots_a_stopped_vm_and_default_forwards_all_without_secrets_in_ps(sandbox_env):
    e = sandbox_env
    assert not e.devops.is_running()
    (e.project / ".claude-stub-wait").touch()
    try:
        proc = subprocess.Popen([DEVOPS, "claude", "--model", "claude-e2e-model", "--project", str(e.project)],
                                env=e.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL)
        samples = []

        def stub_waiting() -> bool:
            samples.append(subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout)
            assert proc.poll() is None, proc.communicate()[0]
            try:
                return e.guest(f"test -e {RECORD}.tmp")[0] == 0  # the stub runs, waiting for the go file
            except Exception:  # not booted yet
                return False

        wait_for(stub_waiting, 400, "the stand-in claude to start", interval=0.5)
        for _ in range(10):  # claude is running now: sample the host's process list
            samples.append(subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout)
            time.sleep(0.1)
        assert "devops claude --model claude-e2e-model" in samples[-1]
        assert "-- sh claude --model claude-e2e-model" in samples[-1]  # the host's ssh running it
        # the guest's process list: no secret in any argv either
        code, cmdlines = e.guest("for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done")
        assert code == 0 and "/usr/local/bin/claude --model claude-e2e-model" in cmdlines, cmdlines
        assert e.secret not in cmdlines
        # a second session on the same VM is refused while this one runs (they would share credentials)
        with pytest.raises(DevopsError, match="a claude session is already running on VM 'core-dev'"):
            e.devops.claude(e.project, ClaudeOptions(no_auth=True))
        assert e.guest(f"touch {GO}")[0] == 0  # in the guest: the agent works on a copy
        out, _ = proc.communicate(timeout=120)
    finally:
        (e.project / ".claude-stub-wait").unlink(missing_ok=True)
    assert proc.returncode == 0, out
    assert all(e.secret not in sample for sample in samples)
    assert e.secret not in out
    assert "Dev environment not running, booting..." in out
    assert "Auth forwarded: SSH agent, gh, anthropic, git" in out
    rec = e.record()
    assert rec.args == ["--model", "claude-e2e-model"]
    assert rec.pwd == "/app" and rec.tty is False and rec.user == "dev"  # never root
    assert rec.env["HOME"] == "/home/dev"
    assert rec.credentials() == {"ssh", "gh", "anthropic", "git"}
    assert rec.env["ANTHROPIC_API_KEY"] == PLACEHOLDER  # a restricted VM: the host proxy adds the key
    assert e.secret not in "".join(rec.env.values())
    assert (rec.env["GIT_AUTHOR_NAME"], rec.env["GIT_COMMITTER_NAME"]) == (GIT_NAME, GIT_NAME)
    assert (rec.env["GIT_AUTHOR_EMAIL"], rec.env["GIT_COMMITTER_EMAIL"]) == (GIT_EMAIL, GIT_EMAIL)
    assert rec.agent_rc == 0
    assert rec.gh == {GH: "755 1000", f"{GH}/config.yml": "644 1000", f"{GH}/hosts.yml": "600 1000"}
    # nothing is left behind in the guest after the run
    code, text = e.guest("ls -A /run/devops-tasks-claude 2>&1; true")
    assert "No such file" in text


# --------------------------------------------------------------------------- the matrix (library)


@pytest.mark.parametrize(
    "opts, expected",
    [
        (ClaudeOptions(no_auth=True), set()),
        (ClaudeOptions(auth=["ssh"]), {"ssh"}),
        (ClaudeOptions(auth=["gh"]), {"gh"}),
        (ClaudeOptions(auth=["anthropic"]), {"anthropic"}),  # right after gh: its copy must be gone
        (ClaudeOptions(auth=["git"]), {"git"}),
        (ClaudeOptions(auth=["gh", "anthropic"]), {"gh", "anthropic"}),
        (ClaudeOptions(auth=["git,ssh"]), {"ssh", "git"}),
        (ClaudeOptions(), {"ssh", "gh", "anthropic", "git"}),
        (ClaudeOptions(no_auth=True), set()),  # right after the default: no gh, no agent, no env
    ],
    ids=["no-auth", "ssh", "gh", "anthropic-after-gh", "git", "gh+anthropic", "git,ssh", "default",
         "no-auth-after-default"],
)
def test_exactly_the_asked_credentials_arrive(sandbox_env, opts, expected):
    e = sandbox_env
    code, rec = e.claude(opts)
    assert code == 0
    assert rec.credentials() == expected
    assert not (set(rec.env) & CREDENTIAL_VARS) - {
        var for kind in expected for var in {
            "ssh": {"SSH_AUTH_SOCK"}, "gh": set(), "anthropic": {"ANTHROPIC_API_KEY"},
            "git": {"GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"},
        }[kind]
    }
    assert rec.agent_rc == (0 if "ssh" in expected else 2)  # 2: ssh-add cannot reach an agent
    if "gh" in expected:
        assert rec.gh[f"{GH}/hosts.yml"] == "600 1000"
    if "anthropic" in expected:
        assert rec.env["ANTHROPIC_API_KEY"] == PLACEHOLDER
    if "git" in expected:
        assert rec.env["GIT_AUTHOR_EMAIL"] == GIT_EMAIL
    labels = [label for kind, label in (("ssh", "SSH agent"), ("gh", "gh"), ("anthropic", "anthropic"),
                                        ("git", "git")) if kind in expected]
    assert f"Auth forwarded: {', '.join(labels) or '(none)'}" in e.lines
    assert rec.args == []
    assert all(e.secret not in line for line in e.lines)


def test_kinds_the_host_lacks_are_left_out_and_said(sandbox_env, monkeypatch):
    e = sandbox_env
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    monkeypatch.delenv("SSH_AUTH_SOCK")
    code, rec = e.claude(ClaudeOptions())
    assert code == 0
    assert rec.credentials() == {"gh", "git"}
    assert "Auth forwarded: gh, git" in e.lines
    notes = [line for line in e.lines if line.startswith("Not forwarded:")]
    assert len(notes) == 2 and "SSH agent" in notes[0] and "ANTHROPIC_API_KEY" in notes[1]


def test_exit_status_is_claudes(sandbox_env):
    e = sandbox_env
    (e.project / ".claude-stub-exit").write_text("7\n")
    try:
        code, _ = e.claude(ClaudeOptions(no_auth=True))
    finally:
        (e.project / ".claude-stub-exit").unlink()
    assert code == 7


def test_words_after_the_dashes_reach_claude_intact(sandbox_env):
    e = sandbox_env
    words = ["-p", "fix the 'failing' test; $(id)", "--dangerously-skip-permissions"]
    result = subprocess.run([DEVOPS, "claude", "--no-auth", "--project", str(e.project), "--", *words], env=e.env,
                            capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert e.record().args == words


def test_timeout_ends_the_run_from_the_host_and_notify_runs(sandbox_env, tmp_path):
    e = sandbox_env
    told = tmp_path / "told"
    assert e.guest(f"rm -f {GO}")[0] == 0
    (e.project / ".claude-stub-wait").touch()  # the stand-in waits up to 60 s for a go file that never comes
    try:
        start = time.monotonic()
        result = subprocess.run(
            [DEVOPS, "claude", "--no-auth", "--project", str(e.project), "--timeout", "5s",
             "--notify", f"echo $CLAUDE_EXIT_STATUS $CLAUDE_VM > {told}"],
            env=e.env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
        took = time.monotonic() - start
    finally:
        (e.project / ".claude-stub-wait").unlink()
    assert result.returncode == 124, result.stdout + result.stderr
    assert "claude ran out of time (5s, --timeout)" in result.stdout
    assert took < 55  # ended by the timeout, not by the stand-in giving up
    assert told.read_text().split() == ["124", "core-dev"]
    code, text = e.guest("ps -o user= | grep -c '^dev' || true")
    assert text.strip() == "0"  # nothing of the agent's runs on in the guest


def test_a_terminal_gets_a_real_tty(sandbox_env):
    e = sandbox_env
    e.guest(f"rm -f {RECORD}")
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(DEVOPS, [DEVOPS, "claude", "--auth", "git", "--project", str(e.project)], e.env)
    output = b""
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert b"Auth forwarded: git" in output
    rec = e.record()
    assert rec.tty is True and rec.credentials() == {"git"}


def test_not_installed_is_a_clear_error(sandbox_env):
    e = sandbox_env
    assert e.guest("mv /usr/local/bin/claude /usr/local/bin/claude.off")[0] == 0
    try:
        with pytest.raises(GuestError, match=r"claude is not installed in the VM image.*inv image.build --recipe claude"):
            e.devops.claude(e.project, ClaudeOptions())
        result = subprocess.run([DEVOPS, "claude", "--project", str(e.project)], env=e.env, capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert result.returncode == 1
        assert "Error: claude is not installed in the VM image" in result.stderr
        assert "Traceback" not in result.stderr and e.secret not in result.stderr + result.stdout
    finally:
        e.guest("mv /usr/local/bin/claude.off /usr/local/bin/claude")
    code, text = e.guest("ls -A /run/devops-tasks-claude 2>&1; true")
    assert "hosts.yml" not in text


def test_no_secret_in_logs_or_state(sandbox_env):
    """The tool's own files (VM log, records, known_hosts) and the VM's disk never hold the key or
    the gh token, after the runs above and ``vm.stop``."""
    e = sandbox_env
    assert e.guest("sync")[0] == 0  # what the guest wrote reaches the overlay
    assert e.devops.stop()  # the gh copies of the earlier runs: on tmpfs, gone with the VM
    for path in e.core_home.rglob("*"):
        if path.is_file() and not path.is_socket():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            assert e.secret.encode() not in data, path
            assert GH_TOKEN.encode() not in data, path

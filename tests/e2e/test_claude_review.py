"""``inv claude`` on a copy, against real guests (TCG): the agent's changes reach the host project
only through a review.

The image is ``recipes/claude-stub.yaml``: its stand-in claude plays the agent by running the
project's ``.claude-stub-script`` in ``/app`` as the guest user ``dev``. Every run goes through the
``devops`` program, as a user would type it. One VM for the module (a second one, ``agent-2``, for
the test of two agents at once), stopped at the end.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devops_tasks import guest, paths
from devops_tasks.devops import DevOps
from devops_tasks.manifest import ImageInfo, Manifest

from helpers import free_port, wait_for

pytestmark = pytest.mark.e2e

DEVOPS = str(Path(sys.executable).parent / "devops")
RECORD = "/dev/shm/claude-stub.txt"
GO = "/dev/shm/claude-stub-go"
PWNED = "/tmp/devops-tasks-e2e-pwned"  # where the agent's .git/config and hook would write on the host

AGENT = f"""set -e
id -un > /dev/shm/agent-user
printf 'added by the agent\\n' > added.txt
printf 'edited\\n' > edit.txt
rm gone.txt
printf 'print("the agent was here")\\n' >> tasks.py
git -c user.name=Agent -c user.email=agent@vm commit -qam 'the agent commits'
printf '[core]\\n\\tfsmonitor = "touch {PWNED}-fsmonitor"\\n' >> .git/config
printf '#!/bin/sh\\ntouch {PWNED}-hook\\n' > .git/hooks/pre-commit
chmod 755 .git/hooks/pre-commit
printf 'after the commit\\n' >> edit.txt
chmod u+s run.sh
ln -s /etc/passwd evil-link
mkfifo a-fifo
"""


def tree(root: Path) -> dict:
    """Every entry under ``root``: (mode, bytes or link target), .git included."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            rel = os.path.relpath(path, root)
            data = os.readlink(path) if stat.S_ISLNK(info.st_mode) else (
                Path(path).read_bytes() if stat.S_ISREG(info.st_mode) else None)
            out[rel] = (info.st_mode, data)
    return out


def outside_the_branch(entries: dict) -> dict:
    """What a review's branch adds to .git (objects, refs/heads/agent/...) left out."""
    return {k: v for k, v in entries.items() if not k.startswith((".git/objects", ".git/refs/heads/agent"))}


def sh(script: str, cwd: Path) -> None:
    subprocess.run(["sh", "-ec", script], cwd=cwd, check=True)


class Env:
    def __init__(self, base: Path, env: dict):
        self.base, self.env = base, env
        self.count = 0

    def project(self, script: str = "", git: bool = True) -> Path:
        """A fresh project; ``script`` is what the stand-in agent runs in its copy."""
        self.count += 1
        root = self.base / f"proj-{self.count}"
        root.mkdir()
        (root / ".claude-stub-script").write_text(script)
        if git:
            sh("""git init -q
printf 'keep\\n' > keep.txt
printf 'to edit\\n' > edit.txt
printf 'to delete\\n' > gone.txt
printf 'from invoke import task\\n' > tasks.py
printf '#!/bin/sh\\necho run\\n' > run.sh && chmod 755 run.sh
printf '*.pyc\\n' > .gitignore
git add -A
git -c user.name=Host -c user.email=host@example.com commit -qm initial
""", root)
        return root

    def devops(self, *words: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([DEVOPS, *words], env=self.env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def claude(self, project: Path, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.devops("claude", "--no-auth", "--project", str(project), *flags, timeout=timeout)

    def guest(self, script: str, vm: str = "core-dev") -> tuple[int, str]:
        with pytest.MonkeyPatch.context() as mp:
            for key in ("CORE_HOME", "CORE_IMAGES_DIR"):
                mp.setenv(key, self.env[key])
            with guest.session(DevOps(name=vm, echo=lambda _: None).vm.target()) as conn:
                code, out, err = guest.capture(conn, script, timeout=60)
        return code, out + err


@pytest.fixture(scope="module")
def e(tmp_path_factory, claude_stub_image):
    base = tmp_path_factory.mktemp("review")
    core, images, home = base / "core", base / "images", base / "home"
    for folder in (core, images, home):
        folder.mkdir()
    (core / "config.yaml").write_text(f"vm:\n  ssh_port: {free_port()}\n  memory: 512\n  cpus: 1\n  boot_timeout: 240\n")
    (images / paths.image_name()).symlink_to(claude_stub_image)
    manifest = Manifest(images / "manifest.json")
    manifest.set(paths.image_name(), ImageInfo(version="v0.0.1-review", source="build", guest_contract=1))
    manifest.save()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INVOKE_", "ANTHROPIC_", "CLAUDE_", "CORE_"))}
    env.update(HOME=str(home), CORE_HOME=str(core), CORE_IMAGES_DIR=str(images), GIT_CONFIG_NOSYSTEM="1",
               GIT_CONFIG_GLOBAL=str(home / "gitconfig"))
    env.pop("SSH_AUTH_SOCK", None)
    (home / "gitconfig").write_text("[user]\n\tname = Host User\n\temail = host@example.com\n")
    try:
        yield Env(base, env)
    finally:
        for name in ("agent-2", "core-dev"):
            subprocess.run([DEVOPS, "vm.stop", "--name", name], env=env, capture_output=True, timeout=120,
                           stdin=subprocess.DEVNULL)


def review_id(output: str) -> str:
    match = re.search(r"Changes in the copy \(review (\S+), VM ", output)
    assert match, output
    return match.group(1)


# --------------------------------------------------------------------------- the whole story


def test_the_host_changes_only_when_the_review_is_applied(e):
    project = e.project(AGENT)
    before = tree(project)
    result = e.claude(project)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert e.guest("cat /dev/shm/agent-user")[1].strip() == "dev"
    assert e.guest("ls -A /app")[1] == ""  # the copy is gone from the VM once it is read back
    # nothing reached the host: byte-identical, modes included (the branch only adds objects and its ref)
    assert outside_the_branch(tree(project)) == outside_the_branch(before)
    rid = review_id(out)
    for line in (" added.txt | 1 +", " 4 files changed", "Refused, never applied: under .git/: ", ".git/config",
                 ".git/hooks/pre-commit", "Refused, never applied: run.sh: a set-id bit",
                 "Refused, never applied: a-fifo: a fifo",
                 "Refused, never applied: evil-link: a symlink out of the project (-> /etc/passwd)",
                 f"Branch: agent/core-dev-{rid} (with 1 commit of the agent's)",
                 f"Not applied (no terminal). Apply it with: inv claude.apply --review {rid}"):
        assert line in out, out
    patch = Path(re.search(r"Patch: (\S+)", out).group(1))
    assert patch.parent == Path(e.env["CORE_HOME"]) / "vms" / "core-dev" / "reviews" / rid
    assert stat.S_IMODE(patch.stat().st_mode) == 0o600 and stat.S_IMODE(patch.parent.stat().st_mode) == 0o700
    assert b"diff --git a/added.txt b/added.txt\nnew file mode 100644\n" in patch.read_bytes()

    # the branch: the agent's commit on the copy's HEAD, then its uncommitted changes
    branch = f"agent/core-dev-{rid}"
    log = subprocess.run(["git", "log", "--format=%s", branch], cwd=project, capture_output=True, text=True).stdout
    assert log.splitlines()[1:] == ["the agent commits", "initial"]
    status = subprocess.run(["git", "diff", "--name-status", "HEAD", branch], cwd=project, capture_output=True,
                            text=True).stdout.split()
    assert status == ["A", "added.txt", "M", "edit.txt", "D", "gone.txt", "M", "tasks.py"]

    listed = e.devops("claude.diff", "--list")
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith(rid))
    assert "core-dev" in row and "pending" in row and branch in row and str(project) in row
    shown = e.devops("claude.diff", cwd=project)  # the latest pending review of this project
    assert shown.returncode == 0 and "+added by the agent" in shown.stdout

    git_before = tree(project / ".git")
    applied = e.devops("claude.apply", cwd=project)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert f"Applied 4 changes to {project} (review {rid})" in applied.stdout
    assert (project / "added.txt").read_text() == "added by the agent\n"
    assert (project / "edit.txt").read_text() == "edited\nafter the commit\n"
    assert not (project / "gone.txt").exists()
    assert (project / "tasks.py").read_text() == 'from invoke import task\nprint("the agent was here")\n'
    assert stat.S_IMODE((project / "run.sh").stat().st_mode) == 0o755  # no set-id bit
    assert not os.path.lexists(project / "a-fifo") and not os.path.lexists(project / "evil-link")
    assert tree(project / ".git") == git_before  # .git never changes by an apply
    subprocess.run(["git", "status", "--short"], cwd=project, capture_output=True, check=True)
    assert not Path(f"{PWNED}-fsmonitor").exists() and not Path(f"{PWNED}-hook").exists()
    assert (project / "added.txt").stat().st_uid == os.getuid()
    again = e.devops("claude.apply", "--review", rid)
    assert again.returncode == 0 and "Already applied: 4 changes" in again.stdout


def test_a_conflicting_host_edit_makes_apply_refuse_by_name(e):
    project = e.project("printf 'agent\\n' > edit.txt; printf 'x\\n' > other.txt")
    result = e.claude(project)
    assert result.returncode == 0, result.stdout + result.stderr
    rid = review_id(result.stdout)
    (project / "edit.txt").write_text("the user's own edit\n")
    before = tree(project)
    refused = e.devops("claude.apply", "--review", rid)
    assert refused.returncode == 1
    assert "edit.txt: changed on the host since the copy" in refused.stderr and "nothing applied" in refused.stderr
    assert tree(project) == before
    dropped = e.devops("claude.discard", "--review", rid)
    assert dropped.returncode == 0 and f"Deleted branch agent/core-dev-{rid}" in dropped.stdout
    assert rid not in e.devops("claude.diff", "--list").stdout


def test_names_binary_files_and_a_100_mb_file_survive_the_round_trip(e):
    script = """set -e
for f in *.txt; do printf 'agent\\n' >> "$f"; done
printf 'from the agent' > "$(printf 'made\\nby agent \\377.txt')"
printf 'tail' >> big.bin
head -c 300000 /dev/urandom > random.bin
"""
    project = e.project(script, git=False)  # a plain folder: the whole of it is copied
    names = [b"with space.txt", b"new\nline.txt", b"caf\xc3\xa9.txt", b"bad \xff\xfe bytes.txt"]
    for name in names:
        (project / os.fsdecode(name)).write_bytes(b"host " + name)
    big = os.urandom(1 << 20) * 100
    (project / "big.bin").write_bytes(big)
    (project / "image.png").write_bytes(bytes(range(256)) * 64)
    before = tree(project)
    started = time.monotonic()
    result = e.claude(project, timeout=1200)
    print(f"\nround trip of a 100 MB project under TCG: {time.monotonic() - started:.1f} s")  # a figure (-s)
    assert result.returncode == 0, result.stdout + result.stderr
    assert tree(project) == before
    rid = review_id(result.stdout)
    agent_random = e.guest("true")  # the VM still answers
    assert agent_random[0] == 0
    applied = e.devops("claude.apply", "--review", rid, timeout=600)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    for name in names:
        assert (project / os.fsdecode(name)).read_bytes() == b"host " + name + b"agent\n"
    assert (project / os.fsdecode(b"made\nby agent \xff.txt")).read_bytes() == b"from the agent"
    assert (project / "big.bin").read_bytes() == big + b"tail"
    assert (project / "image.png").read_bytes() == bytes(range(256)) * 64
    assert (project / "random.bin").stat().st_size == 300000


def test_ctrl_c_keeps_the_review(e):
    project = e.project()
    assert e.guest(f"rm -f {GO} {RECORD}.tmp")[0] == 0
    (project / ".claude-stub-wait").write_text("")
    (project / ".claude-stub-script").write_text("printf 'before ctrl-c\\n' > added.txt\n")
    proc = subprocess.Popen([DEVOPS, "claude", "--no-auth", "--project", str(project)], env=e.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: e.guest(f"test -e {RECORD}.tmp")[0] == 0, 300, "the stand-in to wait", interval=0.5)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C on a terminal's process group
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rid = review_id(out)
    assert proc.returncode != 0, out  # ssh's status for its Ctrl-C
    assert f"Apply it with: inv claude.apply --review {rid}" in out
    assert not (project / "added.txt").exists()
    listed = e.devops("claude.diff", "--list").stdout
    assert rid in listed
    assert e.devops("claude.apply", "--review", rid).returncode == 0
    assert (project / "added.txt").read_text() == "before ctrl-c\n"
    code, text = e.guest("ps -o user= | grep -c '^dev' || true")
    assert text.strip() == "0"


def test_a_terminal_is_asked_and_d_shows_the_diff(e):
    project = e.project()
    (project / ".claude-stub-script").write_text("printf 'asked\\n' > asked.txt\n")
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.chdir(project)
        os.execve(DEVOPS, [DEVOPS, "claude", "--no-auth"], e.env)
    output = b""
    answers = [b"d\n", b"y\n"]
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
            if answers and output.count(b"? [y/N/d]") > 2 - len(answers):
                os.write(fd, answers.pop(0))
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    text = output.decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert f"Apply 1 change to {project}? [y/N/d]" in text
    assert "+asked" in text  # d showed the patch, then the question came again
    assert "Applied 1 change to" in text
    assert (project / "asked.txt").read_text() == "asked\n"


def test_live_mounts_the_project_with_git_read_only(e):
    project = e.project()
    config = (project / ".git" / "config").read_bytes()
    script = """if printf '[core]\\n\\tfsmonitor = x\\n' >> /app/.git/config 2>/dev/null; then r=wrote; else r=refused; fi
if printf 'x' > /app/.git/hooks/pre-commit 2>/dev/null; then h=wrote; else h=refused; fi
printf 'config %s, hook %s\\n' "$r" "$h" > /app/live.txt
"""
    (project / ".claude-stub-script").write_text(script)
    result = e.claude(project, "--live")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (project / "live.txt").read_text() == "config refused, hook refused\n"  # at once, no review
    assert (project / ".git" / "config").read_bytes() == config
    assert not (project / ".git" / "hooks" / "pre-commit").exists()
    assert "Changes in the copy" not in result.stdout


def test_two_agents_in_two_vms_give_two_reviews_that_both_apply(e):
    project = e.project()
    assert e.guest(f"rm -f {GO} {RECORD}.tmp")[0] == 0
    (project / ".claude-stub-wait").write_text("")
    (project / ".claude-stub-script").write_text(
        'if [ -e /dev/shm/second ]; then printf two > two.txt; printf "x\\n" >> keep.txt; '
        'else printf one > one.txt; printf "edited by one\\n" > edit.txt; fi\n')
    procs = {}
    try:
        procs["core-dev"] = subprocess.Popen([DEVOPS, "claude", "--no-auth", "--project", str(project)], env=e.env,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                             stdin=subprocess.DEVNULL)
        wait_for(lambda: e.guest(f"test -e {RECORD}.tmp")[0] == 0, 300, "the first agent", interval=0.5)
        assert e.devops("vm.boot", "--name", "agent-2", "--network", "restricted", timeout=400).returncode == 0
        assert e.guest("touch /dev/shm/second", vm="agent-2")[0] == 0
        procs["agent-2"] = subprocess.Popen([DEVOPS, "claude", "--no-auth", "--vm", "agent-2", "--project",
                                             str(project)], env=e.env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        wait_for(lambda: e.guest(f"test -e {RECORD}.tmp", vm="agent-2")[0] == 0, 300, "the second agent",
                 interval=0.5)
        assert e.guest(f"touch {GO}")[0] == 0 and e.guest(f"touch {GO}", vm="agent-2")[0] == 0
        outs = {name: proc.communicate(timeout=300)[0] for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        (project / ".claude-stub-wait").unlink()
    assert all(proc.returncode == 0 for proc in procs.values()), outs
    ids = {name: review_id(out) for name, out in outs.items()}
    assert "VM core-dev" in outs["core-dev"] and "VM agent-2" in outs["agent-2"]
    listed = e.devops("claude.diff", "--list").stdout
    for name, rid in ids.items():
        assert any(line.startswith(rid) and name in line and f"agent/{name}-{rid}" in line
                   for line in listed.splitlines()), listed
    for rid in ids.values():
        done = e.devops("claude.apply", "--review", rid)
        assert done.returncode == 0, done.stdout + done.stderr
    assert (project / "one.txt").read_text() == "one" and (project / "two.txt").read_text() == "two"
    assert (project / "edit.txt").read_text() == "edited by one\n" and (project / "keep.txt").read_text() == "keep\nx\n"
    subprocess.run([DEVOPS, "vm.stop", "--name", "agent-2"], env=e.env, capture_output=True, timeout=120)


def test_a_vm_killed_mid_run_loses_only_the_agents_changes(e):
    """Last: the VM dies here (the next run would boot it again)."""
    project = e.project()
    assert e.guest(f"rm -f {GO} {RECORD}.tmp")[0] == 0
    (project / ".claude-stub-wait").write_text("")
    (project / ".claude-stub-script").write_text("printf 'lost\\n' > added.txt; printf 'lost\\n' > edit.txt\n")
    before = tree(project)
    proc = subprocess.Popen([DEVOPS, "claude", "--no-auth", "--project", str(project)], env=e.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: e.guest(f"test -e {RECORD}.tmp")[0] == 0, 300, "the stand-in to wait", interval=0.5)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CORE_HOME", e.env["CORE_HOME"])
            record = DevOps(echo=lambda _: None).vm.dir.load()
        os.kill(record.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "The agent's changes could not be read back from the VM" in out, out
    assert f"they are lost; {project} on the host is untouched" in out
    assert tree(project) == before
    assert "Changes in the copy" not in out
    listed = e.devops("claude.diff", "--list").stdout
    assert str(project) not in listed

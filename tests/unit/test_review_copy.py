"""The copy and its review without a VM: the guest's side runs here (``local_guest.LocalConn``: real
tar, the real guest tool under ``python3 -I``, real git), the "agent" is a function that edits the
copy. What reaches the host project, and when, is checked byte by byte (modes included).
The same flow against a real VM: tests/e2e/test_claude_review.py.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from devops_tasks import review
from devops_tasks.review import ProjectCopy, all_reviews, apply_and_report, find
from devops_tasks.review.apply import ConflictError
from devops_tasks.review.store import Review

from local_guest import LocalConn

GIT_ID = ["-c", "user.name=Host User", "-c", "user.email=host@example.com"]


def sh(script: str, cwd: Path) -> None:
    subprocess.run(["sh", "-ec", script], cwd=cwd, check=True)


def tree(root: Path, skip_git: bool = False) -> dict:
    """Every entry under ``root``: (mode, bytes or link target); what "byte-identical" means here."""
    out = {}
    for folder, dirs, files in os.walk(root):
        if skip_git and ".git" in dirs:
            dirs.remove(".git")
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(info.st_mode):
                out[rel] = (info.st_mode, os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                out[rel] = (info.st_mode, Path(path).read_bytes())
            else:
                out[rel] = (info.st_mode, None)
    return out


def outside_the_branch(entries: dict) -> dict:
    """``tree()`` without what making a review's branch adds: objects and ``refs/heads/agent/``."""
    return {k: v for k, v in entries.items()
            if not k.startswith((".git/objects", ".git/refs/heads/agent"))}


@pytest.fixture
def core(tmp_path, monkeypatch):
    monkeypatch.setenv("CORE_HOME", str(tmp_path / "core"))
    return tmp_path / "core"


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    sh("""git init -q
printf 'keep\\n' > keep.txt
printf 'a\\nb\\nc\\n' > edit.txt
printf 'gone\\n' > gone.txt
printf 'from invoke import task\\n' > tasks.py
printf '#!/bin/sh\\necho run\\n' > run.sh && chmod 755 run.sh
printf '*.pyc\\nbuild/\\n' > .gitignore
mkdir -p sub/deep && printf 'deep\\n' > sub/deep/file.txt
git add -A
git -c user.name=u -c user.email=e commit -qm initial
printf 'not tracked\\n' > notes.txt
printf 'ignored\\n' > cached.pyc
""", root)
    return root


def make_copy(root: Path, tmp_path: Path, name: str = "core-dev", **kw) -> ProjectCopy:
    lines = kw.pop("lines", [])
    return ProjectCopy(root, name, echo=lines.append, guest_dir=str(tmp_path / f"app-{name}"), agent_user="",
                       agent_uid=os.getuid(), tool_dir=str(tmp_path / f"tool-{name}"), python=sys.executable, **kw)


def run_agent(copy: ProjectCopy, script: str, conn=None) -> Review:
    conn = conn or LocalConn()
    with copy.attached(conn):
        sh(script, Path(copy.guest_dir))
    return copy.review


AGENT = """
printf 'new file\\n' > added.txt
printf 'a\\nB\\nc\\n' > edit.txt
rm gone.txt
printf 'print("agent was here")\\n' >> tasks.py
git -c user.name=Agent -c user.email=agent@vm commit -qam 'the agent commits'
printf 'more\\n' >> edit.txt
printf '[core]\\n\\tfsmonitor = touch /tmp/devops-pwned\\n' >> .git/config
printf '#!/bin/sh\\ntouch /tmp/devops-pwned\\n' > .git/hooks/pre-commit && chmod 755 .git/hooks/pre-commit
chmod u+s run.sh
ln -s /etc/passwd evil-link
ln -s keep.txt good-link
mkfifo a-fifo
mkdir -p build && printf 'junk\\n' > build/out.o && printf 'x' > new.pyc
"""


def test_the_host_is_untouched_until_apply_then_gets_the_change(project, tmp_path, core):
    before = tree(project)
    lines = []
    copy = make_copy(project, tmp_path, lines=lines)
    rev = run_agent(copy, AGENT)
    # byte-identical, modes included: the VM never wrote here (the branch added objects and its ref)
    assert outside_the_branch(tree(project)) == outside_the_branch(before)
    assert rev is not None and rev.changes == 5
    assert [c.path for c in rev.change_set().changes] == [b"added.txt", b"edit.txt", b"gone.txt", b"good-link",
                                                          b"tasks.py"]
    refused = {r.path: r.reason for r in rev.change_set().refused}
    assert refused[b".git/config"] == "under .git/" and refused[b".git/hooks/pre-commit"] == "under .git/"
    assert refused[b"a-fifo"] == "a fifo" and refused[b"evil-link"].startswith("a symlink out of the project")
    assert refused[b"run.sh"].startswith("a set-id bit")
    assert rev.change_set().ignored == 2  # build/out.o and new.pyc: the ignore rules skip them
    assert stat.S_IMODE(os.stat(rev.folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(rev.patch_path).st_mode) == 0o600
    assert rev.folder.parent == core / "vms" / "core-dev" / "reviews"

    git_before = tree(project / ".git")
    outcome = apply_and_report(rev, lines.append)
    assert sorted(c.path for c in outcome.applied) == [b"added.txt", b"edit.txt", b"gone.txt", b"good-link",
                                                       b"tasks.py"]
    assert (project / "added.txt").read_text() == "new file\n"
    assert (project / "edit.txt").read_text() == "a\nB\nc\nmore\n"
    assert not (project / "gone.txt").exists()
    assert (project / "tasks.py").read_text().endswith('print("agent was here")\n')
    assert os.readlink(project / "good-link") == "keep.txt"
    assert not os.path.lexists(project / "evil-link") and not os.path.lexists(project / "a-fifo")
    assert stat.S_IMODE(os.stat(project / "run.sh").st_mode) == 0o755  # no set-id bit
    assert tree(project / ".git") == git_before  # applying never touches .git
    assert b"fsmonitor" not in (project / ".git" / "config").read_bytes()
    assert not (project / ".git" / "hooks" / "pre-commit").exists()
    again = tree(project)
    second = apply_and_report(rev, lines.append)  # twice: nothing more happens
    assert second.applied == [] and len(second.already) == 5
    assert tree(project) == again
    assert "Already applied: 5 changes" in lines


def test_the_branch_holds_the_agent_commits_and_the_same_change(project, tmp_path, core):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    # the host's own hook (it travels with .git, so the agent's commit in the copy runs it there)
    sh("printf '#!/bin/sh\\ntouch \"$(git rev-parse --git-dir)/hook-ran\"\\n' > .git/hooks/reference-transaction "
       "&& chmod 755 .git/hooks/reference-transaction", project)
    hooks = project / ".git" / "hook-ran"
    rev = run_agent(make_copy(project, tmp_path), AGENT)
    assert rev.branch == f"agent/core-dev-{rev.id}" and rev.agent_commits == 1 and rev.base == head
    log = subprocess.run(["git", "log", "--format=%s", rev.branch], cwd=project, capture_output=True,
                         text=True).stdout.splitlines()
    assert log[1] == "the agent commits" and log[2] == "initial" and log[0].startswith("Uncommitted changes")
    names = subprocess.run(["git", "diff", "--name-status", "HEAD", rev.branch], cwd=project, capture_output=True,
                           text=True).stdout.split("\n")
    assert sorted(filter(None, names)) == ["A\tadded.txt", "A\tgood-link", "D\tgone.txt", "M\tedit.txt", "M\ttasks.py"]
    shown = subprocess.run(["git", "show", f"{rev.branch}:edit.txt"], cwd=project, capture_output=True).stdout
    assert shown == b"a\nB\nc\nmore\n"
    assert not hooks.exists()  # making the branch ran no hook (the host's own included)
    # the head of the host is where it was, the working tree untouched, the index too
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip() == head
    assert subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True,
                          text=True).stdout.split("\n")[0] == "?? notes.txt"
    review.discard(rev, lambda line: None)
    assert subprocess.run(["git", "rev-parse", "-q", "--verify", rev.branch], cwd=project).returncode == 1
    assert not rev.folder.exists()


def test_a_conflicting_host_edit_is_refused_by_name_and_nothing_is_applied(project, tmp_path, core):
    rev = run_agent(make_copy(project, tmp_path), AGENT)
    (project / "edit.txt").write_text("the user's own edit\n")
    before = tree(project)
    with pytest.raises(ConflictError) as info:
        apply_and_report(rev, lambda line: None)
    assert "edit.txt: changed on the host since the copy" in str(info.value)
    assert "nothing applied" in str(info.value)
    assert tree(project) == before  # not even the other files


def test_two_reviews_of_one_project_apply_one_after_the_other_or_conflict(project, tmp_path, core):
    first = run_agent(make_copy(project, tmp_path, "vm-1"), "printf one > one.txt; printf 'a\\n' > edit.txt")
    second = run_agent(make_copy(project, tmp_path, "vm-2"), "printf two > two.txt; printf 'x\\n' >> keep.txt")
    third = run_agent(make_copy(project, tmp_path, "vm-3"), "printf 'z\\n' > edit.txt")
    assert {first.branch, second.branch} == {f"agent/vm-1-{first.id}", f"agent/vm-2-{second.id}"}
    apply_and_report(first, lambda line: None)
    apply_and_report(second, lambda line: None)
    assert (project / "one.txt").read_text() == "one" and (project / "two.txt").read_text() == "two"
    assert (project / "keep.txt").read_text() == "keep\nx\n"
    with pytest.raises(ConflictError, match="edit.txt: changed on the host since the copy"):
        apply_and_report(third, lambda line: None)
    assert (project / "edit.txt").read_text() == "a\n"
    listed = all_reviews()
    assert [r.vm for r in listed] == ["vm-1", "vm-2", "vm-3"]
    assert [r.state for r in listed] == ["applied", "applied", "pending"]
    assert find(listed, project=project).id == third.id  # the latest pending one of the project
    assert find(listed, first.id[:-1] + first.id[-1]).id == first.id


def test_names_binary_and_a_large_file_survive_in_a_plain_folder(tmp_path, core):
    root = tmp_path / "plain"
    root.mkdir()
    weird = [b"with space.txt", b"new\nline.txt", b"caf\xc3\xa9.txt", b"bad\xff\xfebytes", b"tab\there", b'q"uote\\d']
    for name in weird:
        (root / os.fsdecode(name)).write_bytes(b"old " + name)
    big = os.urandom(1 << 20) * 24  # 24 MiB (the VM test moves 100 MB)
    (root / "big.bin").write_bytes(big)
    (root / "binary.dat").write_bytes(bytes(range(256)) * 10)
    before = tree(root)
    copy = make_copy(root, tmp_path)
    app = Path(copy.guest_dir)

    def agent():
        for name in weird:
            (app / os.fsdecode(name)).write_bytes(b"new " + name + b"\n\x00")
            (app / os.fsdecode(b"added " + name)).write_bytes(name)
        with open(app / "big.bin", "ab") as handle:
            handle.write(b"tail")
        (app / "binary.dat").write_bytes(bytes(range(255, -1, -1)) * 10)

    with copy.attached(LocalConn()):
        agent()
    rev = copy.review
    assert tree(root) == before
    assert rev.branch == "" and rev.changes == 2 * len(weird) + 2
    patch = rev.patch_path.read_bytes()
    assert b'diff --git "a/new\\nline.txt" "b/new\\nline.txt"' in patch
    assert b"Binary files a/big.bin and b/big.bin differ" in patch
    apply_and_report(rev, lambda line: None)
    for name in weird:
        assert (root / os.fsdecode(name)).read_bytes() == b"new " + name + b"\n\x00"
        assert (root / os.fsdecode(b"added " + name)).read_bytes() == name
    assert (root / "big.bin").read_bytes() == big + b"tail"
    assert (root / "binary.dat").read_bytes() == bytes(range(255, -1, -1)) * 10


def test_no_change_makes_no_review_and_a_touched_file_is_no_change(project, tmp_path, core):
    lines = []
    copy = make_copy(project, tmp_path, lines=lines)
    rev = run_agent(copy, "touch keep.txt; cp edit.txt e2 && mv e2 edit.txt; printf 'x' > build.pyc; "
                          "printf '[x]\\n' >> .git/config")
    assert rev is None
    assert "No changes to the project." in lines
    assert any(line.startswith("Refused, never applied: under .git/: .git/config") for line in lines)
    assert not (core / "vms" / "core-dev" / "reviews").exists() or not any(
        (core / "vms" / "core-dev" / "reviews").iterdir())


def test_a_same_size_edit_with_its_time_set_back_is_seen(project, tmp_path, core):
    """The guest's ``lstat`` baseline compares ctime, which nobody can set back."""
    rev = run_agent(make_copy(project, tmp_path), "printf 'KEEP\\n' > keep.txt; touch -d '2001-01-01' keep.txt")
    assert [c.path for c in rev.change_set().changes] == [b"keep.txt"]


def test_include_ignored_copies_and_reviews_ignored_files(project, tmp_path, core):
    copy = make_copy(project, tmp_path, include_ignored=True)
    rev = run_agent(copy, "test -f cached.pyc; printf 'y' > cached.pyc; mkdir build; printf 'o' > build/out.o")
    assert sorted(c.path for c in rev.change_set().changes) == [b"build/out.o", b"cached.pyc"]
    plain = make_copy(project, tmp_path, "other")
    with plain.attached(LocalConn()):
        assert not (Path(plain.guest_dir) / "cached.pyc").exists()  # ignored files stay home by default
        assert (Path(plain.guest_dir) / "notes.txt").exists() and (Path(plain.guest_dir) / ".git" / "HEAD").exists()


def test_a_vm_gone_during_the_run_loses_only_the_agents_changes(project, tmp_path, core):
    before = tree(project)
    lines = []
    copy = make_copy(project, tmp_path, lines=lines)
    conn = LocalConn()
    with copy.attached(conn):
        sh("printf 'lost\\n' > added.txt", Path(copy.guest_dir))
        conn.alive = False  # the VM dies
    assert copy.review is None and copy.lost
    assert any("could not be read back from the VM" in line and "on the host is untouched" in line for line in lines)
    assert tree(project) == before
    assert all_reviews() == []
    reviews_root = core / "vms" / "core-dev" / "reviews"
    assert not reviews_root.exists() or list(reviews_root.iterdir()) == []  # no half review left


def test_ctrl_c_during_the_run_keeps_the_review(project, tmp_path, core):
    copy = make_copy(project, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with copy.attached(LocalConn()):
            sh("printf 'kept\\n' > added.txt", Path(copy.guest_dir))
            raise KeyboardInterrupt
    assert copy.review is not None and [c.path for c in copy.review.change_set().changes] == [b"added.txt"]
    assert [r.id for r in all_reviews()] == [copy.review.id]


def test_modes_new_files_get_the_umask_edits_keep_theirs_exec_follows(project, tmp_path, core):
    os.chmod(project / "keep.txt", 0o600)
    rev = run_agent(make_copy(project, tmp_path), """
printf 'x\\n' >> keep.txt
chmod 777 edit.txt
chmod -x run.sh
printf 'new\\n' > script.sh && chmod 4777 script.sh
printf 'plain\\n' > plain.txt && chmod 666 plain.txt
""")
    old = os.umask(0o022)
    try:
        apply_and_report(rev, lambda line: None)
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE(os.stat(project / name).st_mode)  # noqa: E731
    assert mode("keep.txt") == 0o600  # edited: its own mode
    assert mode("edit.txt") == 0o755  # the executable bit only (as git), read from the agent's 777
    assert mode("run.sh") == 0o644
    assert mode("script.sh") == 0o755  # new: this user's umask, executable, never set-id
    assert mode("plain.txt") == 0o644
    assert all(os.stat(project / n).st_uid == os.getuid() for n in ("script.sh", "plain.txt", "keep.txt"))


def test_apply_never_writes_through_a_host_symlink_or_makes_a_link_out(project, tmp_path, core):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), project / "ext")  # the user's own link out of the project
    rev = run_agent(make_copy(project, tmp_path), "printf 'x' > sub/deep/new.txt; ln -s ext/secret via-ext")
    # meanwhile the host's sub/deep becomes a link out
    os.rename(project / "sub" / "deep", tmp_path / "moved-deep")
    os.symlink(str(outside), project / "sub" / "deep")
    with pytest.raises(ConflictError, match="sub/deep/new.txt: a folder on its way is a file or a symlink"):
        apply_and_report(rev, lambda line: None)
    assert list(outside.iterdir()) == []
    os.unlink(project / "sub" / "deep")
    os.rename(tmp_path / "moved-deep", project / "sub" / "deep")
    outcome = apply_and_report(rev, lambda line: None)
    assert (project / "sub" / "deep" / "new.txt").read_bytes() == b"x"
    assert not os.path.lexists(project / "via-ext")  # lexically inside, but it leads out through ext
    assert [r.path for r in outcome.refused if r.path == b"via-ext"] == [b"via-ext"]


def test_a_file_becomes_a_folder_and_a_folder_a_file(project, tmp_path, core):
    rev = run_agent(make_copy(project, tmp_path), "rm keep.txt && mkdir keep.txt && printf 'in' > keep.txt/inner; "
                                                   "rm -r sub && printf 'now a file' > sub")
    apply_and_report(rev, lambda line: None)
    assert (project / "keep.txt" / "inner").read_bytes() == b"in"
    assert (project / "sub").read_bytes() == b"now a file"


def test_a_live_project_mount_in_the_way_is_refused_and_a_dead_one_detached(tmp_path, core):
    """``/app`` may hold another command's project mount: removing the folder would delete the
    host's files through it, so the copy refuses (a tmpfs named like the tool's mounts plays it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    root = tmp_path / "plain"
    root.mkdir()
    (root / "f").write_text("f")
    copy = make_copy(root, tmp_path)
    app = Path(copy.guest_dir)
    app.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "devops-tasks:0123456789abcdef:confined:t0k3n", str(app)], check=True)
    try:
        (app / "host-file").write_text("must survive")
        with pytest.raises(review.copy.CopyError, match="holds a live project mount"):
            with copy.attached(LocalConn()):
                pass
        assert (app / "host-file").read_text() == "must survive"
    finally:
        subprocess.run(["umount", "-l", str(app)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "other-fs", str(app / "..") if False else str(app)], check=True)
    try:
        with copy.attached(LocalConn()):
            assert sorted(os.listdir(app)) == ["f"]  # the foreign mount was detached, the copy made
    finally:
        subprocess.run(["umount", "-l", str(app)], check=False)


def test_after_the_run_the_copy_goes_and_the_next_run_starts_clean(project, tmp_path, core):
    import time

    copy = make_copy(project, tmp_path)
    run_agent(copy, "printf 'x' > left-over.txt")
    app = Path(copy.guest_dir)
    assert list(app.iterdir()) == [] and not Path(copy.tool_dir).exists()
    deadline = time.monotonic() + 30
    while [p for p in tmp_path.iterdir() if ".trash-" in p.name]:  # removed in the background
        assert time.monotonic() < deadline, "the old copy is still there"
        time.sleep(0.05)
    again = make_copy(project, tmp_path)
    with again.attached(LocalConn()):
        assert not (app / "left-over.txt").exists() and (app / "keep.txt").exists()


def test_the_openssh_path_carries_the_same_review(project, tmp_path, core, monkeypatch):
    """With the VM's target the guest commands run through ``ssh`` (here: its argv runs locally)."""
    seen = []

    def ssh_argv(target, words, **kw):
        seen.append((target, kw))
        return list(words)

    monkeypatch.setattr(review.copy.guest, "ssh_argv", ssh_argv)
    target = object()
    copy = make_copy(project, tmp_path, target=target)
    rev = run_agent(copy, AGENT, conn=object())  # the Paramiko connection is never used
    assert [c.path for c in rev.change_set().changes] == [b"added.txt", b"edit.txt", b"gone.txt", b"good-link",
                                                          b"tasks.py"]
    assert rev.agent_commits == 1
    assert seen and all(t is target and kw == {"forward_agent": False, "tty": False} for t, kw in seen)
    apply_and_report(rev, lambda line: None)
    assert (project / "edit.txt").read_text() == "a\nB\nc\nmore\n"


def test_the_question_after_a_run(project, tmp_path, core):
    rev = run_agent(make_copy(project, tmp_path), "printf 'q\\n' > asked.txt")
    lines, written = [], []
    answers = iter(["d", "maybe"])
    assert not review.offer(rev, tty=True, echo=lines.append, ask=lambda q: (lines.append(q), next(answers))[1],
                            write=written.append)
    assert f"Apply 1 change to {project}? [y/N/d] " in lines
    assert b"+q\n" in written[0]  # d: the patch, then the question again; anything else: no
    assert any(line.startswith(f"Not applied. Apply it with: inv claude.apply --review {rev.id}") for line in lines)
    assert not (project / "asked.txt").exists()

    def interrupted(q):
        raise KeyboardInterrupt

    assert not review.offer(rev, tty=True, echo=lines.append, ask=interrupted)  # Ctrl-C: no
    lines.clear()
    assert not review.offer(rev, tty=False, echo=lines.append)
    assert lines[-1].startswith("Not applied (no terminal). Apply it with: inv claude.apply --review")
    assert review.offer(rev, tty=True, echo=lines.append, ask=lambda q: "y")
    assert (project / "asked.txt").read_text() == "q\n"

"""claude_code (``claude``): auth resolution, what is gathered on the host, how it travels, the task.

The guest is replaced by recorders; the wrapper script and the env file are run by a real ``sh``
here with a stand-in ``claude``, so what the guest would do is checked for real.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import signal
import socket
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from devops_tasks import claude_code, guest
from devops_tasks.config import Config
from devops_tasks.devops import DevOps
from devops_tasks.lifecycle import VM
from devops_tasks.signals import stop_as_interrupt
from devops_tasks.errors import DevopsError, GuestError, ProjectError
from devops_tasks.options import ClaudeOptions

SECRET = "sk-ant-unit-" + "Zq9" * 8
REAL_SFTP_SERVER_COMMAND = guest.sftp_server_command


# --------------------------------------------------------------------------- resolve_auth


@pytest.mark.parametrize(
    "opts, expected",
    [
        (ClaudeOptions(), ["ssh", "gh", "anthropic", "git"]),
        (ClaudeOptions(no_auth=True), []),
        (ClaudeOptions(auth=["git"]), ["git"]),
        (ClaudeOptions(auth=["git,ssh"]), ["ssh", "git"]),
        (ClaudeOptions(auth=["anthropic", "gh, ssh"]), ["ssh", "gh", "anthropic"]),
        (ClaudeOptions(auth=["GH", "gh"]), ["gh"]),
        (ClaudeOptions(auth=[","]), ["ssh", "gh", "anthropic", "git"]),
    ],
)
def test_resolve_auth(opts, expected):
    assert claude_code.resolve_auth(opts) == expected


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(claude_code.AuthError) as info:
        claude_code.resolve_auth(ClaudeOptions(auth=["gh,aws", "npm"]))
    assert str(info.value) == "unknown auth kinds 'aws', 'npm' (valid: ssh, gh, anthropic, git)"
    assert isinstance(info.value, DevopsError)
    with pytest.raises(claude_code.AuthError, match=r"unknown auth kind 'x' \(valid: ssh, gh, anthropic, git\)"):
        claude_code.resolve_auth(ClaudeOptions(auth=["x"]))


def test_no_auth_with_auth_is_a_contradiction():
    with pytest.raises(claude_code.AuthError, match="--no-auth"):
        claude_code.resolve_auth(ClaudeOptions(no_auth=True, auth=["gh"]))


def test_split_auth():
    assert claude_code.split_auth(None) == []
    assert claude_code.split_auth("gh,git") == ["gh", "git"]
    assert claude_code.split_auth(["gh", " ssh , anthropic "]) == ["gh", "ssh", "anthropic"]


# --------------------------------------------------------------------------- gather_credentials


@pytest.fixture
def agent_sock(tmp_path):
    path = tmp_path / "agent.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    yield str(path)
    sock.close()


@pytest.fixture
def host_home(tmp_path):
    home = tmp_path / "hosthome"
    gh = home / ".config" / "gh"
    gh.mkdir(parents=True)
    (gh / "hosts.yml").write_text("github.com:\n  oauth_token: gho_x\n")
    (gh / "hosts.yml").chmod(0o600)
    (gh / "config.yml").write_text("git_protocol: ssh\n")
    (gh / "config.yml").chmod(0o644)
    return home


def git_reader(values):
    return lambda key: values.get(key, "")


FULL_GIT = {"user.name": "Ada Lovelace", "user.email": "ada@example.com"}


def test_gather_everything(agent_sock, host_home):
    environ = {"SSH_AUTH_SOCK": agent_sock, "ANTHROPIC_API_KEY": SECRET}
    creds = claude_code.gather_credentials(claude_code.AUTH_KINDS, environ, host_home, git_reader(FULL_GIT))
    assert creds.kinds == ["ssh", "gh", "anthropic", "git"]
    assert creds.agent is True
    assert creds.gh_tar and "gh" in creds.kinds
    assert creds.env == {
        "ANTHROPIC_API_KEY": SECRET,
        "GIT_AUTHOR_NAME": "Ada Lovelace",
        "GIT_COMMITTER_NAME": "Ada Lovelace",
        "GIT_AUTHOR_EMAIL": "ada@example.com",
        "GIT_COMMITTER_EMAIL": "ada@example.com",
    }
    assert creds.notes == []
    assert creds.summary() == "Auth forwarded: SSH agent, gh, anthropic, git"
    assert SECRET not in repr(creds)


def test_gather_only_what_was_asked(agent_sock, host_home):
    environ = {"SSH_AUTH_SOCK": agent_sock, "ANTHROPIC_API_KEY": SECRET}
    creds = claude_code.gather_credentials(["git"], environ, host_home, git_reader(FULL_GIT))
    assert creds.kinds == ["git"] and not creds.agent and creds.gh_tar == b""
    assert set(creds.env) == {"GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"}
    creds = claude_code.gather_credentials([], environ, host_home, git_reader(FULL_GIT))
    assert creds.kinds == [] and creds.env == {} and not creds.agent and creds.gh_tar == b""
    assert creds.summary() == "Auth forwarded: (none)"


def test_gather_leaves_out_what_the_host_lacks(tmp_path):
    empty_home = tmp_path / "empty"
    (empty_home / ".config" / "gh").mkdir(parents=True)  # a gh folder without files is no config
    environ = {"SSH_AUTH_SOCK": str(tmp_path / "gone.sock"), "ANTHROPIC_API_KEY": ""}
    creds = claude_code.gather_credentials(claude_code.AUTH_KINDS, environ, empty_home, git_reader({}))
    assert creds.kinds == [] and creds.env == {} and not creds.agent and creds.gh_tar == b""
    assert creds.summary() == "Auth forwarded: (none)"
    assert [note.split(":")[0] for note in creds.notes] == ["SSH agent", "gh", "anthropic", "git"]
    assert "neither ANTHROPIC_API_KEY nor CLAUDE_CODE_OAUTH_TOKEN is set" in creds.notes[2]


def test_gather_git_with_only_a_name(host_home):
    creds = claude_code.gather_credentials(["git"], {}, host_home, git_reader({"user.name": "Ada"}))
    assert creds.kinds == ["git"]
    assert creds.env == {"GIT_AUTHOR_NAME": "Ada", "GIT_COMMITTER_NAME": "Ada"}


def test_host_git_config_reads_git_config_global(tmp_path, monkeypatch):
    cfg = tmp_path / "gitconfig"
    cfg.write_text("[user]\n\tname = Ada Lovelace\n\temail = ada@example.com\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(cfg))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    assert claude_code.host_git_config("user.name", cwd=tmp_path) == "Ada Lovelace"
    assert claude_code.host_git_config("user.email", cwd=tmp_path) == "ada@example.com"
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "none"))
    assert claude_code.host_git_config("user.name", cwd=tmp_path) == ""


# --------------------------------------------------------------------------- how it travels


def test_gh_tar_keeps_modes_and_makes_root_the_owner(host_home, tmp_path):
    gh = host_home / ".config" / "gh"
    (gh / "sub").mkdir(mode=0o700)
    (gh / "sub" / "x").write_text("x")
    (gh / "dangling").symlink_to(tmp_path / "missing")
    (gh / "fifo").mkdir()
    os.rmdir(gh / "fifo")
    os.mkfifo(gh / "fifo")
    data, files = claude_code.gh_tar(gh)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        entries = {m.name: m for m in tar.getmembers()}
    assert set(entries) == {"gh", "gh/config.yml", "gh/hosts.yml", "gh/sub", "gh/sub/x"}  # no fifo, no dangling link
    assert files == 3
    assert entries["gh/hosts.yml"].mode == 0o600 and entries["gh/config.yml"].mode == 0o644
    assert entries["gh/sub"].mode == 0o700 and entries["gh/sub"].isdir()
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "root" for m in entries.values())


def test_env_file_round_trips_through_sh(tmp_path):
    env = {"ANTHROPIC_API_KEY": SECRET, "GIT_AUTHOR_NAME": "O'Brien \"$HOME\" `id` \\ ;|&", "X": "a\nb"}
    envfile = tmp_path / "env"
    envfile.write_text(claude_code.env_file_text(env))
    out = subprocess.run(
        ["sh", "-c", '. "$1"; printf "%s\\0" "$ANTHROPIC_API_KEY" "$GIT_AUTHOR_NAME" "$X"', "sh", str(envfile)],
        capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]},
    ).stdout
    assert out.split("\0")[:3] == [env["ANTHROPIC_API_KEY"], env["GIT_AUTHOR_NAME"], "a\nb"]
    with pytest.raises(GuestError, match="invalid environment variable name"):
        claude_code.env_file_text({"A B": "x"})


@pytest.fixture
def fake_claude(tmp_path):
    """A stand-in claude on PATH that records its argv, cwd and two env values."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "record"
    script = bindir / "claude"
    script.write_text(
        "#!/bin/sh\n"
        f"{{ pwd; for a in \"$@\"; do echo \"arg:$a\"; done; echo \"key:${{ANTHROPIC_API_KEY:-unset}}\"; "
        f"echo \"name:${{GIT_AUTHOR_NAME:-unset}}\"; }} > {shlex.quote(str(record))}\n"
        "exit 3\n"
    )
    script.chmod(0o755)
    return bindir, record


def test_wrapper_sources_deletes_and_execs(tmp_path, fake_claude):
    bindir, record = fake_claude
    workdir = tmp_path / "app"
    workdir.mkdir()
    envfile = tmp_path / "secret.env"
    envfile.write_text(claude_code.env_file_text({"ANTHROPIC_API_KEY": SECRET, "GIT_AUTHOR_NAME": "Ada"}))
    envfile.chmod(0o600)
    script = claude_code.wrapper_script(str(envfile), model="claude-x 1", workdir=str(workdir), user="",
                                        args=["-p", "fix it; rm -rf $HOME", "--dangerously-skip-permissions"])
    assert SECRET not in script
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}
    result = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 3
    assert record.read_text().splitlines() == [
        str(workdir), "arg:--model", "arg:claude-x 1", "arg:-p", "arg:fix it; rm -rf $HOME",
        "arg:--dangerously-skip-permissions", f"key:{SECRET}", "name:Ada",
    ]
    assert not envfile.exists()  # deleted before claude ran


def test_wrapper_without_env_or_model(tmp_path, fake_claude):
    bindir, record = fake_claude
    script = claude_code.wrapper_script("", workdir=str(tmp_path), user="")
    assert "ANTHROPIC" not in script and ". " not in script
    subprocess.run(["sh", "-c", script], env={"PATH": f"{bindir}:/usr/bin:/bin", "ANTHROPIC_API_KEY": ""})
    assert record.read_text().splitlines() == [str(tmp_path), "key:unset", "name:unset"]


def test_prepare_and_cleanup_remove_every_credential_of_a_run():
    assert claude_code.GUEST_GH_DIR.startswith(claude_code.GUEST_SECRETS_DIR + "/")
    assert claude_code.new_env_file().startswith(claude_code.GUEST_SECRETS_DIR + "/")
    assert "rm -rf /run/devops-tasks-claude" in claude_code.prepare_script()
    assert "command -v claude" in claude_code.prepare_script()
    assert claude_code.cleanup_script().endswith("rm -rf /run/devops-tasks-claude\n")
    assert "su -s /bin/sh dev -c 'kill -KILL -1'" in claude_code.cleanup_script()  # the agent's processes end


def test_a_symlinked_gh_config_is_followed_and_forwarded(host_home, tmp_path):
    """Dotfile managers link hosts.yml (or the whole folder) into place: what they point at goes."""
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    gh = host_home / ".config" / "gh"
    real = dotfiles / "hosts.yml"
    real.write_text("github.com:\n    oauth_token: gho_linked\n")
    (gh / "hosts.yml").unlink()
    (gh / "config.yml").unlink()
    (gh / "hosts.yml").symlink_to(real)
    creds = claude_code.gather_credentials(["gh"], {}, host_home, git_reader({}))
    assert creds.kinds == ["gh"]
    with tarfile.open(fileobj=io.BytesIO(creds.gh_tar)) as tar:
        member = tar.getmember("gh/hosts.yml")
        assert member.isfile() and b"gho_linked" in tar.extractfile(member).read()


def test_a_gh_folder_with_nothing_to_copy_is_not_said_to_be_forwarded(host_home, tmp_path):
    gh = host_home / ".config" / "gh"
    for child in gh.iterdir():
        child.unlink()
    (gh / "hosts.yml").symlink_to(tmp_path / "gone")
    creds = claude_code.gather_credentials(["gh"], {}, host_home, git_reader({}))
    assert creds.kinds == [] and creds.notes and "gh" not in creds.summary().split(": ", 1)[1]


# --------------------------------------------------------------------------- claude() with a fake guest


class Guest:
    def __init__(self):
        self.calls = []
        self.fed = []  # (command, data)
        self.prepare_status = 0
        self.status = 0
        self.confine = []  # ("check" or "mount", the confine mode asked for)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    g = Guest()
    key = tmp_path / "id"
    key.write_text("k")
    where = guest.Target(port=40022, identity=key, known_hosts=key)
    monkeypatch.setattr(VM, "target", lambda self: where)

    @contextlib.contextmanager
    def session(target, forward_agent=False):
        g.calls.append(("session", forward_agent))
        try:
            yield "conn"
        finally:
            g.calls.append(("closed",))

    class Mount:
        def __init__(self, conn, host_dir, guest_dir="/app", **kw):
            g.calls.append(("mount", Path(host_dir), guest_dir))
            g.confine.append(("mount", kw.get("confine"), kw.get("read_only")))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            g.calls.append(("unmount",))

    def capture(conn, command, timeout=30.0):
        if "command -v claude" in command:
            g.calls.append(("prepare",))
            return g.prepare_status, "", ""
        g.calls.append(("cleanup", command))
        return 0, "", ""

    def feed(conn, command, data, timeout=60.0):
        g.calls.append(("feed", command))
        g.fed.append((command, data))
        return 0, ""

    def run_foreground(argv, timeout=None):
        g.calls.append(("ssh", list(argv)))
        return g.status

    class Copy:
        """The copy in /app: what the run does around it, in order."""

        def __init__(self, root, vm_name, **kw):
            g.copy = (Path(root), vm_name, kw)
            self.review = None

        @contextlib.contextmanager
        def attached(self, conn, stop_agent):
            g.calls.append(("copy-in",))
            try:
                yield self
            finally:
                stop_agent()
                g.calls.append(("collect",))

    monkeypatch.setattr(guest, "session", session)
    monkeypatch.setattr(claude_code.review, "ProjectCopy", Copy)

    def sftp_server_command(host_dir, server=None, confine=None, environ=None, read_only=()):
        g.confine.append(("check", confine, read_only))

    monkeypatch.setattr(guest, "Mount", Mount)
    monkeypatch.setattr(guest, "sftp_server_command", sftp_server_command)
    monkeypatch.setattr(guest, "capture", capture)
    monkeypatch.setattr(claude_code, "run_session", run_foreground)
    monkeypatch.setattr(claude_code, "feed", feed)
    return g


@pytest.fixture
def dev(monkeypatch):
    lines = []
    vm = VM("core-dev", Config(), echo=lines.append)
    vm.lines = lines
    vm.booted = 0
    monkeypatch.setattr(VM, "is_running", lambda self: self.booted > 0)

    def boot(self, opts=None):
        self.booted += 1

    monkeypatch.setattr(VM, "boot", boot)
    return vm


def run_claude(dev, tmp_path, opts, environ, home, git=FULL_GIT, interactive=False):
    project = tmp_path / "proj"
    project.mkdir(exist_ok=True)
    return claude_code.claude(dev, project, opts, environ=environ, home=home, git_config_reader=git_reader(git),
                          interactive=interactive)


def ssh_call(g):
    (argv,) = [c[1] for c in g.calls if c[0] == "ssh"]
    return argv


def test_claude_default_forwards_all_without_secrets_in_argv(dev, fake, tmp_path, host_home, agent_sock, monkeypatch):
    monkeypatch.setenv("SSH_AUTH_SOCK", agent_sock)  # ssh_argv looks at the real environment
    environ = {"SSH_AUTH_SOCK": agent_sock, "ANTHROPIC_API_KEY": SECRET}
    dev.booted = 1
    fake.status = 5
    assert run_claude(dev, tmp_path, ClaudeOptions(model="opus"), environ, host_home) == 5
    kinds = [c[0] for c in fake.calls]
    # the copy is read back once the agent's processes and credentials are gone (the first cleanup)
    assert kinds == ["session", "prepare", "copy-in", "feed", "feed", "ssh", "cleanup", "collect", "cleanup", "closed"]
    assert fake.calls[0] == ("session", False)  # the Fabric connection never forwards the agent
    gh_cmd, gh_data = fake.fed[0]
    assert "tar -x -p" in gh_cmd and "-C /run/devops-tasks-claude" in gh_cmd  # tmpfs, never the disk
    env_cmd, env_data = fake.fed[1]
    assert SECRET.encode() in env_data and SECRET not in env_cmd and "umask 077" in env_cmd
    argv = ssh_call(fake)
    assert not any(SECRET in word for word in argv)
    assert "-A" in argv and "-a" not in argv and "-T" in argv
    script = shlex.split(argv[-1])
    assert script[:2] == ["sh", "-c"] and "exec su -s /bin/sh dev -c 'exec \"$@\"' -- sh claude --model opus" in script[2]
    envfile = env_cmd.rsplit("> ", 1)[1]
    assert envfile.startswith("/run/devops-tasks-claude/") and envfile in script[2]
    assert fake.calls[-2][1] == claude_code.cleanup_script()  # the env file and gh copy go after the run
    assert "Auth forwarded: SSH agent, gh, anthropic, git" in dev.lines
    assert all(SECRET not in line for line in dev.lines)
    assert dev.booted == 1  # it was running: no boot


def test_claude_no_auth_forwards_nothing(dev, fake, tmp_path, host_home, agent_sock, monkeypatch):
    monkeypatch.setenv("SSH_AUTH_SOCK", agent_sock)
    environ = {"SSH_AUTH_SOCK": agent_sock, "ANTHROPIC_API_KEY": SECRET}
    dev.booted = 1
    assert run_claude(dev, tmp_path, ClaudeOptions(no_auth=True), environ, host_home, interactive=True) == 0
    assert fake.fed == []
    argv = ssh_call(fake)
    assert "-a" in argv and "-A" not in argv and "IdentityAgent=none" in argv
    assert "-tt" in argv  # a real terminal when interactive
    assert "claude" in argv[-1] and ". " not in shlex.split(argv[-1])[2]
    assert "Auth forwarded: (none)" in dev.lines
    assert [c[0] for c in fake.calls].count("prepare") == 1  # a previous gh copy is removed even now


def test_claude_single_kind_and_notes(dev, fake, tmp_path, agent_sock, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    empty = tmp_path / "emptyhome"
    empty.mkdir()
    dev.booted = 1
    environ = {"ANTHROPIC_API_KEY": SECRET}
    run_claude(dev, tmp_path, ClaudeOptions(auth=["ssh,gh,anthropic"]), environ, empty)
    assert len(fake.fed) == 1
    assert fake.fed[0][1].decode() == f"export ANTHROPIC_API_KEY={SECRET}\n"  # nothing else travels
    assert "-a" in ssh_call(fake)
    assert "Auth forwarded: anthropic" in dev.lines
    notes = [line for line in dev.lines if line.startswith("Not forwarded:")]
    assert len(notes) == 2 and "SSH agent" in notes[0] and "gh" in notes[1]


def test_claude_boots_a_stopped_vm(dev, fake, tmp_path, host_home):
    assert run_claude(dev, tmp_path, ClaudeOptions(no_auth=True), {}, host_home) == 0
    assert dev.booted == 1
    assert dev.lines[0] == "Dev environment not running, booting..."


def test_claude_not_installed(dev, fake, tmp_path, host_home):
    dev.booted = 1
    fake.prepare_status = claude_code.NOT_INSTALLED_STATUS
    with pytest.raises(GuestError) as info:
        run_claude(dev, tmp_path, ClaudeOptions(), {"ANTHROPIC_API_KEY": SECRET}, host_home)
    message = str(info.value)
    assert "claude is not installed" in message and "--recipe claude" in message and "images.build.recipe: claude" in message
    assert "\n" not in message
    assert fake.fed == [] and not any(c[0] in ("mount", "ssh") for c in fake.calls)


def test_claude_bad_input_fails_before_the_vm(dev, fake, tmp_path, host_home):
    with pytest.raises(claude_code.AuthError):
        run_claude(dev, tmp_path, ClaudeOptions(auth=["nope"]), {}, host_home)
    with pytest.raises(ProjectError):
        claude_code.claude(dev, tmp_path / "missing", ClaudeOptions(), environ={}, home=host_home)
    assert dev.booted == 0 and fake.calls == []


def test_claude_works_on_a_copy_by_default(dev, fake, tmp_path, host_home):
    dev.booted = 1
    assert run_claude(dev, tmp_path, ClaudeOptions(no_auth=True, include_ignored=True), {}, host_home) == 0
    assert fake.confine == [] and not any(c[0] == "mount" for c in fake.calls)  # no mount, no sftp-server
    root, name, kw = fake.copy
    assert root == (tmp_path / "proj").resolve() and name == "core-dev"
    assert kw["include_ignored"] is True and kw["guest_dir"] == "/app" and kw["agent_user"] == "dev"


def test_claude_live_asks_for_a_confined_mount_with_git_read_only(dev, fake, tmp_path, host_home):
    dev.booted = 1
    assert run_claude(dev, tmp_path, ClaudeOptions(no_auth=True, live=True), {}, host_home) == 0
    assert fake.confine == [("check", "require", (".git",)), ("mount", "require", (".git",))]
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["session", "prepare", "mount", "ssh", "unmount", "cleanup", "closed"]


def test_claude_refuses_an_unconfined_mount_before_booting(dev, fake, tmp_path, host_home, monkeypatch):
    monkeypatch.setattr(guest, "sftp_server_command", REAL_SFTP_SERVER_COMMAND)
    monkeypatch.setattr(guest.sftp_server, "find_bwrap", lambda environ=None: None)
    monkeypatch.setattr(guest.sftp_server, "find_sftp_server", lambda environ=None: "/usr/lib/openssh/sftp-server")
    monkeypatch.setattr(guest.sftp_server, "_warned", set())
    monkeypatch.delenv("CORE_MOUNT_CONFINE", raising=False)
    live = ClaudeOptions(no_auth=True, live=True)
    with pytest.raises(GuestError) as info:
        run_claude(dev, tmp_path, live, {}, host_home)
    message = str(info.value)
    assert "refusing to mount the project unconfined" in message and "apt-get install bubblewrap" in message
    assert "CORE_MOUNT_CONFINE=off" in message and "\n" not in message
    assert dev.booted == 0 and fake.calls == []
    monkeypatch.setenv("CORE_MOUNT_CONFINE", "auto")  # auto is not enough for claude
    with pytest.raises(GuestError, match="refusing to mount the project unconfined"):
        run_claude(dev, tmp_path, live, {}, host_home)
    monkeypatch.setenv("CORE_MOUNT_CONFINE", "off")  # said explicitly: runs
    assert run_claude(dev, tmp_path, live, {}, host_home) == 0
    assert dev.booted == 1


def test_claude_on_a_copy_needs_no_sandbox(dev, fake, tmp_path, host_home, monkeypatch):
    monkeypatch.setattr(guest, "sftp_server_command", REAL_SFTP_SERVER_COMMAND)
    monkeypatch.setattr(guest.sftp_server, "find_bwrap", lambda environ=None: None)
    monkeypatch.delenv("CORE_MOUNT_CONFINE", raising=False)
    assert run_claude(dev, tmp_path, ClaudeOptions(no_auth=True), {}, host_home) == 0


def test_claude_ctrl_c_cleans_up(dev, fake, tmp_path, host_home, monkeypatch):
    dev.booted = 1

    def interrupted(argv, timeout=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(claude_code, "run_session", interrupted)
    assert run_claude(dev, tmp_path, ClaudeOptions(auth=["gh"]), {}, host_home) == 130
    kinds = [c[0] for c in fake.calls]
    assert kinds[-4:] == ["cleanup", "collect", "cleanup", "closed"]  # Ctrl-C keeps the review


# --------------------------------------------------------------------------- the task


def test_task_parses_flags(monkeypatch, tmp_path):
    from invoke import Program

    from devops_tasks.tasks import ns

    seen = []

    def claude(self, project_dir, opts=None):
        seen.append((self.name, str(project_dir), opts))
        return 0

    monkeypatch.setattr(DevOps, "claude", claude)
    program = Program(namespace=ns)
    program.run(["inv", "claude", "--auth", "gh", "--auth", "git,ssh", "--model", "m1", "--vm", "v2",
                 "--project", str(tmp_path)], exit=False)
    program.run(["inv", "claude", "--no-auth", "--live"], exit=False)
    program.run(["inv", "claude", "--include-ignored"], exit=False)
    program.run(["inv", "claude"], exit=False)
    assert seen[0] == ("v2", str(tmp_path), ClaudeOptions(auth=["gh", "git", "ssh"], model="m1"))
    assert seen[1][2] == ClaudeOptions(no_auth=True, live=True)
    assert seen[2][2] == ClaudeOptions(include_ignored=True)
    assert seen[3][1:] == (".", ClaudeOptions())


def test_task_exit_status_and_errors(monkeypatch):
    from invoke import Program

    from devops_tasks.tasks import ns

    monkeypatch.setattr(DevOps, "claude", lambda self, p, o=None: 4)
    with pytest.raises(SystemExit) as info:
        Program(namespace=ns).run(["inv", "claude"])
    assert info.value.code == 4


def test_run_session_status_and_termination(tmp_path):
    assert claude_code.run_session(["sh", "-c", "exit 6"]) == 6
    assert claude_code.run_session(["sh", "-c", "kill -TERM $$"]) == 128 + signal.SIGTERM
    with pytest.raises(GuestError, match="not found"):
        claude_code.run_session(["no-such-ssh-binary-xyz"])


def test_run_session_ends_ssh_on_sigterm(tmp_path):
    """SIGTERM to this process (KeyboardInterrupt via stop_as_interrupt) ends the session's process."""
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {shlex.quote(str(pidfile))}; exec sleep 60"
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        with stop_as_interrupt():
            claude_code.run_session(["sh", "-c", script])
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_one_claude_session_per_vm(dev, fake, tmp_path, host_home):
    from devops_tasks.fsutil import file_lock

    dev.booted = 1
    dev.dir.ensure()
    with file_lock(dev.dir.path / "claude.lock"):  # another session holds the VM
        with pytest.raises(claude_code.SessionBusyError, match="already running on VM 'core-dev'"):
            run_claude(dev, tmp_path, ClaudeOptions(no_auth=True), {}, host_home)
    assert [c for c in fake.calls if c[0] in ("session", "feed", "ssh")] == []
    assert run_claude(dev, tmp_path, ClaudeOptions(no_auth=True), {}, host_home) == 0


def test_ctrl_c_while_the_env_file_is_written_still_removes_it(dev, fake, monkeypatch, tmp_path, host_home):
    """The env file's folder goes on every exit path, even before its name was recorded."""
    dev.booted = 1

    def interrupted(conn, command, data, timeout=60.0):
        fake.calls.append(("feed", command))
        raise KeyboardInterrupt

    monkeypatch.setattr(claude_code, "feed", interrupted)
    assert run_claude(dev, tmp_path, ClaudeOptions(auth=["anthropic"]), {"ANTHROPIC_API_KEY": SECRET},
                      host_home) == 130
    assert ("cleanup", claude_code.cleanup_script()) in fake.calls

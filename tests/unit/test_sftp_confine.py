"""The mount's host-side sftp-server runs in a bubblewrap sandbox that sees only the project.

Host-only (no VM): OpenSSH's ``sftp -D CMD`` client talks straight to a local server command, a
tiny wrapper that starts exactly what :class:`guest.Mount` starts (``guest.sftp_server_command``).
Whatever speaks SFTP on the mount's channel (the guest is root in the VM; ``inv claude`` runs an
agent there) must get the project and nothing else: no sibling folder, no /etc/shadow, no file
outside reached through a symlink in the project.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import needs
from devops_tasks import guest
from devops_tasks.errors import GuestError

try:
    SFTP_SERVER = guest.find_sftp_server()
except GuestError:
    SFTP_SERVER = None

WRAPPER = """\
import os, sys
from pathlib import Path
from devops_tasks import guest
command = guest.sftp_server_command(Path(os.environ["TEST_PROJECT"]), confine=os.environ["TEST_CONFINE"],
                                   read_only=[p for p in os.environ.get("TEST_READ_ONLY", "").split(",") if p])
sys.exit(command.start().wait())
"""


def _sandbox_problem() -> str:
    """Why a bubblewrap sandbox cannot run here ("" when it can), found without the product's
    code: when bwrap works and the product's sandbox does not, the tests below fail."""
    if SFTP_SERVER is None:
        return "no sftp-server on this machine (apt-get install openssh-sftp-server)"
    return needs.tool_problem("sftp", "openssh-client") or needs.bwrap_problem()


needs_bwrap = needs.mark(_sandbox_problem())
needs_sftp_server = needs.mark("" if SFTP_SERVER else "no sftp-server on this machine (apt-get install "
                               "openssh-sftp-server)")


@pytest.fixture
def fresh(monkeypatch):
    """No remembered probe or warning from an earlier test; CORE_MOUNT_CONFINE unset."""
    monkeypatch.setattr(guest.sftp_server, "_probed", {})
    monkeypatch.setattr(guest.sftp_server, "_warned", set())
    monkeypatch.delenv("CORE_MOUNT_CONFINE", raising=False)


@pytest.fixture
def layout(tmp_path):
    """A project (an awkward name: spaces, quotes, %) with a link out, and a secret beside it."""
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    secret = secret_dir / "id_ed25519"
    secret.write_text("PRIVATE KEY\n")
    project = tmp_path / "my proj 'q' %d %u"
    project.mkdir()
    (project / "hello.txt").write_text("hello\n")
    (project / "link-out").symlink_to(secret)
    (project / "root-link").symlink_to("/")
    download = tmp_path / "download"
    download.mkdir()
    wrapper = tmp_path / "server"
    wrapper.write_text(f"#!{sys.executable}\n{WRAPPER}")
    wrapper.chmod(0o755)
    return project, secret, download, wrapper


def sftp(wrapper: Path, project: Path, download: Path, commands: list[str], confine: str, read_only: str = ""):
    """Run a batch of sftp commands (a leading "-" lets the batch go on after a failure)."""
    env = {**os.environ, "TEST_PROJECT": str(project), "TEST_CONFINE": confine, "TEST_READ_ONLY": read_only}
    env.pop("CORE_MOUNT_CONFINE", None)
    return subprocess.run(["sftp", "-b", "-", "-D", str(wrapper)], input="\n".join(commands) + "\n",
                          capture_output=True, text=True, cwd=download, env=env, timeout=60)


# --------------------------------------------------------------------------- the real sandbox


@needs_bwrap
def test_the_project_reads_and_writes(layout):
    project, _, download, wrapper = layout
    result = sftp(wrapper, project, download, ["get hello.txt", "put hello.txt from-guest.txt", "mkdir new-dir",
                                               "ls"], confine="require")
    assert result.returncode == 0, result.stderr
    assert (download / "hello.txt").read_text() == "hello\n"
    assert (project / "from-guest.txt").read_text() == "hello\n"
    assert (project / "new-dir").is_dir()


@needs_bwrap
def test_git_takes_no_write_through_a_read_only_mount(layout):
    """``inv claude --live``: .git (config, hooks: code the host runs) takes no write, by any name."""
    project, _, download, wrapper = layout
    git = project / ".git"
    (git / "hooks").mkdir(parents=True)
    (git / "config").write_text("[core]\n")
    (project / "into-git").symlink_to(".git")
    (download / "evil").write_text("[core]\n\tfsmonitor = touch /tmp/pwned\n")
    before = {p: p.read_bytes() for p in git.rglob("*") if p.is_file()}
    attempts = ["-put evil .git/config", "-put evil .git/hooks/pre-commit", "-put evil into-git/config",
                "-rm .git/config", "-rename .git/config .git/config.old", "-rename .git moved-git",
                "-mkdir .git/new", "-chmod 777 .git/config", "-symlink /tmp .git/hooks/link",
                "put evil elsewhere.txt"]
    result = sftp(wrapper, project, download, attempts, confine="require", read_only=".git")
    assert result.returncode == 0, result.stderr
    assert {p: p.read_bytes() for p in git.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in git.rglob("*")) == ["config", "hooks"]
    assert (git / "config").stat().st_mode & 0o777 != 0o777
    assert (project / "elsewhere.txt").read_text().startswith("[core]")  # the rest of the project: writable
    # without the read-only bind the same batch reaches .git (the test sees the difference)
    sftp(wrapper, project, download, ["-put evil .git/config"], confine="require")
    assert "fsmonitor" in (git / "config").read_text()


@needs_bwrap
def test_nothing_outside_the_project_is_reachable(layout):
    project, secret, download, wrapper = layout
    attempts = {
        "sibling": f"-get {secret} sibling",
        "dotdot": f"-get ../{secret.parent.name}/{secret.name} dotdot",
        "shadow": "-get /etc/shadow shadow",
        "hostname": "-get /etc/hostname hostname",
        "link": "-get link-out link",
        "via-root-link": f"-get root-link{secret} via-root-link",
        "root-ssh": "-get /root/.ssh/authorized_keys root-ssh",
    }
    writes = [f"-put {download / 'note'} {secret.parent}/planted", "-mkdir /planted-dir",
              "-put hello.txt /etc/planted"]
    (download / "note").write_text("x")
    (download / "hello.txt").write_text("x")
    result = sftp(wrapper, project, download, [*attempts.values(), *writes, "ls -1a /", "ls -1a /etc"],
                  confine="require")
    assert result.returncode == 0, result.stderr
    got = {name for name in attempts if (download / name).exists()}
    assert got == set(), f"read outside the project: {got}"
    assert sorted(os.listdir(secret.parent)) == ["id_ed25519"]
    listed = {line.strip() for line in result.stdout.splitlines() if not line.startswith("sftp>")}
    top = "/" + str(project).split("/")[1]  # the project's ancestors (empty folders but the project)
    allowed = {"/.", "/..", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr", "/dev", "/etc", top,
               "/etc/.", "/etc/..", "/etc/passwd", "/etc/group", "/etc/ld.so.cache"}
    assert "/usr" in listed and "/etc/passwd" in listed
    assert listed <= allowed, f"the sandbox shows more: {listed - allowed}"
    # the sandbox's passwd names this user only
    assert sftp(wrapper, project, download, ["get /etc/passwd passwd"], confine="require").returncode == 0
    assert len((download / "passwd").read_text().splitlines()) == 1


@needs_bwrap
def test_the_sandbox_dev_takes_no_files(layout):
    """The sandbox's /dev is a tmpfs: writable, the guest could fill this machine's memory there."""
    project, _, download, wrapper = layout
    (download / "note").write_text("x" * 1000)
    result = sftp(wrapper, project, download, ["-put note /dev/planted", "-mkdir /dev/planted-dir",
                                               "-put note /dev/shm/planted", "-put note /dev/null", "ls -1a /dev"],
                  confine="require")
    assert result.returncode == 0, result.stderr
    listed = {line.strip().rsplit("/", 1)[-1] for line in result.stdout.splitlines() if line.startswith("/dev/")}
    assert "null" in listed
    assert not {"planted", "planted-dir"} & listed, listed
    shm = sftp(wrapper, project, download, ["ls -1a /dev/shm"], confine="require")
    assert "planted" not in shm.stdout
    for refused in ('dest open "/dev/planted"', 'remote mkdir "/dev/planted-dir"', 'dest open "/dev/shm/planted"'):
        assert refused in result.stderr, result.stderr
    assert "/dev/null" not in result.stderr  # writing to a device still works (sftp-server needs that)


@needs_bwrap
def test_without_the_sandbox_the_same_requests_reach_the_secret(layout):
    """The control: what the sandbox stops is really there when it is off."""
    project, secret, download, wrapper = layout
    result = sftp(wrapper, project, download, [f"get {secret} sibling", "get link-out link"], confine="off")
    assert result.returncode == 0, result.stderr
    assert (download / "sibling").read_text() == (download / "link").read_text() == "PRIVATE KEY\n"


@needs_bwrap
def test_the_confined_server_gets_no_environment_no_network_no_capabilities(layout, fresh):
    project = layout[0]
    command = guest.sftp_server_command(project, confine="require")
    assert command.confined
    argv = command.argv
    assert argv[0].endswith("bwrap")
    for flag in ("--unshare-all", "--die-with-parent", "--new-session"):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert ["--bind", str(project), str(project)] == list(argv[argv.index("--bind"):argv.index("--bind") + 3])
    assert argv[-2:] == ("-d", str(project).replace("%", "%%"))
    assert command.env == {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    mounted = {argv[i + 2] for i, word in enumerate(argv) if word in ("--bind", "--ro-bind")}
    assert not mounted & {"/", "/home", "/root", "/tmp", "/etc", "/proc", "/sys", "/var"}


# --------------------------------------------------------------------------- policy


def test_confine_mode(fresh):
    assert guest.confine_mode(None, {}) == "auto"
    assert guest.confine_mode("require", {}) == "require"
    assert guest.confine_mode("off", {}) == "off"
    assert guest.confine_mode(None, {"CORE_MOUNT_CONFINE": "require"}) == "require"
    assert guest.confine_mode("auto", {"CORE_MOUNT_CONFINE": "Require"}) == "require"
    assert guest.confine_mode("require", {"CORE_MOUNT_CONFINE": "auto"}) == "require"  # claude stays strict
    assert guest.confine_mode("require", {"CORE_MOUNT_CONFINE": "off"}) == "off"  # unless told off
    assert guest.confine_mode(None, {"CORE_MOUNT_CONFINE": ""}) == "auto"
    with pytest.raises(GuestError, match="CORE_MOUNT_CONFINE='yes' is not one of auto, require, off"):
        guest.confine_mode(None, {"CORE_MOUNT_CONFINE": "yes"})


@needs_sftp_server
def test_without_bwrap_auto_warns_once_and_require_refuses(tmp_path, fresh, monkeypatch, capsys):
    monkeypatch.setattr(guest.sftp_server, "find_bwrap", lambda environ=None: None)
    plain = guest.sftp_server_command(tmp_path, environ={})
    assert not plain.confined
    assert plain.argv == (SFTP_SERVER, "-e", "-d", str(tmp_path))
    guest.sftp_server_command(tmp_path, environ={})
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1, warnings
    assert "bubblewrap (bwrap) is not installed" in warnings[0]
    assert "the VM can read and write every host file you can" in warnings[0]
    assert "apt-get install bubblewrap" in warnings[0]
    with pytest.raises(GuestError, match=r"refusing to mount the project unconfined: bubblewrap \(bwrap\) is not "
                                         r"installed \(apt-get install bubblewrap\).*CORE_MOUNT_CONFINE=off"):
        guest.sftp_server_command(tmp_path, confine="require", environ={})
    off = guest.sftp_server_command(tmp_path, confine="require", environ={"CORE_MOUNT_CONFINE": "off"})
    assert not off.confined
    assert capsys.readouterr().err == ""  # off is asked for: no warning


@needs_sftp_server
def test_a_bwrap_that_cannot_sandbox_falls_back_or_refuses_with_its_reason(tmp_path, fresh, monkeypatch, capsys):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(guest.sftp_server, "find_bwrap", lambda environ=None: str(fake))
    assert not guest.sftp_server_command(tmp_path, environ={}).confined
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1
    assert "bubblewrap cannot sandbox the sftp-server here (bwrap: No permissions to creating new namespace)" in warning
    with pytest.raises(GuestError, match="No permissions to creating new namespace"):
        guest.sftp_server_command(tmp_path, confine="require", environ={})


def test_mount_passes_confine_through(tmp_path, fresh, monkeypatch):
    asked = []

    def command(host_dir, server=None, confine=None, environ=None, read_only=()):
        asked.append((confine, read_only))
        raise GuestError("stop here")

    monkeypatch.setattr(guest.mount, "sftp_server_command", command)
    with pytest.raises(GuestError, match="stop here"):
        guest.Mount(object(), tmp_path, confine="require").start()
    with pytest.raises(GuestError, match="stop here"):
        guest.Mount(object(), tmp_path, confine="require", read_only=[".git"]).start()
    assert asked == [("require", ()), ("require", (".git",))]


@needs_sftp_server
def test_the_whole_file_system_cannot_be_confined(fresh, capsys):
    with pytest.raises(GuestError, match=r"the project is / \(the whole file system\)"):
        guest.sftp_server_command(Path("/"), confine="require", environ={})
    assert not guest.sftp_server_command(Path("/"), environ={}).confined
    assert "the project is /" in capsys.readouterr().err

"""Login and host keys, known_hosts replacement (never appending beside an old key), ssh argv."""

import base64
import hashlib
import hmac
import multiprocessing
import os

import pytest

import needs
from devops_tasks import hostkeys, paths
from devops_tasks.errors import NotRunningError

needs_keygen = needs.mark(needs.tool_problem("ssh-keygen", "openssh-client"))


def hashed(name: str, salt: bytes = b"0123456789abcdefghij") -> str:
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


@needs_keygen
def test_login_key_is_made_once_private(isolated_core_home):
    path = hostkeys.ensure_login_key()
    assert path == isolated_core_home / "id_ed25519"
    assert os.stat(path).st_mode & 0o777 == 0o600
    first = path.read_text()
    hostkeys.ensure_login_key()
    assert path.read_text() == first
    assert hostkeys.public_key(path).startswith("ssh-ed25519 AAAA")


def test_replace_keeps_other_lines_and_drops_old_keys(isolated_core_home):
    kh = paths.known_hosts_path()
    kh.parent.mkdir(parents=True)
    kh.write_text(
        "github.com ssh-ed25519 AAAAgithub\n"
        "[127.0.0.1]:2222 ssh-ed25519 AAAAold1\n"
        "[localhost]:2222 ssh-rsa AAAAold2\n"
        "[127.0.0.1]:22220 ssh-ed25519 AAAAotherport\n"
        f"{hashed('[127.0.0.1]:2222')} ssh-ed25519 AAAAoldhashed\n"
        "# a comment\n"
    )
    os.chmod(kh, 0o644)
    hostkeys.replace_host_keys(2222, ["ssh-ed25519 AAAAnew"])
    assert kh.read_text() == (
        "github.com ssh-ed25519 AAAAgithub\n"
        "[127.0.0.1]:22220 ssh-ed25519 AAAAotherport\n"
        "# a comment\n"
        "[127.0.0.1]:2222 ssh-ed25519 AAAAnew\n"
    )
    assert os.stat(kh).st_mode & 0o777 == 0o644
    hostkeys.replace_host_keys(2222, ["ssh-ed25519 AAAAnewer"])
    assert kh.read_text().count("[127.0.0.1]:2222 ") == 1
    hostkeys.forget_host(2222)
    assert "2222 " not in kh.read_text()
    assert "AAAAotherport" in kh.read_text()


def test_line_matching():
    assert hostkeys.line_names_port("[127.0.0.1]:2222,[localhost]:2222 ssh-ed25519 K", 2222)
    assert hostkeys.line_names_port(f"{hashed('[localhost]:2222')} ssh-ed25519 K", 2222)
    assert not hostkeys.line_names_port(f"{hashed('[localhost]:2223')} ssh-ed25519 K", 2222)
    assert not hostkeys.line_names_port("[127.0.0.1]:22222 ssh-ed25519 K", 2222)
    assert not hostkeys.line_names_port("# [127.0.0.1]:2222 ssh-ed25519 K", 2222)
    assert hostkeys.line_names_port("@revoked [127.0.0.1]:2222 ssh-ed25519 K", 2222)
    assert hostkeys.line_names_port("127.0.0.1 ssh-ed25519 K", 22)


@needs_keygen
def test_pin_host_key(isolated_core_home, tmp_path):
    key = hostkeys.ensure_key(tmp_path / "hostkey", "t")
    hostkeys.pin_host_key(40022, key)
    pub = (tmp_path / "hostkey.pub").read_text().split()
    assert paths.known_hosts_path().read_text() == f"[127.0.0.1]:40022 {pub[0]} {pub[1]}\n"


def _pin_many(args):
    home, port = args
    os.environ["CORE_HOME"] = home
    for i in range(20):
        hostkeys.replace_host_keys(port, [f"ssh-ed25519 AAAA{port}x{i}"])


def test_concurrent_writers_lose_nothing(isolated_core_home):
    ports = list(range(30000, 30006))
    with multiprocessing.get_context("fork").Pool(len(ports)) as pool:
        pool.map(_pin_many, [(str(isolated_core_home), p) for p in ports])
    lines = paths.known_hosts_path().read_text().splitlines()
    assert sorted(lines) == sorted(f"[127.0.0.1]:{p} ssh-ed25519 AAAA{p}x19" for p in ports)


def test_a_vm_target_uses_the_tools_key_and_known_hosts(isolated_core_home):
    from devops_tasks.lifecycle import target_for

    where = target_for("box", 40022)
    assert (where.host, where.port, where.user) == ("127.0.0.1", 40022, "root")
    assert where.identity == hostkeys.login_key_path() == isolated_core_home / "id_ed25519"
    assert where.known_hosts == paths.known_hosts_path() == isolated_core_home / "known_hosts"
    assert where.vm_dir == isolated_core_home / "vms" / "box"


def test_the_boot_check_speaks_the_one_ssh_policy(isolated_core_home, monkeypatch):
    """The boot's first strict connection uses guest.openssh's options (no agent, no key updates)."""
    from devops_tasks import guest
    from devops_tasks.lifecycle import target_for

    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/agent.sock")
    argv = guest.ssh_argv(target_for("box", 40022), ["true"], forward_agent=False,
                          tty=False, multiplex=False, connect_timeout=5)
    for option in ("IdentityAgent=none", "UpdateHostKeys=no", "StrictHostKeyChecking=yes", "ConnectTimeout=5",
                   "ControlPath=none"):
        assert option in argv
    assert "-a" in argv and "-A" not in argv


def test_a_vm_target_needs_a_running_vm(isolated_core_home):
    from devops_tasks.lifecycle import VM

    with pytest.raises(NotRunningError, match=r"dev environment not running \(run 'inv vm.boot' first\)"):
        VM("core-dev").target()

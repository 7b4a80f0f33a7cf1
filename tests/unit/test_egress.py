"""``inv claude``'s network: restricted only (unless --network open), the proxy on the VM's socket
for the run, placeholders instead of secrets in the guest's environment, the summary line."""

from __future__ import annotations

import socket

import pytest

from devops_tasks import egress
from devops_tasks.config import Config
from devops_tasks.errors import DevopsError, VMError
from devops_tasks.lifecycle import VM
from devops_tasks.machine.records import VMRecord
from devops_tasks.options import ClaudeOptions
from devops_tasks.proxy.log import read_events

SECRET = "sk-ant-egress-unit-0123456789abcdef"


def make_vm(lines, network="restricted", tmp_path=None) -> VM:
    vm = VM("core-dev", Config.from_dict({"claude": {"allow": ["pypi.org"]}}), lines.append)
    vm.dir.ensure()
    vm.dir.save(VMRecord(id="0a1b2c3d", name="core-dev", image="/i", pid=1, process_start="1",
                         started_at="2026-01-01T00:00:00Z", ssh_port=2222, memory=512, cpus=1,
                         status="running", network=network,
                         proxy_socket=str(vm.dir.proxy_socket) if network == "restricted" else ""))
    return vm


def test_claude_refuses_a_running_open_vm_unless_told(monkeypatch):
    vm = VM("core-dev", Config(), lambda _: None)
    monkeypatch.setattr(VM, "network", lambda self: "open")
    with pytest.raises(egress.OpenNetworkError) as refused:
        egress.check(vm, ClaudeOptions())
    message = str(refused.value)
    assert "\n" not in message and "runs with open networking" in message
    assert "inv vm.stop --name core-dev" in message and "--network open" in message
    assert egress.check(vm, ClaudeOptions(network="open")) == "open"
    monkeypatch.setattr(VM, "network", lambda self: "restricted")
    assert egress.check(vm, ClaudeOptions()) == "restricted"
    monkeypatch.setattr(VM, "network", lambda self: "")  # not running: boot it restricted
    assert egress.check(vm, ClaudeOptions()) == "restricted"
    assert egress.check(vm, ClaudeOptions(network="open")) == "open"


def test_bad_network_and_allow_values_fail_first(monkeypatch):
    vm = VM("core-dev", Config(), lambda _: None)
    monkeypatch.setattr(VM, "network", lambda self: pytest.fail("looked at the VM before checking the flags"))
    with pytest.raises(VMError, match="--network: unknown network mode 'closed'"):
        egress.check(vm, ClaudeOptions(network="closed"))
    with pytest.raises(DevopsError, match=r"--allow: allowlist entry 'a b' is not host, \*.domain or host:port"):
        egress.check(vm, ClaudeOptions(allow=["pypi.org", "a b"]))


def test_allowlist_is_config_plus_flags():
    vm = VM("core-dev", Config.from_dict({"claude": {"allow": ["pypi.org"]}}), lambda _: None)
    rules = egress.allowlist(vm, ClaudeOptions(allow=["127.0.0.1:8080", "*.example.org"]))
    assert rules.texts() == ["pypi.org", "127.0.0.1:8080", "*.example.org"]


def test_open_vm_gets_env_as_is_and_no_proxy():
    lines = []
    vm = make_vm(lines, network="open")
    with egress.proxy(vm, ClaudeOptions(network="open"), {"ANTHROPIC_API_KEY": SECRET}) as net:
        assert net.server is None
        assert net.guest_env({"ANTHROPIC_API_KEY": SECRET}) == {"ANTHROPIC_API_KEY": SECRET}
        assert not vm.dir.proxy_socket.exists()
    assert lines == ["Network: open (nothing filtered: the VM reaches whatever this host reaches)"]


def test_restricted_run_serves_the_vm_socket_and_the_guest_holds_placeholders():
    lines = []
    vm = make_vm(lines)
    env = {"ANTHROPIC_API_KEY": SECRET, "CLAUDE_CODE_OAUTH_TOKEN": SECRET + "-oauth",
           "ANTHROPIC_BASE_URL": "http://127.0.0.1:9/", "GIT_AUTHOR_NAME": "Ada"}
    with egress.proxy(vm, ClaudeOptions(allow=["127.0.0.1:9"]), env) as net:
        guest = net.guest_env(env)
        assert SECRET not in "".join(guest.values())
        assert guest["ANTHROPIC_API_KEY"] == guest["CLAUDE_CODE_OAUTH_TOKEN"] == egress.PLACEHOLDER
        assert guest["ANTHROPIC_BASE_URL"] == "http://10.0.2.100:3128"
        assert guest["HTTPS_PROXY"] == guest["https_proxy"] == guest["HTTP_PROXY"] == "http://10.0.2.100:3128"
        assert "10.0.2.100" in guest["NO_PROXY"] and guest["GIT_AUTHOR_NAME"] == "Ada"
        # the host ANTHROPIC_BASE_URL is where the API endpoint forwards
        assert (net.server.api.host, net.server.api.port) == ("127.0.0.1", 9)
        for target in ("evil.example:443", "evil.example:443", "pypi.org:22"):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(str(vm.dir.proxy_socket))
                sock.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
                assert sock.recv(4096).startswith(b"HTTP/1.1 403")
    assert not vm.dir.proxy_socket.exists()
    assert lines[0] == ("Network: restricted: out only through the host proxy (allowlist: 2 entries; the proxy adds "
                        "the API credential, the VM holds a placeholder)")
    assert lines[-1] == ("Network: 3 blocked (evil.example:443 x2, pypi.org:22), 0 allowed: 'inv claude.log' shows them, "
                         "'--allow HOST[:PORT]' opens one")
    assert [e["host"] for e in egress.events(vm)] == ["evil.example", "evil.example", "pypi.org"]
    assert SECRET not in vm.dir.proxy_log.read_text()


def test_summary_when_nothing_was_blocked():
    lines = []
    vm = make_vm(lines)
    with egress.proxy(vm, ClaudeOptions(), {}):
        pass
    assert lines[-1] == "Network: 0 requests through the proxy, none blocked"
    assert "adds" not in lines[0]


def test_bad_anthropic_base_url_is_one_line():
    vm = make_vm([])
    with pytest.raises(VMError, match="^ANTHROPIC_BASE_URL: 'ftp://x' is not an http"):
        with egress.proxy(vm, ClaudeOptions(), {"ANTHROPIC_BASE_URL": "ftp://x"}):
            pass


def test_log_task_formats_events(capsys):
    from invoke import Context

    from devops_tasks.tasks import claude as claude_tasks

    vm = make_vm([])
    with egress.proxy(vm, ClaudeOptions(), {}):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(vm.dir.proxy_socket))
            sock.sendall(b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
            sock.recv(4096)
    claude_tasks.log(Context(), blocked=True)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "deny   CONNECT evil.example:443  0 B  not on the allowlist" in out[0]
    assert len(list(read_events(vm.dir.proxy_log))) == 1


def test_vm_boot_refuses_an_unknown_network_mode_first():
    from devops_tasks.options import BootOptions

    with pytest.raises(DevopsError, match=r"^--network: unknown network mode 'closed' \(valid: open, restricted\)$"):
        VM("core-dev", Config(), lambda _: None).boot(BootOptions(network="closed"))

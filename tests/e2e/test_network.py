"""The network boundary of ``inv claude``, against real guests (TCG) and real servers on the host.

* An open VM reaches the host's loopback (10.0.2.2) directly; ``inv claude`` refuses it, and runs
  on it with ``--network open``.
* ``inv claude`` on a stopped VM boots it restricted. From inside the run (the stand-in claude runs
  ``/app/.claude-stub-run`` as the agent, with claude's environment): a direct connection to the
  host fails; through the proxy an allowed ``127.0.0.1:PORT`` answers and a port not on the list is
  refused (403 naming the rule and the flag) and logged; a request to
  ``$ANTHROPIC_BASE_URL/v1/messages`` reaches a fake Messages API on the host carrying the real key,
  while the guest holds only a placeholder: the key is in no guest file, process environment, or
  (after ``vm.stop``) the VM's overlay.

No internet: every server is on the host's loopback.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from devops_tasks import guest, paths
from devops_tasks.devops import DevOps
from devops_tasks.egress import PLACEHOLDER
from devops_tasks.manifest import ImageInfo, Manifest
from devops_tasks.options import BootOptions

import needs
from fake_messages_api import FakeMessagesAPI
from helpers import free_port, wait_for

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
DEVOPS = str(Path(sys.executable).parent / "devops")
RECORD = "/dev/shm/claude-stub.txt"


class Hello(ThreadingHTTPServer):
    """A loopback HTTP server answering ``hello <port>``."""

    daemon_threads = True

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                data = f"hello {self.server.server_address[1]}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, args=(0.1,), daemon=True).start()

    def stop(self):
        self.shutdown()
        self.server_close()


# What the agent does inside the run: python3 in the guest, results as one JSON line.
AGENT_SCRIPT = r'''
import http.client, json, os, socket, sys, time, urllib.request
allowed, other = int(sys.argv[1]), int(sys.argv[2])
proxy = os.environ["HTTPS_PROXY"]
out = {"key": os.environ.get("ANTHROPIC_API_KEY"), "base": os.environ.get("ANTHROPIC_BASE_URL"), "proxy": proxy}
def direct(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
        return "connected"
    except OSError as exc:
        return type(exc).__name__
out["direct_host"] = direct("10.0.2.2", allowed)
out["direct_internet"] = direct("192.0.2.1", 443)
start = time.monotonic()
try:
    socket.getaddrinfo("pypi.org", 443)
    out["dns"] = "resolved"
except OSError as exc:
    out["dns"] = type(exc).__name__
out["dns_seconds"] = time.monotonic() - start
def get(url):  # a proxy request (absolute URI); urllib would honour NO_PROXY=127.0.0.1 and go direct
    conn = http.client.HTTPConnection("10.0.2.100", 3128, timeout=30)
    conn.request("GET", url)
    reply = conn.getresponse()
    return reply.status, reply.read().decode()
out["allowed"] = get(f"http://127.0.0.1:{allowed}/")
out["other"] = get(f"http://127.0.0.1:{other}/")
tunnel = http.client.HTTPConnection("10.0.2.100", 3128, timeout=30)
tunnel.set_tunnel("127.0.0.1", allowed)
tunnel.request("GET", "/")
out["tunnel"] = tunnel.getresponse().read().decode()
request = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", method="POST",
    data=json.dumps({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).encode(),
    headers={"x-api-key": os.environ["ANTHROPIC_API_KEY"], "content-type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as reply:
    out["api"] = reply.status
print(json.dumps(out))
'''


@dataclass
class Env:
    devops: DevOps
    project: Path
    secret: str
    env: dict
    core_home: Path
    hello: Hello
    other: Hello
    api: FakeMessagesAPI

    def guest(self, script: str, timeout: float = 120) -> tuple[int, str]:
        with guest.session(self.devops.vm.target()) as conn:
            code, out, err = guest.capture(conn, script, timeout=timeout)
        return code, out + err

    def devops_run(self, *words: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run([DEVOPS, *words], env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def claude_stub_image(tmp_path_factory, build_cache_dir) -> Path:
    from devops_tasks.build import build_image
    from devops_tasks.build.tools import missing_tools

    missing = missing_tools()
    if missing:
        needs.unavailable(f"image build needs host tools: {', '.join(tool for tool, _ in missing)}")
    needs.require_tool("socat", "socat")  # carries a restricted guest's connections to the proxy
    base = tmp_path_factory.mktemp("claude-stub-image")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORE_CACHE_DIR", build_cache_dir)
        mp.setenv("CORE_HOME", str(base / "core"))
        mp.setenv("CORE_IMAGES_DIR", str(base / "images"))
        result = build_image(HERE / "recipes" / "claude-stub.yaml", output=base / "claude-stub.qcow2")
    return Path(result.path)


@pytest.fixture(scope="module")
def net_env(tmp_path_factory, claude_stub_image):
    base = tmp_path_factory.mktemp("network")
    core, images, home, project = base / "core", base / "images", base / "home", base / "proj"
    for folder in (core, images, home, project):
        folder.mkdir()
    hello, other, api = Hello(), Hello(), FakeMessagesAPI("/app/unused.txt", "unused").start()
    (core / "config.yaml").write_text(
        f"vm:\n  ssh_port: {free_port()}\n  memory: 512\n  cpus: 1\n  boot_timeout: 180\n"
        f"claude:\n  api_url: http://127.0.0.1:{api.port}\n")
    (images / paths.image_name()).symlink_to(claude_stub_image)
    secret = "sk-ant-net-e2e-" + secrets.token_urlsafe(24)
    values = {"HOME": str(home), "CORE_HOME": str(core), "CORE_IMAGES_DIR": str(images), "ANTHROPIC_API_KEY": secret}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in values.items():
            mp.setenv(key, value)
        for key in ("CORE_SKIP_SSH_SCAN", "CORE_BOOT_TIMEOUT", "SSH_AUTH_SOCK", "ANTHROPIC_BASE_URL",
                    "CLAUDE_CODE_OAUTH_TOKEN"):
            mp.delenv(key, raising=False)
        manifest = Manifest(images / "manifest.json")
        manifest.set(paths.image_name(), ImageInfo(version="v0.0.1-net", source="build", guest_contract=1))
        manifest.save()
        env = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_")}
        try:
            yield Env(DevOps(echo=lambda _: None), project, secret, env, core, hello, other, api)
        finally:
            try:
                DevOps(echo=lambda _: None).stop()
            finally:
                for server in (hello, other, api):
                    server.stop()


def test_open_vm_reaches_the_host_and_claude_refuses_it_unless_told(net_env):
    e = net_env
    e.devops.boot(BootOptions(memory=512, cpus=1, network="open"))
    assert e.devops.status().network == "open"
    code, out = e.guest(f"python3 -c 'import socket; socket.create_connection((\"10.0.2.2\", {e.hello.port}), "
                        f"timeout=10); print(\"connected\")'")
    assert code == 0 and "connected" in out, out  # the control: open means open
    refused = e.devops_run("claude", "--project", str(e.project))
    assert refused.returncode == 1
    error = refused.stderr.strip()
    assert error.startswith("Error: VM 'core-dev' runs with open networking") and "\n" not in error, error
    assert "--network open" in error and "inv vm.stop" in error
    ran = e.devops_run("claude", "--network", "open", "--auth", "anthropic", "--project", str(e.project))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "Network: open" in ran.stdout
    code, text = e.guest(f"cat {RECORD}")
    assert f"env:ANTHROPIC_API_KEY={e.secret}" in text  # open: the key is in the VM, as asked
    assert e.devops.stop()


def test_claude_boots_restricted_and_the_guest_gets_out_only_through_the_proxy(net_env):
    e = net_env
    assert not e.devops.is_running()
    (e.project / "agent.py").write_text(AGENT_SCRIPT)
    (e.project / ".claude-stub-run").write_text(f"python3 /app/agent.py {e.hello.port} {e.other.port}\n")
    (e.project / ".claude-stub-wait").touch()
    proc = subprocess.Popen([DEVOPS, "claude", "--auth", "anthropic", "--allow", f"127.0.0.1:{e.hello.port}",
                             "--project", str(e.project)], env=e.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    try:
        def stub_waiting() -> bool:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                return e.guest(f"test -e {RECORD}.tmp", timeout=30)[0] == 0
            except Exception:  # not booted yet
                return False

        wait_for(stub_waiting, 400, "the stand-in claude to run the agent script", interval=1)
        assert e.devops.status().network == "restricted"
        status = json.loads(e.devops_run("vm.status", "--json").stdout)
        assert status["network"] == "restricted"
        # while claude runs: the key is in no process environment and no file of the guest
        code, out = e.guest(
            f"for f in /proc/[0-9]*/environ; do cat $f 2>/dev/null; done | tr '\\0' '\\n' | grep -c -F -- '{PLACEHOLDER}'; "
            f"for f in /proc/[0-9]*/environ; do cat $f 2>/dev/null; done | grep -c -F -- '{e.secret}'; "
            f"for d in $(awk '$3 != \"proc\" && $3 != \"sysfs\" && $3 !~ /fuse/ {{print $2}}' /proc/mounts); do "
            f"find $d -xdev -type f -print0 | xargs -0 grep -l -F -s -- '{e.secret}'; done; echo files-done",
            timeout=900)
        counts = out.split()
        assert int(counts[0]) >= 1 and counts[1] == "0", out  # the placeholder is there, the key is not
        assert counts[2:] == ["files-done"], out
        # a login shell has the proxy too (pip, npm, git read these)
        code, out = e.guest("sh -l -c 'echo $https_proxy $HTTP_PROXY $no_proxy'")
        assert out.split() == ["http://10.0.2.100:3128", "http://10.0.2.100:3128",
                               "localhost,127.0.0.1,::1,10.0.2.100"], out
        (e.project / ".claude-stub-go").touch()
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for name in (".claude-stub-wait", ".claude-stub-go", ".claude-stub-run"):
            (e.project / name).unlink(missing_ok=True)
    assert proc.returncode == 0, out
    assert e.secret not in out
    assert "Dev environment not running, booting..." in out
    assert "Network: restricted: out only through the host proxy" in out
    code, text = e.guest(f"cat {RECORD}")
    runs = [line[4:] for line in text.splitlines() if line.startswith("run:")]
    assert runs and runs[-1].startswith("{"), runs
    result = json.loads(runs[-1])
    assert result["key"] == PLACEHOLDER and result["base"] == "http://10.0.2.100:3128"
    assert result["direct_host"] != "connected" and result["direct_internet"] != "connected"
    assert result["dns"] != "resolved" and result["dns_seconds"] < 3  # no DNS, and no waiting for one
    assert result["allowed"] == [200, f"hello {e.hello.port}"]
    assert result["tunnel"] == f"hello {e.hello.port}"
    status, body = result["other"]
    assert status == 403 and "not on the allowlist (claude.allow, --allow)" in body
    assert f"inv claude --allow 127.0.0.1:{e.other.port}" in body
    assert result["api"] == 200
    [message] = e.api.messages()
    assert message["headers"]["x-api-key"] == e.secret  # the real key arrived, added on the host
    # the summary names what was blocked; claude.log shows every request
    summary = [line for line in out.splitlines() if line.startswith("Network: ") and "blocked" in line]
    assert summary and f"127.0.0.1:{e.other.port}" in summary[-1], out
    log = e.devops_run("claude.log")
    assert log.returncode == 0
    assert f"deny   GET 127.0.0.1:{e.other.port}  0 B  not on the allowlist" in log.stdout
    assert f"allow  GET 127.0.0.1:{e.hello.port}" in log.stdout
    assert f"allow  CONNECT 127.0.0.1:{e.hello.port}" in log.stdout
    assert "api endpoint (credential added)" in log.stdout
    events = [json.loads(line) for line in e.devops_run("claude.log", "--json").stdout.splitlines()]
    assert {"time", "method", "host", "port", "decision", "rule", "bytes"} <= set(events[0])
    assert e.secret not in (e.core_home / "vms" / "core-dev" / "proxy.log").read_text()


def test_after_stop_the_key_is_not_on_the_vms_disk(net_env):
    e = net_env
    assert e.devops.is_running() and e.api.messages()  # the run above used the key
    assert e.guest("sync")[0] == 0
    assert e.devops.stop()
    for path in e.core_home.rglob("*"):
        if path.is_file() and not path.is_socket():
            data = path.read_bytes()
            assert e.secret.encode() not in data, path
    assert (e.core_home / "vms" / "core-dev" / "overlay.qcow2").stat().st_size > 0

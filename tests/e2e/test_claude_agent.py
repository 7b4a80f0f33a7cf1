"""The real Claude Code, offline, driven through ``inv claude`` by a fake Messages API on the host.

The ``claude`` recipe's image (Claude Code from the npm registry) runs in a VM; the host runs a
local server speaking the Messages API's streaming events (``fake_messages_api``) that answers the
agent's first request with a ``Write`` tool call. The agent, running as the guest user ``dev`` in
bypass mode, really writes the file under ``/app``, the VM's copy of the project: it reaches the
host project only when the review is applied, then owned by the host user; and the fake API saw
the model, the real key, and the tool's result.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devops_tasks import paths
from devops_tasks.devops import DevOps
from devops_tasks.manifest import ImageInfo, Manifest

from fake_messages_api import FakeMessagesAPI, has_tool_result
from helpers import free_port

pytestmark = pytest.mark.e2e

DEVOPS = str(Path(sys.executable).parent / "devops")
CONTENT = "written by the real agent\n"


@pytest.fixture(scope="module")
def agent_env(tmp_path_factory, claude_image):
    base = tmp_path_factory.mktemp("agent")
    core, images, home, project = base / "core", base / "images", base / "home", base / "proj"
    for folder in (core, images, home, project):
        folder.mkdir()
    api = FakeMessagesAPI("/app/hello.txt", CONTENT).start()
    # the VM is restricted: the host proxy's API endpoint forwards to the fake API, adding the key
    (core / "config.yaml").write_text(
        f"vm:\n  ssh_port: {free_port()}\n  memory: 1024\n  cpus: 1\n  boot_timeout: 180\n"
        f"claude:\n  api_url: http://127.0.0.1:{api.port}\n")
    (images / paths.image_name()).symlink_to(claude_image)
    manifest = Manifest(images / "manifest.json")
    manifest.set(paths.image_name(), ImageInfo(version="v0.0.1-claude-real", source="build", guest_contract=1))
    manifest.save()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INVOKE_", "ANTHROPIC_", "CLAUDE_"))}
    env.update(HOME=str(home), CORE_HOME=str(core), CORE_IMAGES_DIR=str(images),
               ANTHROPIC_API_KEY="sk-ant-e2e-" + secrets.token_urlsafe(16))
    env.pop("SSH_AUTH_SOCK", None)
    try:
        yield env, project, api
    finally:
        api.stop()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CORE_HOME", str(core))
            mp.setenv("CORE_IMAGES_DIR", str(images))
            DevOps(echo=lambda _: None).stop()


def run(env, project, *words, timeout=600):
    return subprocess.run([DEVOPS, "claude", "--auth", "anthropic", "--project", str(project), "--", *words],
                          env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_version_from_the_vm(agent_env):
    env, project, _ = agent_env
    for attempt in ("booting the VM", "VM running"):
        start = time.monotonic()
        result = run(env, project, "--version")
        print(f"\ninv claude -- --version ({attempt}): {time.monotonic() - start:.2f} s")  # a figure (-s)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "(Claude Code)" in result.stdout


def test_a_real_agent_turn_writes_the_file_into_a_review(agent_env):
    env, project, api = agent_env
    result = run(env, project, "-p", "Write hello.txt, please.", "--dangerously-skip-permissions",
                 "--model", "claude-e2e-model")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Done: the file is written." in result.stdout
    written = project / "hello.txt"
    assert not written.exists()  # the agent wrote into the copy: the host project waits for the review
    assert " hello.txt | 1 +" in result.stdout and "Apply it with: inv claude.apply --review" in result.stdout
    applied = subprocess.run([DEVOPS, "claude.apply", "--project", str(project)], env=env, capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert written.read_text() == CONTENT
    assert written.stat().st_uid == os.getuid()  # the host user's file, not a guest uid
    turns = [r for r in api.messages() if r["body"].get("tools")]
    assert len(turns) >= 2, [r["path"] for r in api.messages()]
    assert turns[0]["body"]["model"] == "claude-e2e-model"
    assert all(r["headers"].get("x-api-key") == env["ANTHROPIC_API_KEY"] for r in turns)  # added by the proxy
    assert "Network: restricted" in result.stdout
    assert has_tool_result(turns[-1]["body"])  # the agent sent the Write tool's result back


def test_claude_code_state_persists_on_the_vm_disk(agent_env):
    """~/.claude.json and ~/.claude/ of the agent user survive the runs above and a stop/boot."""
    env, project, _ = agent_env
    check = [DEVOPS, "shell", "--no-mount", "--", "sh", "-c", "test -f /home/dev/.claude.json && test -d /home/dev/.claude"]
    assert subprocess.run(check, env=env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL).returncode == 0
    for task in ("vm.stop", "vm.boot"):
        done = subprocess.run([DEVOPS, task], env=env, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stdout + done.stderr
    assert subprocess.run(check, env=env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL).returncode == 0

"""The ``claude`` recipe end to end: the real Claude Code from the npm registry in the image, run as
the guest user ``dev`` with no network at all, and the image still byte-reproducible.

The build is shared with the rest of the run (``claude_build`` in conftest: once per session,
cached across sessions in the shared build cache); the figures are printed (``pytest -s``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from devops_tasks.build import build_image, load_recipe

from plainvm import PlainVM

pytestmark = pytest.mark.e2e

CLAUDE_PACKAGE = "@anthropic-ai/claude-code-linux-x64"


@pytest.fixture
def claude_vm(claude_image, tmp_path):
    machine = PlainVM(claude_image, tmp_path / "vm")
    yield machine
    machine.cleanup()


def test_claude_version_as_dev_offline(claude_vm, claude_build, built_image):
    pinned = next(p for p in load_recipe("claude").npm if p.name == CLAUDE_PACKAGE)
    assert [(p.name, p.version, p.integrity) for p in claude_build.npm] == [
        (pinned.name, pinned.version, pinned.integrity)], "the registry's integrity is the recipe's"
    claude_vm.start()
    ready = claude_vm.wait_ready()
    # unshare -n: a network namespace with nothing in it (not even loopback up): really offline
    result = claude_vm.ssh("cd /home/dev && unshare -n su -s /bin/sh dev -c "
                           """'echo "$(id -un) $HOME"; exec "$@"' -- sh claude --version""")
    assert result.returncode == 0, result.stderr + claude_vm.serial_tail()
    who, version = result.stdout.splitlines()[:2]
    assert who == "dev /home/dev"
    assert version == f"{pinned.version} (Claude Code)"
    facts = claude_vm.ssh("stat -c '%u:%g %a' /usr/local/bin/claude; test -s /usr/share/doc/claude-code/LICENSE.md")
    assert facts.returncode == 0, facts.stderr
    assert facts.stdout.strip() == "0:0 755", "root's, not writable by the agent"
    minimal_size, claude_size = built_image.stat().st_size, claude_build.size
    print(f"\nclaude image: {claude_size / 1e6:.0f} MB, boot to ssh-ready {ready:.1f}s; "
          f"minimal image: {minimal_size / 1e6:.0f} MB")


def test_npm_tarball_is_cached_under_its_integrity(claude_build, build_cache_dir):
    pin = claude_build.npm[0]
    cache = Path(build_cache_dir) / "build" / "npm"
    tarball = cache / pin.filename
    digest = hashlib.sha512(tarball.read_bytes()).digest()
    assert "sha512-" + base64.b64encode(digest).decode() == pin.integrity
    assert json.loads((cache / (pin.filename + ".json")).read_text())["integrity"] == pin.integrity
    assert not list(cache.glob(".partial-*.tgz")), "no half-downloaded tarball left in the cache"


def test_claude_rebuild_is_byte_identical(claude_build, tmp_path, monkeypatch, build_cache_dir):
    monkeypatch.setenv("CORE_CACHE_DIR", build_cache_dir)
    monkeypatch.setenv("CORE_HOME", str(tmp_path / "core"))
    monkeypatch.setenv("CORE_IMAGES_DIR", str(tmp_path / "images"))
    fresh = build_image("claude", output=tmp_path / "fresh.qcow2", force=True)
    assert not fresh.cached
    assert fresh.version == claude_build.version
    assert fresh.sha256 == claude_build.sha256, "two builds with the same npm package must be byte-identical"
    print(f"\nclaude image rebuilt (tarball cached) in {fresh.seconds:.0f}s")

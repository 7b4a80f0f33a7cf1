"""Shared end-to-end fixtures.

``built_image``, ``claude_image`` and ``dev_image`` (session scope) build the ``minimal``,
``claude`` and ``dev`` recipes once per test run and return the path of a private copy of the image (a ``Path``; boot it on an
overlay, never write it). The .deb, npm and image cache is ``$CORE_CACHE_DIR`` when the runner set
it, else the stable ``/var/tmp/devops-tasks-test-cache``, so repeated runs on one machine are warm
(a rebuild of an unchanged recipe takes about a second). ``CORE_HOME`` and ``CORE_IMAGES_DIR``
point into tmp while it builds: the real home is never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import needs
import pytest

DEFAULT_TEST_CACHE = "/var/tmp/devops-tasks-test-cache"


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: boots a real QEMU guest or starts real servers (slow)")


def shared_cache_dir() -> str:
    """The build cache the e2e tests share (``$CORE_CACHE_DIR`` or a stable dir under /var/tmp)."""
    return os.environ.get("CORE_CACHE_DIR") or DEFAULT_TEST_CACHE


@pytest.fixture(scope="session")
def build_cache_dir() -> str:
    return shared_cache_dir()


def build_recipe_once(recipe: str, tmp_path_factory, cache_dir: str, label: str = ""):
    """Build ``recipe`` (a name or a path; ``label`` names its folder) into a private copy (the
    shared cache makes a repeat about a second); -> the :class:`BuildResult`."""
    from devops_tasks.build import build_image
    from devops_tasks.build.tools import missing_tools

    missing = missing_tools()
    if missing:
        needs.unavailable(f"image build needs host tools: {', '.join(tool for tool, _ in missing)}")
    label = label or recipe
    base = tmp_path_factory.mktemp(f"built-{label}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORE_CACHE_DIR", cache_dir)
        mp.setenv("CORE_HOME", str(base / "core"))
        mp.setenv("CORE_IMAGES_DIR", str(base / "images"))
        return build_image(recipe, output=base / f"{label}.qcow2")


@pytest.fixture(scope="session")
def built_image(tmp_path_factory, build_cache_dir) -> Path:
    """The ``minimal`` image, built once per session (cached across sessions)."""
    return build_recipe_once("minimal", tmp_path_factory, build_cache_dir).path


@pytest.fixture(scope="session")
def claude_build(tmp_path_factory, build_cache_dir):
    """The ``claude`` recipe's :class:`BuildResult` (Claude Code from the npm registry: a ~190 MB
    download the first time), built once per session (cached across sessions)."""
    return build_recipe_once("claude", tmp_path_factory, build_cache_dir)


@pytest.fixture(scope="session")
def claude_image(claude_build) -> Path:
    return claude_build.path


@pytest.fixture(scope="session")
def claude_stub_image(tmp_path_factory, build_cache_dir) -> Path:
    """``recipes/claude-stub.yaml``: the minimal image plus a stand-in claude that plays the agent."""
    recipe = Path(__file__).resolve().parent / "recipes" / "claude-stub.yaml"
    return build_recipe_once(str(recipe), tmp_path_factory, build_cache_dir, label="claude-stub").path


@pytest.fixture(scope="session")
def dev_build(tmp_path_factory, build_cache_dir):
    """The ``dev`` recipe's :class:`BuildResult` (Python, Node.js, PHP, Go: about 270 .debs and
    Node.js from the npm registry the first time), built once per session (cached across sessions)."""
    return build_recipe_once("dev", tmp_path_factory, build_cache_dir)


@pytest.fixture(scope="session")
def dev_image(dev_build) -> Path:
    return dev_build.path

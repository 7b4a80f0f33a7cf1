"""What a test needs from this machine, and what happens when it is not there.

Locally a missing or broken tool skips the test that needs it. Under ``CI=true`` it fails it: CI
installs everything the README's setup lists, so a missing ``bwrap`` or a broken sandbox is a
broken CI machine or a broken product, never a row of skips.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn, Optional

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def unavailable(problem: str) -> NoReturn:
    """Skip (locally) or fail (``CI=true``) the running test because of ``problem``."""
    if in_ci():
        pytest.fail(f"{problem} (CI=true: the README's setup provides it, so this fails rather than skips)",
                    pytrace=False)
    pytest.skip(problem)


def need(problem: Optional[str]) -> None:
    """:func:`unavailable` when there is a problem ("" or None: there is none)."""
    if problem:
        unavailable(problem)


def mark(problem: Optional[str]) -> pytest.MarkDecorator:
    """A mark for a test (or, as ``pytestmark``, a module) that :func:`need` checks at setup."""
    return pytest.mark.needs(problem or "")


def tool_problem(program: str, package: str) -> str:
    """Why ``program`` cannot be run ("" when it is on $PATH)."""
    if shutil.which(program):
        return ""
    return f"{program} is not installed (apt-get install {package})"


def require_tool(program: str, package: str) -> str:
    """The path of ``program``, else skip/fail the test."""
    need(tool_problem(program, package))
    return shutil.which(program)


def bwrap_problem() -> str:
    """Why bubblewrap cannot build a sandbox here ("" when it can), found by running ``bwrap``
    itself, never through the product's code (whose own failure must fail its tests)."""
    import subprocess

    problem = tool_problem("bwrap", "bubblewrap")
    if problem:
        return problem
    probe = subprocess.run(["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"bwrap cannot build a sandbox here: {probe.stderr.strip() or f'status {probe.returncode}'}"
    return ""

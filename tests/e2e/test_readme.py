"""The README's quick start: the lines after ``# main job`` run exactly as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def main_job_lines() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start.*?```sh\n(.*?)```", readme, re.S)
    assert block, "README.md has no Quick start sh block"
    lines = block.group(1).splitlines()
    assert "# main job" in lines, "the Quick start block has no '# main job' marker"
    return lines[lines.index("# main job") + 1 :]


def test_main_job_lines_are_the_documented_flow():
    lines = main_job_lines()
    assert lines[0] == "inv image.build"
    assert "inv test" in lines and lines[-1] == "inv vm.stop"


def test_readme_main_job_runs_as_written(tmp_path, built_image, build_cache_dir):
    core = tmp_path / "core"
    env = dict(os.environ)
    env.update(
        CORE_HOME=str(core),
        CORE_CACHE_DIR=build_cache_dir,  # warm (built_image built it): the build is a cache hit
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
    )
    env.pop("CORE_IMAGES_DIR", None)
    script = "set -e\n" + "\n".join(main_job_lines()) + "\n"
    try:
        done = subprocess.run(
            ["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
        )
    finally:
        subprocess.run(
            [sys.executable, "-m", "invoke", "vm.stop"],
            cwd=REPO / "examples" / "hello-pytest", env=env, capture_output=True, timeout=120,
        )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Dev environment running" in out
    assert re.search(r"\d+ passed", out), out
    assert "Status: Running" in out
    assert done.stdout.rstrip().endswith("Stopped"), out
    assert "Killed" not in done.stderr and "Traceback" not in done.stderr, done.stderr

"""The ``core`` config as a real consumer project sees it, through ``inv`` in a subprocess.

Precedence, lowest first: package defaults < ~/.core/config.yaml < the project's collection config
< its invoke.yaml < INVOKE_* env vars < -f file.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

INV = [sys.executable, "-c", "from invoke.main import program; program.run()"]

CONSUMER = textwrap.dedent(
    """
    import json
    from invoke import Collection

    import devops_tasks
    from devops_tasks.tasks.common import core_config, task


    @task
    def dump(c):
        print(json.dumps(core_config(c).to_dict()))


    vm = devops_tasks.vm  # the project imports just one collection
    vm.add_task(dump)
    ns = Collection()
    ns.add_collection(vm)
    {extra}
    """
)


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    root.mkdir()

    def make(extra: str = "") -> Path:
        (root / "tasks.py").write_text(CONSUMER.format(extra=extra))
        return root

    return make


def run_inv(project_dir, *args, env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [*INV, *args], cwd=project_dir, env=env, capture_output=True, text=True, timeout=60
    )


def dump(project_dir, *args, env_extra=None):
    result = run_inv(project_dir, *args, "vm.dump", env_extra=env_extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def write_core_config(core_home, text):
    core_home.mkdir(parents=True, exist_ok=True)
    (core_home / "config.yaml").write_text(text)


def test_package_defaults(project):
    cfg = dump(project())
    assert cfg["images"]["source"] == "auto"
    assert cfg["vm"]["memory"] == 4096
    assert cfg["images"]["github"]["repo"] == "host-uk/core-images"


def test_core_config_file_beats_defaults(project, isolated_core_home):
    write_core_config(isolated_core_home, "images:\n  source: cdn\n  cdn: {url: 'http://u'}\n")
    cfg = dump(project())
    assert cfg["images"]["source"] == "cdn"
    assert cfg["images"]["cdn"]["url"] == "http://u"
    assert cfg["vm"]["name"] == "core-dev"


def test_project_collection_config_keeps_other_keys(project, isolated_core_home):
    write_core_config(isolated_core_home, "images:\n  source: cdn\n  cdn: {url: 'http://u'}\n")
    cfg = dump(project('ns.configure({"core": {"vm": {"memory": 1024}}})'))
    assert cfg["vm"]["memory"] == 1024
    assert cfg["vm"]["cpus"] == 2
    assert cfg["images"]["source"] == "cdn"
    assert cfg["images"]["cdn"]["url"] == "http://u"


def test_precedence_chain(project, isolated_core_home, tmp_path):
    write_core_config(isolated_core_home, "images:\n  source: cdn\n  cdn: {url: 'http://u'}\n")
    root = project('ns.configure({"core": {"images": {"source": "auto"}, "vm": {"cpus": 3}}})')
    assert dump(root)["images"]["source"] == "auto"  # collection config beats config.yaml

    (root / "invoke.yaml").write_text("core:\n  images:\n    source: github\n")
    cfg = dump(root)
    assert cfg["images"]["source"] == "github"  # project invoke.yaml beats collection config
    assert cfg["images"]["cdn"]["url"] == "http://u"
    assert cfg["vm"]["cpus"] == 3

    env = {"INVOKE_CORE_IMAGES_SOURCE": "registry"}
    assert dump(root, env_extra=env)["images"]["source"] == "registry"  # env beats invoke.yaml

    runtime = tmp_path / "runtime.yaml"
    runtime.write_text("core:\n  images:\n    source: build\n")
    cfg = dump(root, "-f", str(runtime), env_extra=env)
    assert cfg["images"]["source"] == "build"  # -f beats env
    assert cfg["images"]["cdn"]["url"] == "http://u"


def test_broken_core_config_does_not_break_list(project, isolated_core_home):
    write_core_config(isolated_core_home, "images:\n\tsource: cdn\n")
    root = project()
    listed = run_inv(root, "--list")
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stderr
    assert "vm.dump" in listed.stdout

    ran = run_inv(root, "vm.dump")
    assert ran.returncode == 1
    assert "Traceback" not in ran.stderr
    assert str(isolated_core_home / "config.yaml") in ran.stderr
    assert "line 2" in ran.stderr


def test_unknown_source_from_env_is_a_clear_error(project):
    ran = run_inv(project(), "vm.dump", env_extra={"INVOKE_CORE_IMAGES_SOURCE": "ftp"})
    assert ran.returncode == 1
    assert "unknown source 'ftp'" in ran.stderr
    assert "Traceback" not in ran.stderr

"""Dependencies before tests: test.yaml's ``setup``, the detected installs, their keys, what the
guest is asked and told, and the fallbacks for commands an image lacks.

The guest scripts (probe, run) are run here by a real ``sh`` against a temporary state folder.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from devops_tasks import dependencies
from devops_tasks.dependencies import Facts, plan
from devops_tasks.errors import ConfigError
from devops_tasks.project import load_test_config, serve_fallback, test_fallback


def make(root: Path, files: dict[str, str | None]) -> Path:
    for name, content in files.items():
        target = root / name
        if content is None:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
    return root


DEPS = json.dumps({"devDependencies": {"tape": "~1.0.4"}, "scripts": {"test": "tape test/*.js"}})


# -- .core/test.yaml -----------------------------------------------------------------------------

def test_setup_is_a_string_or_a_list(tmp_path):
    make(tmp_path, {".core/test.yaml": "setup: npm ci\n"})
    assert load_test_config(tmp_path).setup == ["npm ci"]
    make(tmp_path, {".core/test.yaml": "setup:\n  - composer install\n  - npm ci\nsetup_inputs: [a.lock, 'req/*.txt']\n"})
    config = load_test_config(tmp_path)
    assert config.setup == ["composer install", "npm ci"] and config.setup_inputs == ["a.lock", "req/*.txt"]


@pytest.mark.parametrize("text, message", [
    ("setup:\n  - npm ci\n  - ''\n", r"line 3: `setup\[1\]` is empty"),
    ("setup: {a: b}\n", "line 1: `setup` must be a string or a list of strings, not a mapping"),
    ("setup:\n  - [x]\n", r"`setup\[0\]` must be a string, not a list"),
    ("setup_inputs: [../secret]\n", r"`setup_inputs`: '../secret' must be a path inside the project"),
    ("setup_inputs: /etc/passwd\n", "must be a path inside the project"),
])
def test_bad_setup_names_the_file_and_line(tmp_path, text, message):
    make(tmp_path, {".core/test.yaml": text})
    with pytest.raises(ConfigError, match=message) as error:
        load_test_config(tmp_path)
    assert str(error.value).startswith(str(tmp_path / ".core" / "test.yaml"))


# -- detection -----------------------------------------------------------------------------------

def names(p) -> list[tuple[str, tuple[str, ...]]]:
    return [(step.name, step.commands) for step in p.steps]


def test_npm_ci_with_a_lock_npm_install_without_and_nothing_without_dependencies(tmp_path):
    locked = make(tmp_path / "a", {"package.json": DEPS, "package-lock.json": "{}"})
    assert names(plan(locked)) == [("npm", ("npm ci",))]
    assert plan(locked).steps[0].inputs == ("package.json", "package-lock.json")
    assert names(plan(make(tmp_path / "b", {"package.json": DEPS}))) == [("npm", ("npm install --no-package-lock",))]
    assert plan(make(tmp_path / "c", {"package.json": '{"scripts": {"test": "node t.js"}}'})).steps == ()
    assert plan(make(tmp_path / "d", {"package.json": "not json"})).steps == ()


def test_composer_install_only_with_a_lock(tmp_path):
    assert names(plan(make(tmp_path / "a", {"composer.json": "{}", "composer.lock": "{}"}))) == [
        ("composer", ("composer install --no-interaction",))]
    assert plan(make(tmp_path / "b", {"composer.json": '{"require": {"x/y": "1"}}'})).steps == ()


@pytest.mark.parametrize("files, installs", [
    ({"pyproject.toml": "[project]\nname='p'\n[project.optional-dependencies]\ntesting=['pytest']\ndev=['tox']\n"},
     ["-e '.[testing]' pytest"]),
    ({"setup.cfg": "[options]\ninstall_requires = attrs\n[options.extras_require]\ntests = pytest\n", "pyproject.toml": ""},
     ["-e '.[tests]' pytest"]),
    ({"pyproject.toml": "[project]\nname='p'\ndependencies=['attrs']\n"}, ["-e . pytest"]),
    ({"pyproject.toml": "[project]\nname='p'\n[dependency-groups]\ntest=['pytest>=8']\n"},
     ["'pip>=25.1'", "-e . --group=test pytest"]),
    ({"requirements.txt": "django\n", "requirements-dev.txt": "pytest\n", "pytest.ini": ""},
     ["-r requirements.txt", "-r requirements-dev.txt", "pytest"]),
])
def test_a_python_project_gets_a_virtual_environment(tmp_path, files, installs):
    root = make(tmp_path, files)
    (step,) = plan(root, command="pytest").steps
    venv = f"{dependencies.state_dir(root)}/venv"
    assert step.venv and step.commands == (f"python3 -m venv {venv}",
                                            *[f"{venv}/bin/python -m pip install -q {i}" for i in installs])
    assert plan(root, command="pytest").env() == {"VIRTUAL_ENV": venv, "PATH": f"{venv}/bin:{dependencies.GUEST_PATH}"}


def test_a_pyproject_that_only_configures_tools_needs_no_environment(tmp_path):
    root = make(tmp_path, {"pyproject.toml": "[tool.black]\nline-length = 99\n"})
    assert plan(root, command="pytest").steps == () and plan(root).env() == {}


def test_test_yaml_setup_replaces_detection_and_is_keyed_on_its_inputs(tmp_path):
    root = make(tmp_path, {"package.json": DEPS, "composer.json": "{}", "composer.lock": "1",
                           ".core/test.yaml": "setup: composer dump-autoload\n"})
    first = plan(root, load_test_config(root))
    assert names(first) == [("setup", ("composer dump-autoload",))]
    assert first.steps[0].inputs == ("package.json", "composer.json", "composer.lock")
    (root / "README").write_text("not an input")
    assert plan(root, load_test_config(root)).keys == first.keys
    (root / "composer.lock").write_text("2")
    assert plan(root, load_test_config(root)).keys != first.keys
    make(root, {".core/test.yaml": "setup: composer dump-autoload\nsetup_inputs: ['deps/*.txt']\n",
                "deps/a.txt": "a"})
    assert plan(root, load_test_config(root)).steps[0].inputs == ("deps/a.txt",)


# -- decisions -----------------------------------------------------------------------------------

def decide(root, p, facts="", force=False):
    return [(d.run, d.message) for d in dependencies.decide(root, p, Facts.parse(facts), force)]


def test_npm_runs_without_node_modules_and_again_when_the_lock_changes(tmp_path):
    root = make(tmp_path, {"package.json": DEPS, "package-lock.json": "{}"})
    p = plan(root)
    key = p.keys["npm"]
    assert decide(root, p, "have npm\n") == [(True, "Installing dependencies (no node_modules): npm ci")]
    make(root, {"node_modules": None})
    assert decide(root, p, "have npm\n") == [(False, "")], "node_modules without our key: the user's, left alone"
    assert decide(root, p, f"have npm\nkey npm {key} node_modules\n") == [
        (False, "Dependencies up to date (package.json, package-lock.json unchanged): npm ci")]
    assert decide(root, p, "have npm\nkey npm 0ld node_modules\n") == [
        (True, "Installing dependencies (package.json, package-lock.json changed): npm ci")]
    assert decide(root, p, f"have npm\nkey npm {key}\n", force=True) == [
        (True, "Installing dependencies (--setup): npm ci")]


def test_a_missing_tool_is_said_and_the_command_still_runs(tmp_path):
    root = make(tmp_path, {"package.json": DEPS, "pyproject.toml": "[project]\nname='p'\ndependencies=['a']\n"})
    assert decide(root, plan(root, command="pytest"), "") == [
        (False, "Not installing dependencies (npm install --no-package-lock): npm is not in this image "
                "(the dev image has it: images.build.recipe: dev)"),
        (False, "Not installing dependencies (a virtual environment, pip install -e . pytest): python3's venv "
                "module is not in this image (the dev image has it: images.build.recipe: dev)"),
    ]


def test_explicit_setup_runs_once_and_again_when_an_output_folder_is_gone(tmp_path):
    root = make(tmp_path, {"composer.json": "{}", ".core/test.yaml": "setup: composer dump-autoload\n", "vendor": None})
    p = plan(root, load_test_config(root))
    key = p.keys["setup"]
    assert decide(root, p) == [(True, "Installing dependencies (first run): composer dump-autoload")]
    assert decide(root, p, f"key setup {key} vendor\n") == [
        (False, "Dependencies up to date (composer.json unchanged): composer dump-autoload")]
    (root / "vendor").rmdir()
    assert decide(root, p, f"key setup {key} vendor\n") == [
        (True, "Installing dependencies (no vendor): composer dump-autoload")]


def test_the_venv_runs_when_missing_or_unfinished(tmp_path):
    root = make(tmp_path, {"requirements.txt": "x\n"})
    p = plan(root, command="pytest")
    key = p.keys["python"]
    assert decide(root, p, "have python3-venv\n")[0][0] is True
    assert decide(root, p, "have python3-venv\nhave venv\n")[0] == (
        True, "Installing dependencies (first run): a virtual environment, pip install -r requirements.txt; "
              "pip install pytest")
    assert decide(root, p, f"have python3-venv\nhave venv\nkey python {key}\n")[0][0] is False


# -- the guest scripts, run by a real sh ---------------------------------------------------------

def sh(script: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=30)


def test_probe_and_run_scripts_in_a_real_shell(tmp_path, monkeypatch):
    monkeypatch.setattr(dependencies, "STATE_DIR", str(tmp_path / "state"))
    root = make(tmp_path / "proj", {".core/test.yaml": "setup:\n  - mkdir vendor\n  - echo \"it's $HOME\" > vendor/x\n"})
    p = plan(root, load_test_config(root))
    probe = sh(dependencies.probe_script(p, ["sh", "no-such-program-here"]), root)
    assert probe.returncode == 0 and Facts.parse(probe.stdout) == Facts(frozenset({"sh"}), {}, {})
    run = sh(dependencies.run_script(p.steps[0], p), root)
    assert run.returncode == 0, run.stderr
    assert (root / "vendor/x").read_text() == f"it's {Path.home()}\n", "each command is shell syntax"
    facts = Facts.parse(sh(dependencies.probe_script(p), root).stdout)
    assert facts.keys == {"setup": p.keys["setup"]} and facts.outputs == {"setup": ("vendor",)}
    failing = make(tmp_path / "bad", {".core/test.yaml": "setup:\n  - 'false'\n  - touch ran\n"})
    q = plan(failing, load_test_config(failing))
    assert sh(dependencies.run_script(q.steps[0], q), failing).returncode == 1
    assert not (failing / "ran").exists() and Facts.parse(sh(dependencies.probe_script(q), failing).stdout).keys == {}


# -- fallbacks -----------------------------------------------------------------------------------

def test_serve_fallbacks(tmp_path):
    php = make(tmp_path / "php", {"composer.json": "{}"})
    fallback = serve_fallback(php, "frankenphp php-server -l :8080", 8080)
    assert (fallback.program, fallback.command) == ("frankenphp", "php -S 0.0.0.0:8080")
    laravel = make(tmp_path / "laravel", {"artisan": "", "composer.json": '{"require": {"laravel/framework": "^11"}}'})
    fallback = serve_fallback(laravel, "php artisan octane:start --host=0.0.0.0 --port=8000")
    assert (fallback.program, fallback.command) == ("", "php artisan serve --host=0.0.0.0 --port=8000")
    octane = make(tmp_path / "octane", {"artisan": "", "composer.json": '{"require": {"laravel/octane": "^2"}}'})
    assert serve_fallback(octane, "php artisan octane:start --host=0.0.0.0 --port=8000") is None
    assert serve_fallback(php, "npm start") is None


@pytest.mark.parametrize("taskfile, command", [
    ("version: '3'\ntasks:\n  test:\n    cmds:\n      - go vet ./...\n      - cmd: go test ./...\n", "go vet ./... && go test ./..."),
    ("version: '3'\ntasks:\n  test: pytest -q\n", "pytest -q"),
    ("version: '3'\ntasks:\n  test:\n    cmds: [\"go test {{.ARGS}}\"]\n", None),
    ("version: '3'\ntasks:\n  test:\n    deps: [build]\n    cmds: [make]\n", None),
    ("version: '3'\ntasks:\n  test:\n    cmds:\n      - task: unit\n", None),
    ("not: [yaml", None),
])
def test_task_test_without_task_runs_the_taskfile_commands(tmp_path, taskfile, command):
    root = make(tmp_path, {"Taskfile.yml": taskfile})
    fallback = test_fallback(root, "task test")
    assert (fallback.command if fallback else None) == command
    if fallback:
        assert fallback.program == "task" and "Taskfile.yml" in fallback.note
    assert test_fallback(root, "pytest") is None
